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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="compute dtype of attribution (autocast); edits and saved weights keep the model's own dtype")
@click.option("--seed", type=int, default=None, help="overrides the spec's seed")
@PARAREL_OPT
def build(spec, out, force, device, dtype, seed, pararel_dir):
    """Build the edited checkpoint of SPEC into OUT (default: the bundled demo spec into out/demo)."""
    from .build import prepare, run
    from .show import summary

    spec = spec or demo_spec()
    out = out or Path("out") / spec.stem
    try:
        prep = prepare(spec, pararel_dir)
        report = run(prep, out, force=force, device=device, dtype=dtype, seed=seed)
    except (SpecError, ModelError, OutputExists) as e:
        _fail(e)
    summary(report)
    click.echo(f"wrote {out}")


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
