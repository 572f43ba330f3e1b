"""The pipeline: spec -> model -> attribution -> neurons -> edits -> verification -> checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__, arch, card, checkpoint, edits, metrics, models, plan, report as reportmod, spec as specmod, verify
from .cache import Cache
from .locate import locate
from .neurons import choose_share, finish, shared_by

REPORT = "kn_edit_report.json"
NEURONS = "neurons.json"
SPEC_COPY = "kn_edit_spec.yaml"
SCHEMA_VERSION = 1  # neurons.json
REPORT_SCHEMA_VERSION = 2  # kn_edit_report.json (docs/report.md)


def pick_device(device: str) -> str:
    """auto: the GPU when there is one (cuda:LOCAL_RANK under torchrun), else the CPU."""
    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return "cuda" if rank is None else f"cuda:{int(rank) % torch.cuda.device_count()}"


DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Prepared:
    spec: specmod.Spec
    text: str
    source: models.Source
    tok: object
    causal: bool
    plans: list[plan.EditPlan]
    extra: list = field(default_factory=list)  # verify.facts: (relation, plan.Fact)


def prepare(spec_path, pararel_dir=None) -> Prepared:
    """Everything that can be checked without the model's weights (the tokenizer is loaded)."""
    spec, text = specmod.load(spec_path)
    src = models.resolve(spec.model.name, spec.model.revision)
    tok = models.load_tokenizer(src)
    causal = models.is_causal(src)
    plans = plan.make(spec, tok, causal, spec_path, pararel_dir)
    metrics.check_held_out(spec, plans, spec_path)
    return Prepared(spec, text, src, tok, causal, plans, metrics.plan_facts(spec, tok, causal, spec_path))


def located_groups(p, held_out: int):
    """The groups of facts located together. An update's fact (less its held-out prompts) and its
    relation_facts choose their shares separately."""
    if p.kind == "update":
        return [[metrics.located_part(p.facts[0], held_out)], p.facts[1:]]
    return [p.facts]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _locate_group(model, facts, method, dtype, bar, store=None):
    located = []
    for f in facts:
        if store is not None:
            located.append(store.locate(model, f, method, dtype))
        else:
            located.append(locate(model, f.subject, f.target, f.prompts, f.target_id, method, dtype))
        bar.update(len(f.prompts))
    share = choose_share(located, method.share, method.share_step, *method.target_neurons, method.adaptive_share)
    finish(located, share)
    return located


def _shown(p):
    """The facts whose prompts an edit is judged on: the updated fact, or all erased facts."""
    return p.facts[:1] if p.kind == "update" else p.facts


def _answers(seen: metrics.Seen, tok, p):
    """Report rows of an edit's prompts from predictions measured once for the metrics."""
    watch = lambda f: {"target": f.target_id, **({"new_target": p.new_id} if p.kind == "update" else {})}
    return [[verify.answer(*seen[pr.ids], tok, watch(f)) for pr in f.prompts] for f in _shown(p)]


