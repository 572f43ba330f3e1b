"""Command line: a thin layer over the pipeline modules. Exit 2 for bad input, 1 for a failed build."""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import click

from . import __version__
from .checkpoint import OutputExists
from .models import ModelError
from .spec import SpecError

DEMO = "demo.yaml"


def demo_spec() -> Path:
    return Path(str(resources.files("kn_edit") / "specs" / DEMO))


def _fail(e: Exception, code: int = 2):
    click.echo(f"error: {e}", err=True)
    sys.exit(code)


def _hub_options(f):
    f = click.option("--create-pr", is_flag=True, help="open a pull request instead of committing to the branch")(f)
    f = click.option("--revision", metavar="BRANCH", default=None, help="branch to push to (created if needed)")(f)
    return click.option("--private", is_flag=True, help="create the repository private")(f)


@click.group()
@click.version_option(__version__, prog_name="kn-edit")
def main():
    """Knowledge-neuron edits from a YAML spec to a verified checkpoint."""


def device_opt(help="auto, cpu, cuda or cuda:N"):
    return click.option("--device", default="auto", show_default=True, help=help)


def dtype_opt(help):
    return click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                        show_default=True, help=help)


def cache_opt(help="neuron cache folder"):
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=f"{help}  [default: $KN_EDIT_CACHE/neurons or ~/.cache/kn_edit/neurons]")


PARAREL_OPT = click.option("--pararel", "pararel_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                           help="PARAREL directory for source: pararel edits (overrides the spec's and $KN_EDIT_PARAREL)")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@PARAREL_OPT
def validate(spec, pararel_dir):
    """Check SPEC: schema, templates, and that targets are single tokens (loads the tokenizer only)."""
    from .build import prepare

    try:
        prep = prepare(spec, pararel_dir)
    except (SpecError, ModelError) as e:
        _fail(e)
    n = sum(len(f.prompts) for p in prep.plans for f in p.facts)
    click.echo(f"{spec}: ok ({len(prep.plans)} edits, {n} prompts, model {prep.spec.model.name})")


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="replace OUT if it exists (only once the new checkpoint is complete)")
@device_opt()
@dtype_opt("compute dtype of attribution (autocast); edits and saved weights keep the model's own dtype")
@click.option("--seed", type=int, default=None, help="overrides the spec's seed")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", default=None,
              help="then push the checkpoint to this Hub repository (overrides the spec's hub.repo)")
@click.option("--no-push", is_flag=True, help="do not push, even if the spec names a hub.repo")
@click.option("--force-push", is_flag=True, help="push even if verification did not pass (recorded in the model card)")
@_hub_options
@PARAREL_OPT
@cache_opt()
@click.option("--no-cache", is_flag=True, help="locate every fact afresh and store nothing")
def build(spec, out, force, device, dtype, seed, push_to, no_push, private, revision, create_pr, force_push, pararel_dir,
          cache_dir, no_cache):
    """Build the edited checkpoint of SPEC into OUT (default: the bundled demo spec into out/demo)."""
    from .build import prepare, run
    from .cache import default_dir as default_cache_dir
    from .show import summary

    spec = spec or demo_spec()
    out = out or Path("out") / spec.stem
    try:
        prep = prepare(spec, pararel_dir)
        cache = None if no_cache else (cache_dir or default_cache_dir())
        report = run(prep, out, force=force, device=device, dtype=dtype, seed=seed, cache=cache)
    except (SpecError, ModelError, OutputExists) as e:
        _fail(e)
    summary(report)
    _verdict(report, f"wrote {out}")  # exits 1 on a failed gate: nothing is pushed
    hub = prep.spec.hub
    repo = None if no_push else (push_to or (hub.repo if hub else None))
    if repo:
        _push(out, repo, private or bool(hub and hub.private), revision, create_pr, False, force_push)


def _push(folder, repo_id, private, revision, create_pr, dry_run, force):
    from .hub import PushError, PushRefused, describe, plan, push

    try:
        p = plan(folder, repo_id, force=force, revision=revision, private=private or None, create_pr=create_pr)
    except PushRefused as e:
        _fail(e, 2)
    if p.forced:
        click.echo(f"WARNING: pushing {folder} with status {p.status!r} because of --force; the model card says so.", err=True)
    if dry_run:
        click.echo("\n".join(describe(p)))
        return
    try:
        push(p, say=click.echo)
    except PushError as e:
        _fail(e, 1)


@main.command("push")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("repo_id")
@_hub_options
@click.option("--dry-run", is_flag=True, help="list what would be uploaded; no network")
@click.option("--force", is_flag=True, help="push even if verification did not pass (recorded loudly in the model card)")
def push_cmd(checkpoint, repo_id, private, revision, create_pr, dry_run, force):
    """Push CHECKPOINT (a built, verified folder) to the Hub repository REPO_ID in one commit.

    Token, endpoint and offline mode follow huggingface_hub: HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE."""
    _push(checkpoint, repo_id, private, revision, create_pr, dry_run, force)


