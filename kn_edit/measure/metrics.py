"""The paper's metrics as plain formulas over measured answers (Dai et al., 2022, sec. 5).

Measured on the same prompts before and after the edits:
- update: change rate, success rate, generalization (held-out prompts), mean shift of p(t)
  and p(t'), perplexity exp(mean -log p(gold)) on neighbour facts of the same relation (intra)
  and of other relations (inter), before and after;
- erase: top-1 accuracy and perplexity on the erased relation's facts and on other relations';
- suppression / amplification (measure/evaluate.py) and neuron statistics (the paper's Table 2).
Relative changes are after / before - 1. "Seen" answers: prompt ids -> ({k: the k-token answer},
{target ids: p}). A target of k tokens t: the k-token answer is the greedy continuation's first k
tokens (a masked LM: the top token at each of k masks); the model answers t when that is t;
p(t) is the sequence probability (teacher forcing); perplexities are per token,
exp(sum -log p(t) / sum k). One-token targets give the paper's top-1 and p(t).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations

from ..spec import GATE_METRICS

Seen = dict  # prompt ids -> ({k: k-token answer}, {target ids: probability})


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def perplexity(probs, lengths=None) -> float | None:
    """exp(mean of -log p per token) over the gold probabilities of a set of prompts; lengths:
    the golds' numbers of tokens (all 1 when not given)."""
    nll = [-math.log(max(p, 1e-45)) for p in probs]
    n = len(nll) if lengths is None else sum(lengths)
    return math.exp(sum(nll) / n) if nll else None


def _ppl(rows) -> float | None:
    rows = list(rows)
    return perplexity((ps[f.target_ids] for f, _, _, ps in rows), [len(f.target_ids) for f, _, _, _ in rows])


def rel_change(before, after) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return after / before - 1.0


def jaccard(a, b) -> float:
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def consistency(coarse_sets) -> float | None:
    """Mean pairwise overlap of the neuron sets of a fact's prompts."""
    return mean(jaccard(a, b) for a, b in combinations(coarse_sets, 2))


def _rows(facts, seen):
    for f in facts:
        for p in f.prompts:
            top, ps = seen[p.ids]
            yield f, p, top, ps


def says(top: dict, ids: tuple) -> bool:
    """Whether the answers `top` ({k: k-token answer}) start with the target ids."""
    return top[len(ids)] == ids


def update_metrics(pr, before: Seen, after: Seen) -> dict:
    """change: the answer of the old target's length differs from before (for a known fact: it no
    longer starts with the old target); success: it starts with the whole new target."""
    f = pr.facts[0]
    b = list(_rows(pr.facts, before))
    a = list(_rows(pr.facts, after))
    held = [k in pr.held[0] for k in range(len(f.prompts))]
    success = [says(x[2], pr.new_ids) for x in a]
    k = len(f.target_ids)
    m = {
        "change_rate": mean(x[2][k] != y[2][k] for x, y in zip(b, a)),
        "success_rate": mean(success),
        "efficacy": mean(s for s, h in zip(success, held) if not h),
        "generalization": mean(s for s, h in zip(success, held) if h),
        "p_target_shift": mean(y[3][f.target_ids] - x[3][f.target_ids] for x, y in zip(b, a)),
        "p_new_shift": mean(y[3][pr.new_ids] - x[3][pr.new_ids] for x, y in zip(b, a)),
    }
    return m | _neighbour_metrics(pr.intra, pr.inter, before, after)


def kept(facts, before: Seen, after: Seen) -> float | None:
    """Share of the facts' prompts whose answer (of the fact's target length) did not change."""
    k = lambda f: len(f.target_ids)
    return mean(before[p.ids][0][k(f)] == after[p.ids][0][k(f)] for f in facts for p in f.prompts)


def right_kept(facts, before: Seen, after: Seen) -> float | None:
    """Of the facts' prompts whose answer started with the fact's target before, the share that still
    does (a change from a wrong answer to the right one counts against `kept`, not against this)."""
    return mean(says(after[p.ids][0], f.target_ids) for f in facts for p in f.prompts if says(before[p.ids][0], f.target_ids))


def _acc_ppl(facts, seen):
    rows = list(_rows(facts, seen))
    return mean(says(top, f.target_ids) for f, _, top, _ in rows), _ppl(rows)


def erase_metrics(pr, before: Seen, after: Seen) -> dict:
    m = {}
    for name, facts in (("", pr.facts), ("other_", pr.inter)):
        (ab, pb), (aa, pa) = _acc_ppl(facts, before), _acc_ppl(facts, after)
        m.update(
            {
                f"{name}accuracy_before": ab,
                f"{name}accuracy_after": aa,
                f"{name}accuracy_change": None if ab is None or aa is None else aa - ab,
                f"{name}ppl_before": pb,
                f"{name}ppl_after": pa,
                f"{name}ppl_change": rel_change(pb, pa),
            }
        )
    return m


ERASE_HOLDS = 0.1  # an erase holds when its relation answers at most this share of its prompts