def run(prep: Prepared, out: Path, *, force=False, device="cpu", dtype="float32", seed=None, cache=None) -> dict:
    """cache: a neuron cache folder (see cache.py); located neurons found there are not recomputed."""
    out = Path(out)
    checkpoint.check_free(out, force)
    spec, method = prep.spec, prep.spec.method
    seed = spec.seed if seed is None else seed
    seed_everything(seed)
    device = pick_device(device)
    compute_dtype = DTYPES[dtype]
    model, native = models.load_model(prep.source, device)
    model.requires_grad_(False)
    store = Cache(cache, prep.source.identity, dtype) if cache is not None else None

    n_prompts = sum(len(f.prompts) for p in prep.plans for f in p.facts)
    results = []
    with tqdm(total=n_prompts, desc="locating neurons", unit="prompt", disable=None) as bar:
        for p in prep.plans:
            groups = located_groups(p, prep.spec.verify.held_out)
            results.append([x for g in groups if g for x in _locate_group(model, g, method, compute_dtype, bar, store)])

    unk = getattr(prep.tok, "unk_token_id", None)
    applied = []
    for p, located in zip(prep.plans, results):
        if p.kind == "update":
            fact, others = located[0], located[1:]
            limit = method.relation_filter * len(others)
            dropped = sorted(n for n in fact.neurons if others and sum(n in o.neurons for o in others) > limit)
            neurons = [n for n in fact.neurons if n not in dropped]
            applied.append({"neurons": neurons, "dropped_shared": dropped, **_choose(model, method, p, fact, neurons, spec.verify.held_out)})
        else:
            applied.append({"neurons": shared_by(located, method.erase_min_facts)})

    # measured on the base model (the random-neuron control is undone before the real edits)
    vcfg = spec.verify
    probes = metrics.probes(prep.plans, prep.extra, vcfg.neighbours, vcfg.held_out)
    found = [metrics.Located(a["neurons"], [f.neurons for f in located], [f.coarse for f in located], how(a))
             for located, a in zip(results, applied)]
    base = metrics.evaluate_base(model, prep.plans, probes, found, method, unk, seed, vcfg.control_draws)

    for p, located, a in zip(prep.plans, results, applied):
        metrics.apply_edit(model, p, a["neurons"], method, unk, how(a), located[0].activation)

    seen_after = metrics.measure(model, probes)
    before = [_answers(base[0], prep.tok, p) for p in prep.plans]
    after = [_answers(seen_after, prep.tok, p) for p in prep.plans]
    report = _report(prep, model, results, applied, before, after, seed, device, dtype)
    per_edit, agg = metrics.finish(probes, found, base[0], seen_after, *base[1:])
    add_metrics(report, per_edit, agg, vcfg)
    neurons_doc = _neurons_doc(prep, results, applied)

    with checkpoint.staged(out, force) as tmp:
        checkpoint.save_model(model, prep.tok, native, tmp)
        (tmp / SPEC_COPY).write_text(prep.text)
        (tmp / NEURONS).write_text(json.dumps(neurons_doc, indent=1) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
        reportmod.write(tmp, report, neurons_doc, prep.text)
        card.write(tmp, report, prep.text, model_name=out.name)
    return report


def add_metrics(report: dict, per_edit: list[dict], agg: dict, verify_cfg) -> None:
    """Metrics, controls, gates and the status that follows from them (docs/report.md)."""
    for e, m in zip(report["edits"], per_edit):
        e["metrics"], e["control"] = m["metrics"], m["control"]
        h = verify_cfg.held_out if e["kind"] == "update" else 0
        e["held_out"] = h
        for j, r in enumerate(e["prompts"]):
            r["held_out"] = j >= len(e["prompts"]) - h
    report["metrics"] = agg
    report["gates"] = metrics.gates(verify_cfg, agg)
    report["status"] = metrics.status(report["gates"])


HOW = ("rule", "lambda1", "lambda2", "sign_aware", "scale", "norm_cap")


def how(applied: dict) -> dict | None:
    """How an update was written (rule, lambdas, sign awareness, scale); None for an erase."""
    return {k: applied[k] for k in HOW} if "rule" in applied else None


def _choose(model, method, p, fact, neurons, held_out: int) -> dict:
    """The update's rule and scale. A searched scale is chosen on the base model, on the prompts used
    to locate (never the held-out ones); the weights are left as they were."""
    r = edits.resolve(method, arch.arch_of(model).gated)
    done = {"rule": r.rule, "lambda1": r.lambda1, "lambda2": r.lambda2, "sign_aware": r.sign_aware, "norm_cap": r.cap}
    if not r.search:
        return {**done, "scale": 1.0, "scale_searched": False}
    ds = edits.deltas(model, neurons, p.facts[0].target_id, p.new_id, r.rule, r.lambda1, r.lambda2,
                      fact.activation if r.sign_aware else None)
    grid = edits.grid(method.scale_min, method.scale_max, method.scale_factor)
    with edits.restored(model, neurons):
        s = edits.search_scale(model, ds, metrics.located_part(p.facts[0], held_out).prompts, p.new_id, grid,
                               method.scale_need, r.cap)
    return {**done, "scale": s.scale, "scale_searched": True, "scale_reached": s.ok}


def _neuron_list(located, neurons):
    return [{"layer": l, "index": i, "score": round(located.score.get((l, i), 0.0), 8),
             "activation": round(located.activation.get((l, i), 0.0), 8)} for l, i in neurons]


def _neurons_doc(prep, results, applied):
    edits_doc = []
    for p, located, app in zip(prep.plans, results, applied):
        edits_doc.append({
            "kind": p.kind,
            "relation": p.relation,
            "edited": [[l, i] for l, i in app["neurons"]],
            **({"written": how(app)} if how(app) else {}),
            "facts": [{"subject": f.subject, "target": f.target, "share": f.share, "prompts": f.prompts,
                       "coarse_counts": [len(c) for c in f.coarse], "coarse": [[list(n) for n in c] for c in f.coarse],
                       "neurons": _neuron_list(f, f.neurons)} for f in located],
        })
    return {"schema_version": SCHEMA_VERSION, "edits": edits_doc}


def _report(prep, model, results, applied, before, after, seed, device, dtype):
    edits_rep = []
    changed = set()
    for p, located, app, b, a in zip(prep.plans, results, applied, before, after):
        changed.update(arch.value_param_name(model, l) for l, _ in app["neurons"])
        rows, correct_before, correct_after = [], [], []
        for f, fb, fa in zip(_shown(p), b, a):
            for pr, x, y in zip(f.prompts, fb, fa):
                rows.append({"subject": f.subject, "target": f.target, "prompt": pr.text, "before": x, "after": y})
                correct_before.append(x["top1_id"] == f.target_id)
                correct_after.append(y["top1_id"] == f.target_id)
        e = {"kind": p.kind, "relation": p.relation, "where": p.where, "neurons": len(app["neurons"]),
             "share": located[0].share}
        if p.kind == "update":
            e.update(subject=p.facts[0].subject, target=p.facts[0].target, new_target=p.new_target,
                     dropped_shared=len(app["dropped_shared"]),
                     **{k: app[k] for k in (*HOW, "scale_searched", "scale_reached") if k in app},
                     change_rate=verify.rate(r["after"]["top1_id"] != r["before"]["top1_id"] for r in rows),
                     success_rate=verify.rate(r["after"]["top1_id"] == p.new_id for r in rows))
        else:
            e.update(facts=len(p.facts), accuracy_before=verify.rate(correct_before), accuracy_after=verify.rate(correct_after))
        if p.skipped is not None:
            e["skipped"] = p.skipped
        e["prompts"] = rows
        edits_rep.append(e)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "kn_edit_version": __version__,
        "status": "built",
        "base_model": prep.source.identity,
        "spec_sha256": hashlib.sha256(prep.text.encode()).hexdigest(),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "method": prep.spec.method.model_dump(mode="json"),
        "changed_tensors": sorted(changed),
        "edits": edits_rep,
    }