def _verdict(report: dict, done: str):
    """The aggregate table and gates; exit 1 when a gate failed."""
    from .metrics import describe_failure
    from .show import aggregate

    aggregate(report)
    click.echo(done)
    failed = [r for r in report["gates"]["results"] if not r["passed"]]
    for r in failed:
        click.echo(describe_failure(r), err=True)
    if failed:
        click.echo(f"status: failed ({len(failed)} of {len(report['gates']['results'])} gates)", err=True)
        sys.exit(1)
    click.echo(f"status: {report['status']}")


@main.command("verify")
@click.argument("checkpoint", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--spec", "spec_path", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="take the gates and metric settings (the verify section) from SPEC instead of the checkpoint's spec copy")
@device_opt()
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="also write the recomputed report here")
def verify_cmd(checkpoint, spec_path, device, json_out):
    """Recompute CHECKPOINT's metrics against its base model and apply the gates (exit 1 if one fails)."""
    import json

    from .reverify import run

    try:
        report = run(checkpoint, spec_path, device)
    except (SpecError, ModelError) as e:
        _fail(e)
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")
    _verdict(report, f"verified {checkpoint} against {report['base_model'].get('name')}")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--shard", default=None, metavar="i/N",
              help="locate only facts j with j mod N = i  [default: RANK/WORLD_SIZE from torchrun, else all]")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: spread the shards over a Ray cluster (RAY_ADDRESS) or a local one")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="ray: number of shards  [default: the cluster's GPUs, else its nodes]")
@cache_opt("neuron cache folder, shared by all shards")
@device_opt("auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda:N")
@dtype_opt("compute dtype of attribution; give build the same one")
@PARAREL_OPT
def locate(spec, shard, executor, workers, cache_dir, device, dtype, pararel_dir):
    """Locate the knowledge neurons of SPEC's facts into the neuron cache (no checkpoint is written).

    Run it once per shard (or through torchrun or Ray), then `kn-edit build SPEC OUT` with the same
    cache computes nothing that is cached."""
    from .cache import default_dir
    from .distribute import ShardError, locate_ray, locate_shard, parse_shard

    cache_dir = cache_dir or default_dir()
    try:
        if executor == "ray":
            if shard is not None:
                raise ShardError("--shard: not with --executor ray (Ray assigns the shards)")
            stats = locate_ray(spec, cache_dir, workers, device, dtype)
        else:
            stats = [locate_shard(spec, cache_dir, parse_shard(shard), device, dtype, pararel_dir)]
    except (SpecError, ModelError, ShardError) as e:
        _fail(e)
    for s in stats:
        click.echo(f"shard {s['shard']} on {s['device']}: {s['assigned']} of {s['facts']} facts, "
                   f"{s['computed']} computed, {s['cached']} already cached, {s['corrupt']} corrupt entries replaced")
    click.echo(f"cache {cache_dir}")


@main.command()
def schema():
    """Print the spec's JSON schema."""
    from .spec import json_schema

    click.echo(json_schema())


@main.command("spec-from-pararel")
@click.option("--relation", required=True, help="PARAREL relation, e.g. P36")
@click.option("--facts", "n", type=click.IntRange(1), default=10, show_default=True, help="how many facts to update")
@click.option("--model", required=True, help="model name as in a spec (hub id, folder, .gguf, pypi:PACKAGE)")
@click.option("--pararel", "pararel_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="PARAREL directory (default: $KN_EDIT_PARAREL); written into the spec when given")
@click.option("--seed", type=int, default=0, show_default=True, help="seeds the choice of new targets")
@click.option("--known", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="a fact counts as known when the top-1 answer is right on more than this share of its prompts")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="write here (default: stdout)")
def spec_from_pararel(relation, n, model, pararel_dir, seed, known, output):
    """Write an update spec for facts of RELATION the model knows, with new targets from the same relation."""
    import yaml

    from . import models, pararel

    try:
        d = pararel.find_dir(pararel_dir, file="--pararel")
        src = models.resolve(model)
        tok, causal = models.load_tokenizer(src), models.is_causal(src)
        use = pararel.usable(tok, causal, pararel.templates(d, relation, "--relation"), pararel.facts(d, relation, "--relation"))
        m, _ = models.load_model(src)
    except (SpecError, ModelError) as e:
        _fail(e)
    chosen = pararel.pick(m, tok, causal, use, n, seed, known)
    if not chosen:
        _fail(ValueError(f"the model knows none of the {len(use.facts)} usable facts of {relation}"), 1)
    spec = {"model": model, **({"pararel": str(pararel_dir.resolve())} if pararel_dir else {}), "seed": seed,
            "edits": [{"update": {"relation": relation, "source": "pararel", **c}} for c in chosen]}
    text = (f"# {len(chosen)} facts of {relation} the model knows; usable: {len(use.templates)} templates, "
            f"{len(use.facts)} facts (skipped {use.skipped_templates} templates, {use.skipped_facts} facts)\n"
            + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    if output:
        output.write_text(text)
        click.echo(f"wrote {output} ({len(chosen)} edits)", err=True)
    else:
        click.echo(text, nl=False)