def failed(kind: str, m: dict | None) -> bool | None:
    """Whether an edit did not hold on its own prompts: an update whose located prompts do not all
    answer t', an erase whose relation still answers more than ERASE_HOLDS of them."""
    if m is None:
        return None
    if kind == "update":
        return m["efficacy"] is not None and m["efficacy"] < 1.0
    return m["accuracy_after"] is not None and m["accuracy_after"] > ERASE_HOLDS


def edit_metrics(pr, before: Seen, after: Seen) -> dict:
    return update_metrics(pr, before, after) if pr.kind == "update" else erase_metrics(pr, before, after)


def average(dicts: list[dict]) -> dict:
    keys = dicts[0].keys() if dicts else []
    return {k: mean(d[k] for d in dicts if d[k] is not None) for k in keys}


def neuron_stats(groups: list[tuple[str, list[list]]]) -> dict:
    """groups: (relation, [neurons of each located fact]). Table 2 of the paper: neurons per
    fact, layer distribution, mean number of shared neurons between two facts of the same
    relation and of different relations."""
    facts = [(rel, {tuple(n) for n in ns}) for rel, fs in groups for ns in fs]
    layers = Counter(l for _, ns in facts for l, _ in ns)
    same = [len(a & b) for (r1, a), (r2, b) in combinations(facts, 2) if r1 == r2]
    other = [len(a & b) for (r1, a), (r2, b) in combinations(facts, 2) if r1 != r2]
    return {
        "neurons_per_fact": mean(len(ns) for _, ns in facts),
        "layers": {str(l): c for l, c in sorted(layers.items())},
        "overlap_same_relation": mean(same),
        "overlap_other_relation": mean(other),
    }


def _agg(per_edit: list[tuple[str, dict | None]]) -> dict:
    ups = [m for k, m in per_edit if k == "update" and m is not None]
    ers = [m for k, m in per_edit if k == "erase" and m is not None]
    out = {}
    for prefix, group in (("", ups), ("erase_", ers)):
        for key in group[0].keys() if group else []:
            if key in ("suppression", "amplification", "consistency", "neurons"):
                continue
            out[prefix + key] = mean(g[key] for g in group if g[key] is not None)
    both = ups + ers
    for key in ("suppression", "amplification", "consistency"):
        out[key] = mean(g[key] for g in both if g.get(key) is not None)
    return out


def neighbours(edits) -> tuple[list, list]:
    """The batch's neighbour facts, each once: of the relations the updates edit (intra), and of
    relations no edit touches (inter)."""
    edited = {e.relation for e in edits}
    seen, intra, inter = set(), [], []
    for e in edits:
        if e.kind != "update":
            continue
        for f in e.probe.intra + e.probe.inter:
            key = (f.relation, f.subject)
            if key in seen:
                continue
            seen.add(key)
            (intra if f.relation in edited else inter).append(f)
    return intra, inter


def _neighbour_metrics(intra, inter, before: Seen, after: Seen) -> dict:
    out = {}
    for name, facts in (("intra", intra), ("inter", inter)):
        b, a = _ppl(_rows(facts, before)), _ppl(_rows(facts, after))
        out |= {f"{name}_kept": kept(facts, before, after), f"{name}_right_kept": right_kept(facts, before, after),
                f"{name}_ppl_before": b, f"{name}_ppl_after": a, f"{name}_ppl_change": rel_change(b, a)}  # fmt: skip
    return out


def aggregate(edits, before: Seen, after: Seen, controls: list[Seen]) -> dict:
    """The batch's aggregate metrics: means over update edits, over erase edits (prefixed erase_),
    except the neighbour metrics, which are over the batch's neighbour facts taken together (each
    once: same-relation neighbours of any update are intra, facts of relations no edit touches are
    inter); the same for the control; and the neuron statistics."""
    agg = _agg([(e.kind, e.result.metrics) for e in edits])
    has_control = any(e.result.control for e in edits)
    ctrl = _agg([(e.kind, e.result.control) for e in edits]) if has_control else {}
    ctrl.pop("consistency", None)
    if any(e.kind == "update" for e in edits):
        intra, inter = neighbours(edits)
        agg |= _neighbour_metrics(intra, inter, before, after)
        if has_control:
            ctrl |= average([_neighbour_metrics(intra, inter, before, c) for c in controls])
    agg["edits_failed"] = sum(bool(failed(e.kind, e.result.metrics)) for e in edits)
    if has_control:
        ctrl["edits_failed"] = mean(sum(bool(failed(e.kind, r)) for e in edits for r in e.result.control_runs[k : k + 1])
                                    for k in range(max(len(e.result.control_runs) for e in edits)))  # fmt: skip
    for name in GATE_METRICS:
        agg.setdefault(name, None)
    s, c = agg.get("success_rate"), ctrl.get("success_rate")
    agg["success_over_control"] = None if s is None or c is None else s - c
    groups = [(e.relation, [f.neurons for f in e.located]) for e in edits]
    return {**agg, "neurons": neuron_stats(groups), "control": ctrl}
