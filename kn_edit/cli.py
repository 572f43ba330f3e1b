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


@click.group()
@click.version_option(__version__, prog_name="kn-edit")
def main():
    """Knowledge-neuron edits from a YAML spec to a verified checkpoint."""


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
def validate(spec):
    """Check SPEC: schema, templates, and that targets are single tokens (loads the tokenizer only)."""
    from .build import prepare

    try:
        prep = prepare(spec)
    except (SpecError, ModelError) as e:
        _fail(e)
    n = sum(len(f.prompts) for p in prep.plans for f in p.facts)
    click.echo(f"{spec}: ok ({len(prep.plans)} edits, {n} prompts, model {prep.spec.model.name})")


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="replace OUT if it exists (only once the new checkpoint is complete)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="compute dtype of attribution (autocast); edits and saved weights keep the model's own dtype")
@click.option("--seed", type=int, default=None, help="overrides the spec's seed")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="neuron cache folder  [default: $KN_EDIT_CACHE/neurons or ~/.cache/kn_edit/neurons]")
@click.option("--no-cache", is_flag=True, help="locate every fact afresh and store nothing")
def build(spec, out, force, device, dtype, seed, cache_dir, no_cache):
    """Build the edited checkpoint of SPEC into OUT (default: the bundled demo spec into out/demo)."""
    from .build import prepare, run
    from .cache import default_dir as default_cache_dir
    from .show import summary

    spec = spec or demo_spec()
    out = out or Path("out") / spec.stem
    try:
        prep = prepare(spec)
        cache = None if no_cache else (cache_dir or default_cache_dir())
        report = run(prep, out, force=force, device=device, dtype=dtype, seed=seed, cache=cache)
    except (SpecError, ModelError, OutputExists) as e:
        _fail(e)
    summary(report)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--shard", default=None, metavar="i/N",
              help="locate only facts j with j mod N = i  [default: RANK/WORLD_SIZE from torchrun, else all]")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: spread the shards over a Ray cluster (RAY_ADDRESS) or a local one")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="ray: number of shards  [default: the cluster's GPUs, else its nodes]")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="neuron cache folder, shared by all shards  [default: $KN_EDIT_CACHE/neurons or ~/.cache/kn_edit/neurons]")
@click.option("--device", default="auto", show_default=True, help="auto (cuda:LOCAL_RANK when there is a GPU), cpu, cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="compute dtype of attribution; give build the same one")
def locate(spec, shard, executor, workers, cache_dir, device, dtype):
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
            stats = [locate_shard(spec, cache_dir, parse_shard(shard), device, dtype)]
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
