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
def build(spec, out, force, device, dtype, seed):
    """Build the edited checkpoint of SPEC into OUT (default: the bundled demo spec into out/demo)."""
    from .build import prepare, run
    from .show import summary

    spec = spec or demo_spec()
    out = out or Path("out") / spec.stem
    try:
        prep = prepare(spec)
        report = run(prep, out, force=force, device=device, dtype=dtype, seed=seed)
    except (SpecError, ModelError, OutputExists) as e:
        _fail(e)
    summary(report)
    _verdict(report, f"wrote {out}")


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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
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
def schema():
    """Print the spec's JSON schema."""
    from .spec import json_schema

    click.echo(json_schema())
