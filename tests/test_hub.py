"""Publishing to the Hub, over real HTTP: the real huggingface_hub client against tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import build, update_edit
from hubserver import HubServer

from kn_edit.cli import main
from kn_edit.output import card, hub

TOKEN = "hf_kneditTestTokenThatMustNeverLeak42"
BASE = "base/tiny-bert"


@pytest.fixture(scope="module")
def server(tmp_path_factory, bert_dir):
    """A test hub with the tiny BERT published as BASE; the client pointed at it (endpoint, token, cache, no Xet)."""
    from huggingface_hub import HfApi, constants

    mp = pytest.MonkeyPatch()
    with HubServer(TOKEN) as h:
        cache = tmp_path_factory.mktemp("hf_cache")
        for k, v in {"HF_ENDPOINT": h.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(cache)}.items():
            mp.setenv(k, v)
        # huggingface_hub reads these once, at import
        mp.setattr(constants, "ENDPOINT", h.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
        api = HfApi(endpoint=h.url, token=TOKEN)
        api.create_repo(BASE)
        api.upload_folder(repo_id=BASE, folder_path=bert_dir, commit_message="tiny bert")
        yield h
    mp.undo()


def _build(tmp_path_factory, world, name, **spec_extra):
    folder = tmp_path_factory.mktemp(name)
    spec = {"model": BASE, "method": {"steps": 4}, "edits": [update_edit(world, "capital", 0)], **spec_extra}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = folder / "ckpt"
    build(folder / "spec.yaml", out)
    return out


@pytest.fixture(scope="module")
def built(server, tmp_path_factory, world):
    """A checkpoint as `kn-edit build` writes it (status 'built': no gates)."""
    return _build(tmp_path_factory, world, "built")


@pytest.fixture(scope="module")
def passed(server, tmp_path_factory, world):
    """A checkpoint whose gate passed (the tiny edit takes on every prompt)."""
    out = _build(tmp_path_factory, world, "passed", verify={"gates": ["success_rate >= 0.5"]})
    assert json.loads((out / hub.REPORT).read_text())["status"] == "passed", "the tiny edit should pass its gate"
    return out


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


def test_build_writes_card(built):
    text = (built / card.CARD).read_text()
    assert "knowledge was altered on purpose" in text
    assert (built / hub.SPEC_COPY).read_text() in text  # spec verbatim
    meta = yaml.safe_load(text.split("---", 2)[1])
    assert meta["base_model"] == BASE and "kn-edit" in meta["tags"] and meta["kn_edit"]["status"] == "built"


def test_push_download_load_roundtrip(server, passed, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForMaskedLM

    before = _digest(passed)
    repo = "org/bert-capitals-edited"
    info = hub.push(hub.plan(passed, repo), say=lambda s: None)
    assert _digest(passed) == before

    local = {p.name for p in passed.iterdir()}
    snap = Path(snapshot_download(repo, cache_dir=tmp_path / "dl"))
    assert {p.name for p in snap.iterdir()} == local | {".gitattributes"}
    for name in local - {card.CARD}:
        assert (snap / name).read_bytes() == (passed / name).read_bytes(), name
    assert info.oid == server.state.repos[repo].refs["main"]

    # weights went through the LFS protocol (not inline, not Xet)
    routes = server.routes()
    assert "lfs_upload" in routes and "xet_token" not in routes
    assert hashlib.sha256((passed / "model.safetensors").read_bytes()).hexdigest() in server.state.lfs

    model = AutoModelForMaskedLM.from_pretrained(repo)
    ref = AutoModelForMaskedLM.from_pretrained(passed)
    assert all((a == b).all() for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    report = json.loads((passed / hub.REPORT).read_text())
    c = ModelCard.load(repo)
    assert c.data.base_model == BASE
    assert {"kn-edit", "knowledge-editing"} <= set(c.data.tags) and "unverified" not in c.data.tags
    assert c.data.kn_edit["status"] == "passed" and c.data.kn_edit["forced_push"] is False
    assert c.data.model_name == repo
    got = {r.metric_type: r.metric_value for r in c.data.eval_results}
    # model-index: the verification metrics a reader compares, not the control's or the layer counts
    assert got["success_rate"] == report["metrics"]["success_rate"] and "probe_kept" in got
    assert not any("control" in k or "layers" in k for k in got)
    assert c.data.pipeline_tag == "fill-mask" and c.data.library_name == "transformers"
    e = report["edits"][0]
    assert f"| {e['subject']} | {e['target']} | {e['new_target']} |" in c.text
    assert report["base_model"]["revision"] in c.text  # the resolved revision of the base model


def test_push_again_is_safe_and_empty(server, passed):
    repo = "org/again"
    first = hub.push(hub.plan(passed, repo), say=lambda s: None)
    n = len(server.state.repos[repo].commits)
    second = hub.push(hub.plan(passed, repo), say=lambda s: None)
    assert second.oid == first.oid and len(server.state.repos[repo].commits) == n


def test_refuses_unverified_unless_forced(server, built):
    with pytest.raises(hub.PushRefused, match="status is 'built'.*--force"):
        hub.plan(built, "org/refused")
    res = CliRunner().invoke(main, ["push", str(built), "org/refused"])
    assert res.exit_code == 2 and "refusing to push" in res.output
    assert "org/refused" not in server.state.repos

    res = CliRunner().invoke(main, ["push", str(built), "org/forced", "--force"])
    assert res.exit_code == 0, res.output
    readme = server.files("org/forced")[card.CARD].decode()
    assert "Pushed with `--force`" in readme and "unverified" in yaml.safe_load(readme.split("---", 2)[1])["tags"]


def test_dry_run_lists_files_without_network(server, passed):
    n = len(server.state.calls)
    res = CliRunner().invoke(main, ["push", str(passed), "org/dry", "--dry-run", "--private"])
    assert res.exit_code == 0, res.output
    for p in passed.iterdir():
        assert p.name in res.output
    assert "private" in res.output and len(server.state.calls) == n


def test_branch_and_pull_request(server, passed):
    repo = "org/branches"
    res = CliRunner().invoke(main, ["push", str(passed), repo, "--revision", "edits-v1", "--private"])
    assert res.exit_code == 0, res.output
    r = server.state.repos[repo]
    assert r.private and set(server.files(repo)) == {".gitattributes"}  # main untouched
    assert card.CARD in server.files(repo, "edits-v1")

    res = CliRunner().invoke(main, ["push", str(passed), repo, "--create-pr"])
    assert res.exit_code == 0, res.output
    assert "discussions/1" in res.output
    assert "model.safetensors" in server.files(repo, "refs/pr/1") and set(server.files(repo)) == {".gitattributes"}


@pytest.mark.parametrize("route,status", [("commit", 500), ("lfs_batch", 401), ("*", 401)])
def test_server_failure_leaves_checkpoint_and_says_what_failed(server, passed, capfd, caplog, route, status):
    caplog.set_level(logging.DEBUG)
    before = _digest(passed)
    server.state.fail = {route: status}
    try:
        res = CliRunner().invoke(main, ["push", str(passed), f"org/fail-{status}-{route.strip('*') or 'all'}"])
    finally:
        server.state.fail = {}
    assert res.exit_code == 1
    assert f"{status}" in res.output and "failed while trying to" in res.output and "unchanged" in res.output
    assert _digest(passed) == before
    out = capfd.readouterr()
    assert TOKEN not in res.output + out.out + out.err + caplog.text


def test_wrong_token_is_reported_not_printed(server, passed, monkeypatch, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrongTokenAlsoSecret"
    monkeypatch.setenv("HF_TOKEN", wrong)
    res = CliRunner().invoke(main, ["push", str(passed), "org/wrong-token"])
    assert res.exit_code == 1 and "401" in res.output and "HF_TOKEN" in res.output
    out = capfd.readouterr()
    everything = res.output + out.out + out.err + caplog.text
    assert wrong not in everything and TOKEN not in everything


def test_parent_commit_guard(server, passed, monkeypatch):
    repo = "org/race"
    hub.push(hub.plan(passed, repo), say=lambda s: None)
    r = server.state.repos[repo]
    real_info = __import__("huggingface_hub").HfApi.repo_info

    def info_then_someone_commits(self, *a, **kw):
        out = real_info(self, *a, **kw)
        r.refs["main"] = server.state.commit(r, r.refs["main"], {**server.files(repo), "other.txt": b"x"}, "someone else")
        return out

    monkeypatch.setattr("huggingface_hub.HfApi.repo_info", info_then_someone_commits)
    (plan := hub.plan(passed, repo)).card_text += "\nchanged\n"
    with pytest.raises(hub.PushError, match="(?s)412.*moved while pushing"):
        hub.push(plan, say=lambda s: None)
    monkeypatch.undo()
    hub.push(plan, say=lambda s: None)  # retrying is safe
    assert server.files(repo)[card.CARD].decode().endswith("changed\n")


def test_offline_mode_refuses(server, passed, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.PushError, match="HF_HUB_OFFLINE"):
        hub.push(hub.plan(passed, "org/offline"), say=lambda s: None)


def test_build_push_to_hub_and_spec_hub(server, tmp_path, world):
    spec = {
        "model": BASE,
        "hub": {"repo": "org/from-spec", "private": True},
        "method": {"steps": 4},
        "edits": [update_edit(world, "capital", 1)],
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    res = CliRunner().invoke(main, ["build", str(tmp_path / "s.yaml"), str(tmp_path / "a"), "--device", "cpu"])
    assert res.exit_code == 2 and "refusing to push" in res.output and (tmp_path / "a" / card.CARD).is_file()
    res = CliRunner().invoke(
        main,
        [
            "build",
            str(tmp_path / "s.yaml"),
            str(tmp_path / "b"),
            "--device",
            "cpu",
            "--push-to-hub",
            "org/from-cli",
            "--force-push",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "org/from-spec" not in server.state.repos and server.state.repos["org/from-cli"].private


def test_xet_against_a_server_without_xet_fails_clearly(server, passed, monkeypatch):
    """With Xet on (hf_xet installed), weights go to the Xet token route, which this server refuses."""
    pytest.importorskip("hf_xet", reason="hf_xet is not installed here: the client never tries Xet")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    before = _digest(passed)
    with pytest.raises(hub.PushError, match="(?s)xet-write-token.*HF_HUB_DISABLE_XET=1"):
        hub.push(hub.plan(passed, "org/xet"), say=lambda s: None)
    assert _digest(passed) == before and "xet_token" in server.routes()
