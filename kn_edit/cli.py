"""Command line: a thin layer over the Python API (kn_edit.pipeline). Errors are caught once, in
`main`: exit 2 for bad input, 1 for a failure (a failed gate included)."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import click

from . import __version__
from .errors import GatesFailed, KnEditError
from .options import BuildOptions, HubOptions, RunOptions, click_options

DEMO = "demo.yaml"
CONTEXT = {"help_option_names": ["-h", "--help"]}


def demo_spec() -> Path:
    return Path(str(resources.files("kn_edit") / "specs" / DEMO))


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KnEditError as e:
            click.echo(f"{e.prefix}{e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="kn-edit")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars or status lines")
@click.option("-v", "--verbose", count=True, help="log what each step does (-vv: more)")
def main(quiet, verbose):
    """Knowledge-neuron edits from a YAML spec to a verified checkpoint."""
    from .progress import configure

    configure(quiet, verbose)


JSON_OPT = click.option(
    "--json", "as_json", is_flag=True, help="print the report as JSON on stdout (schema: kn-edit schema --report)"
)


SPEC_ARG = click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
RUN = click_options(RunOptions, skip=("device", "dtype", "cache", "no_cache"))


@main.command()
@SPEC_ARG
@RUN
def validate(spec, pararel):
    """Check SPEC: schema, templates, and how targets tokenize (loads the tokenizer only)."""
    from .plan.batch import prepare, tokenized

    batch = prepare(spec, pararel)
    n = sum(len(f.prompts) for e in batch.edits for f in e.facts)
    click.echo(f"{spec}: ok ({len(batch.edits)} edits, {n} prompts, model {batch.spec.model.name})")
    for line in tokenized(batch):
        click.echo(f"  {line}")


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click_options(BuildOptions)
@click_options(HubOptions, names={"repo": "push_to_hub", "force": "force_push"})
@click.option("--no-push", is_flag=True, help="do not push, even if the spec names a hub.repo")
@JSON_OPT
def build(spec, out, no_push, as_json, **kw):
    """Build the edited checkpoint of SPEC into OUT (default: the bundled demo spec into out/demo)."""
    from .output.show import summary
    from .pipeline import build as run_build

    hub = HubOptions(
        repo=kw.pop("push_to_hub"), force=kw.pop("force_push"), **{k: kw.pop(k) for k in ("private", "revision", "create_pr")}
    )
    options = BuildOptions(**kw)
    spec = spec or demo_spec()
    out = out or Path("out") / spec.stem
    report = run_build(spec, out, options)
    if not as_json:
        summary(report)
    _verdict(report, f"wrote {out}", as_json)  # exits 1 on a failed gate: nothing is pushed
    from .spec import load

    spec_hub = load(spec)[0].hub
    repo = None if no_push else (hub.repo or (spec_hub.repo if spec_hub else None))
    if repo:
        private = hub.private or bool(spec_hub and spec_hub.private)
        _push(out, hub.model_copy(update={"repo": repo, "private": private}), dry_run=False)


def _push(folder, hub: HubOptions, dry_run: bool):
    from .output.hub import describe, plan, push

    p = plan(folder, hub.repo, force=hub.force, revision=hub.revision, private=hub.private or None, create_pr=hub.create_pr)
    if p.forced:
        click.echo(f"WARNING: pushing {folder} with status {p.status!r} because of --force; the model card says so.", err=True)
    if dry_run:
        click.echo("\n".join(describe(p)))
        return
    push(p, say=click.echo)


@main.command("push")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("repo_id")
@click_options(HubOptions, skip=("repo",))
@click.option("--dry-run", is_flag=True, help="list what would be uploaded; no network")
def push_cmd(checkpoint, repo_id, dry_run, **kw):
    """Push CHECKPOINT (a built, verified folder) to the Hub repository REPO_ID in one commit.

    Token, endpoint and offline mode follow huggingface_hub: HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE."""
    _push(checkpoint, HubOptions(repo=repo_id, **kw), dry_run)


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise KnEditError(f"cannot write {path}: {e.strerror or e}") from None


def _verdict(report, done: str, as_json: bool = False):
    """The aggregate table and gates (or the JSON report); exit 1 when a gate failed."""
    from .measure.gates import describe_failure
    from .output.show import aggregate

    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        aggregate(report)
    click.echo(done, err=as_json)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for k, e in enumerate(report.edits):
        if e.failed:
            how = (f"efficacy {e.metrics.efficacy:.2f} on its located prompts" if e.kind == "update"
                   else f"its relation still answers {e.accuracy_after:.0%} of its prompts")  # fmt: skip
            click.echo(f"edit {k + 1} ({e.title}) did not hold: {how}", err=True)
    failed = report.failed_gates()
    for r in failed:
        click.echo(describe_failure(r), err=True)
    if failed:
        raise GatesFailed(f"status: failed ({len(failed)} of {len(report.gates.results)} gates)")
    click.echo(f"status: {report.status}", err=as_json)


@main.command("verify")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="take the gates and metric settings (the verify section) from SPEC instead of the checkpoint's spec copy",
)
@click_options(RunOptions, skip=("dtype", "cache", "no_cache"))
@click.option(
    "-o",
    "--output",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the recomputed report (JSON) to this file",
)
@JSON_OPT
def verify_cmd(checkpoint, spec_path, json_out, as_json, **kw):
    """Recompute CHECKPOINT's metrics against its base model and apply the gates (exit 1 if one fails)."""
    from .pipeline import verify

    report = verify(checkpoint, spec_path, RunOptions(**kw))
    if json_out:
        _write_text(json_out, report.to_json())
    _verdict(report, f"verified {checkpoint} against {report.base_model.get('name')}", as_json)


