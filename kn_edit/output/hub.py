"""Publish a checkpoint folder to the Hugging Face Hub as one atomic commit.

Follows huggingface_hub's conventions: HF_TOKEN (or a stored login) for the token, HF_ENDPOINT for
the server, HF_HUB_OFFLINE to forbid network use, HF_HUB_DISABLE_XET to upload over plain LFS.
Nothing here writes into the checkpoint, so a failed push leaves it as it was, and the steps
(create repo, create branch, commit with a parent guard) are all safe to repeat."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PushError, PushRefused
from ..model.load import sha256
from . import card
from .checkpoint import MANIFEST, read_manifest
from .report import REPORT, SPEC_COPY, Report


@dataclass
class Plan:
    folder: Path
    repo_id: str
    status: str
    forced: bool
    files: list[tuple[str, int]]  # (path in repo, size); README.md is the card made for this push
    card_text: str
    revision: str | None = None
    private: bool | None = None
    create_pr: bool = False
    notes: list[str] = field(default_factory=list)


def plan(folder, repo_id: str, *, force=False, revision=None, private=None, create_pr=False) -> Plan:
    """Check the checkpoint and decide what a push uploads; touches no network."""
    folder = Path(folder)
    try:
        report = Report.read(folder / REPORT)
        spec_text = (folder / SPEC_COPY).read_text()
    except (OSError, ValueError) as e:
        raise PushRefused(f"{folder}: not a kn-edit checkpoint ({REPORT} and {SPEC_COPY} expected): {e}") from None
    status = report.status
    if status != "passed" and not force:
        why = {"failed": "its verification gates failed", "built": "it has no verification gates (unverified)"}
        raise PushRefused(
            f"{folder}: refusing to push: status is {status!r} ({why.get(status, 'not verified')}); "
            "only checkpoints whose gates passed are published. Pass --force to push anyway "
            "(the model card will say so)."
        )
    forced = status != "passed"
    text = card.render(report, spec_text, model_name=repo_id, forced=forced)
    files = [(name, (folder / name).stat().st_size) for name in _checkpoint_files(folder) if name != card.CARD]
    files.append((card.CARD, len(text.encode())))
    listed = {name for name, _ in files}
    notes = [f"not published (not part of the checkpoint): {p.relative_to(folder).as_posix()}"
             for p in sorted(folder.rglob("*")) if p.relative_to(folder).as_posix() not in listed and not p.is_dir()]  # fmt: skip
    return Plan(folder, repo_id, status, forced, sorted(files), text, revision, private, create_pr, notes)


def _checkpoint_files(folder: Path) -> list[str]:
    """The files the build wrote (its manifest, and the manifest itself), each checked to be a
    plain file inside the folder, unchanged since the build: nothing else is ever uploaded."""
    files = read_manifest(folder)
    for name in [*files, MANIFEST]:
        p = folder / name
        if p.is_symlink() or not p.is_file() or folder.resolve() not in p.resolve().parents:
            raise PushRefused(f"{p}: part of the checkpoint but not a plain file inside {folder}")
        if name in files and name != card.CARD and sha256(p) != files[name]:
            raise PushRefused(f"{p}: changed since the build; run kn-edit verify")
    return sorted([*files, MANIFEST])


def _endpoint() -> str:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it again so a later setting counts too
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def push(p: Plan, *, token: str | None = None, endpoint: str | None = None, say=print):
    """Upload plan `p` in one commit; returns huggingface_hub's CommitInfo."""
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    if constants.is_offline_mode():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the network. Unset it to push.")
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN (or run `hf auth login`).")
    api = HfApi(endpoint=endpoint or _endpoint(), token=token)
    branch = p.revision or "main"
    say(f"publishing {len(p.files)} files: {', '.join(name for name, _ in p.files)}")
    for n in p.notes:
        say(n)
    step = "create the repository"
    try:
        url = api.create_repo(p.repo_id, private=p.private, exist_ok=True, repo_type="model")
        if branch != "main":
            step = f"create branch {branch!r}"
            api.create_branch(p.repo_id, branch=branch, exist_ok=True)
        step = f"read the head of {branch!r}"
        parent = api.repo_info(p.repo_id, revision=branch).sha
        ops = [CommitOperationAdd(path, str(p.folder / path)) for path, _ in p.files if path != card.CARD]
        ops.append(CommitOperationAdd(card.CARD, p.card_text.encode()))
        step = f"upload and commit {len(ops)} files"
        info = api.create_commit(
            p.repo_id,
            ops,
            commit_message=f"kn-edit: publish checkpoint (status {p.status})",
            commit_description="Pushed with --force: verification did not pass." if p.forced else "",
            revision=branch,
            create_pr=p.create_pr,
            parent_commit=parent,
        )
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way, token removed
        msg = _scrub(f"{type(e).__name__}: {e}", token)
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {
            401: "check HF_TOKEN",
            403: "the token cannot write to this repository",
            412: f"{branch!r} moved while pushing; run the command again",
        }.get(status, "")
        if "xet" in msg.lower():
            hint = "the server refused the Xet upload protocol; set HF_HUB_DISABLE_XET=1 to upload over plain LFS"
        raise PushError(
            f"push to {p.repo_id} failed while trying to {step}: {msg}"
            + (f"\nhint: {hint}" if hint else "")
            + f"\nthe local checkpoint {p.folder} is unchanged; the command is safe to retry."
        ) from None
    say(f"pushed {p.folder} to {url} ({branch}): commit {info.oid}")
    if info.pr_url:
        say(f"pull request: {info.pr_url}")
    return info


def describe(p: Plan) -> list[str]:
    """The dry-run listing."""
    where = f"{p.repo_id} (branch {p.revision or 'main'}{', as a pull request' if p.create_pr else ''}"
    where += f"{', private' if p.private else ''})"
    lines = [f"would push {p.folder} -> {where}, status {p.status}{' (FORCED)' if p.forced else ''}:"]
    lines += [f"  {path}  {size} bytes" for path, size in p.files]
    lines += [f"  ({n})" for n in p.notes]
    lines.append(f"  total {sum(s for _, s in p.files)} bytes in {len(p.files)} files (README.md: the card made for this push)")
    return lines


def push_folder(folder, repo_id: str, *, force=False, revision=None, private=None, create_pr=False, say=print):
    """Push a checkpoint folder (status `passed`, or any with force) to the Hub in one commit."""
    return push(plan(folder, repo_id, force=force, revision=revision, private=private, create_pr=create_pr), say=say)
