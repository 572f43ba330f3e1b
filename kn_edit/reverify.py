"""Recompute a checkpoint's metrics against its base model and apply the gates (`kn-edit verify`).

The base model and the edits come from the checkpoint's spec copy, the neurons from its
neurons.json; the gates and the metric settings (neighbours, control_draws, verify.facts)
from SPEC when given, else from the copy. held_out always comes from the copy: it decided
which prompts were used to locate."""
from __future__ import annotations

import json
from pathlib import Path

from . import metrics, models, plan, spec as specmod
from .build import NEURONS, REPORT, SPEC_COPY, add_metrics, pick_device, seed_everything
from .models import ModelError


def located_from_doc(doc: dict) -> list[metrics.Located]:
    pair = lambda xs: [(int(l), int(i)) for l, i in xs]
    return [metrics.Located(pair(e["edited"]), [pair((n["layer"], n["index"]) for n in f["neurons"]) for f in e["facts"]],
                            [[pair(c) for c in f.get("coarse", [])] for f in e["facts"]], e.get("written")) for e in doc["edits"]]


def run(folder, spec_path=None, device="cpu") -> dict:
    folder = Path(folder)
    for name in (REPORT, NEURONS, SPEC_COPY):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} is not a kn-edit checkpoint: {name} is missing")
    built = json.loads((folder / REPORT).read_text())
    spec, _ = specmod.load(folder / SPEC_COPY)
    vcfg = spec.verify
    if spec_path is not None:
        override, _ = specmod.load(spec_path)
        vcfg = override.verify.model_copy(update={"held_out": spec.verify.held_out})
    seed = built.get("seed", spec.seed)
    seed_everything(seed)
    device = pick_device(device)

    src = models.resolve(spec.model.name, spec.model.revision)
    tok = models.load_tokenizer(src)
    causal = models.is_causal(src)
    plans = plan.make(spec, tok, causal, folder / SPEC_COPY)
    extra = metrics.plan_facts(spec.model_copy(update={"verify": vcfg}), tok, causal, spec_path or folder / SPEC_COPY)
    base, _ = models.load_model(src, device)
    base.requires_grad_(False)
    if src.identity != built["base_model"]:
        raise ModelError(f"the base model differs from the one {folder} was built from: "
                         f"{src.identity} != {built['base_model']}")
    found = located_from_doc(json.loads((folder / NEURONS).read_text()))
    probes = metrics.probes(plans, extra, vcfg.neighbours, vcfg.held_out)
    b = metrics.evaluate_base(base, plans, probes, found, spec.method, getattr(tok, "unk_token_id", None), seed, vcfg.control_draws)
    del base
    edited, _ = models.load_model(models.resolve(str(folder)), device)
    per_edit, agg = metrics.finish(probes, found, b[0], metrics.measure(edited, probes), *b[1:])

    report = {k: v for k, v in built.items() if k not in ("metrics", "gates", "status")}
    report["edits"] = [dict(e) for e in built["edits"]]
    add_metrics(report, per_edit, agg, vcfg)
    report["verified_from"] = str(folder)
    return report