@main.command()
@SPEC_ARG
@click.option(
    "--shard",
    default=None,
    metavar="i/N",
    help="locate only facts j with j mod N = i  [default: RANK/WORLD_SIZE from torchrun, else all]",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: spread the shards over a Ray cluster (RAY_ADDRESS) or a local one",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="ray: number of shards  [default: the cluster's GPUs, else its nodes]",
)
@click_options(RunOptions, skip=("no_cache",))
def locate(spec, shard, executor, workers, **kw):
    """Locate the knowledge neurons of SPEC's facts into the neuron cache (no checkpoint is written).

    Run it once per shard (or through torchrun or Ray), then `kn-edit build SPEC OUT` with the same
    cache computes nothing that is cached."""
    from .errors import ShardError
    from .locate.shards import locate_ray, locate_shard, parse_shard

    o = RunOptions(**kw)
    cache_dir = o.cache_dir()
    if executor == "ray":
        if shard is not None:
            raise ShardError("--shard: not with --executor ray (Ray assigns the shards)")
        stats = locate_ray(spec, cache_dir, workers, o.device, o.dtype, pararel_dir=o.pararel)
    else:
        stats = [locate_shard(spec, cache_dir, parse_shard(shard), o.device, o.dtype, o.pararel)]
    for s in stats:
        click.echo(
            f"shard {s['shard']} on {s['device']}: {s['assigned']} of {s['facts']} facts, "
            f"{s['computed']} computed, {s['cached']} already cached, {s['corrupt']} corrupt entries replaced"
        )
    click.echo(f"cache {cache_dir}")


@main.command()
@click.option("--report", "what", flag_value="report", help="the report's schema (kn_edit_report.json) instead of the spec's")
def schema(what):
    """Print the spec's JSON schema (or the report's)."""
    if what == "report":
        from .output.report import json_schema
    else:
        from .spec import json_schema
    click.echo(json_schema())


@main.command("spec-from-pararel")
@click.option("--relation", required=True, help="PARAREL relation, e.g. P36")
@click.option("--facts", "n", type=click.IntRange(1), default=10, show_default=True, help="how many facts to update")
@click.option("--model", required=True, help="model name as in a spec (hub id, folder, .gguf, pypi:PACKAGE)")
@click.option(
    "--pararel",
    "pararel_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="PARAREL directory (default: $KN_EDIT_PARAREL); written into the spec when given",
)
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the choice of new targets")
@click.option(
    "--known",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="a fact counts as known when the top-1 answer is right on more than this share of its prompts",
)
@click.option(
    "--min-tokens",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="only facts whose answer has at least this many tokens (2: multi-token answers)",
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write here (default: stdout)"
)
def spec_from_pararel(relation, n, model, pararel_dir, seed, known, min_tokens, output):
    """Write an update spec for facts of RELATION the model knows, with new targets from the same relation."""
    import yaml

    from .errors import KnEditError
    from .model import load as loading
    from .plan import pararel

    d = pararel.find_dir(pararel_dir, file="--pararel")
    src = loading.resolve(model)
    tok, causal = loading.load_tokenizer(src), loading.is_causal(src)
    use = pararel.usable(tok, causal, pararel.templates(d, relation, "--relation"), pararel.facts(d, relation, "--relation"))
    m, _ = loading.load_model(src)
    chosen = pararel.pick(m, tok, causal, use, n, seed, known, min_tokens)
    if not chosen:
        raise KnEditError(f"the model knows none of the {len(use.facts)} usable facts of {relation}")
    spec = {
        "model": model,
        **({"pararel": str(pararel_dir.resolve())} if pararel_dir else {}),
        "seed": seed,
        "edits": [{"update": {"relation": relation, "source": "pararel", **c}} for c in chosen],
    }
    text = (
        f"# {len(chosen)} facts of {relation} the model knows; usable: {len(use.templates)} templates, "
        f"{len(use.facts)} facts (skipped {use.skipped_templates} templates, {use.skipped_facts} facts)\n"
        + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    )
    if output:
        _write_text(output, text)
        click.echo(f"wrote {output} ({len(chosen)} edits)", err=True)
    else:
        click.echo(text, nl=False)
