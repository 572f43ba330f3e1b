"""The paper's metrics, a random-neuron control for each edit, and CI gates.

Measured on the same prompts before and after the edits (Dai et al., 2022, sec. 5):
- update: change rate, success rate, generalization (held-out prompts), mean shift of p(t)
  and p(t'), perplexity exp(mean -log p(gold)) on neighbour facts of the same relation (intra)
  and of other relations (inter), before and after;
- erase: top-1 accuracy and perplexity on the erased relation's facts and on other relations';
- suppression / amplification: relative change of p(gold) when a fact's neurons are set to 0 /
  doubled at the answer position (on the base model);
- the control: per edit, as many random neurons from the same layers, drawn from the spec's
  seed, edited with the same rule; every metric is computed for it the same way.
Relative changes are after / before - 1.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations

import torch

from . import arch, attribution, edits, verify
from .plan import Fact, _fact
from .prompts import Prompt
from .spec import GATE_METRICS, SpecError, gates_of, parse_gate

Neuron = tuple[int, int]
Seen = dict  # prompt ids -> (top-1 id, {token id: probability})


# ---- plain formulas -------------------------------------------------------------------

def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def perplexity(probs) -> float | None:
    """exp(mean of -log p) over the gold probabilities of a set of prompts."""
    m = mean(-math.log(max(p, 1e-45)) for p in probs)
    return None if m is None else math.exp(m)


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


# ---- what each edit is judged on -----------------------------------------------------

@dataclass
class Probe:
    """The prompts one edit is measured on. `facts` are the edited/erased facts."""

    kind: str
    relation: str
    facts: list[Fact]
    held: list[set[int]]  # per fact: indices of held-out prompts
    intra: list[Fact] = field(default_factory=list)  # update: same relation
    inter: list[Fact] = field(default_factory=list)  # other relations
    new_id: int | None = None


def plan_facts(spec, tok, causal, file="<spec>") -> list[tuple[str, Fact]]:
    """verify.facts encoded for this tokenizer: (relation, fact)."""
    problems, out = [], []
    for i, g in enumerate(spec.verify.facts):
        for j, f in enumerate(g.facts):
            texts = [t.replace("[X]", f.subject) for t in g.templates]
            pf = _fact(tok, causal, f.subject, f.target, texts, f"verify.facts[{i}].facts[{j}]", problems)
            if pf is not None:
                out.append((g.relation, pf))
    if problems:
        raise SpecError(file, problems)
    return out


def check_held_out(spec, plans, file="<spec>") -> None:
    h = spec.verify.held_out
    problems = [("verify.held_out", f"{p.where} has {len(p.facts[0].prompts)} prompts; held_out {h} must leave at least one for locating")
                for p in plans if p.kind == "update" and h >= len(p.facts[0].prompts)]
    if problems:
        raise SpecError(file, problems)


def located_part(fact: Fact, held_out: int) -> Fact:
    """The prompts used to locate: all but the last held_out."""
    return Fact(fact.subject, fact.target, fact.target_id, fact.prompts[: len(fact.prompts) - held_out])


def probes(plans, extra: list[tuple[str, Fact]], neighbours: int, held_out: int) -> list[Probe]:
    """Neighbours are taken in spec order from every fact the spec names (relation_facts,
    erased facts, verify.facts), leaving out facts an update edits and relations an erase
    edits (they are meant to change); the first `neighbours` of the same relation are intra,
    the first `neighbours` of other relations inter."""
    edited = {(p.relation, p.facts[0].subject) for p in plans if p.kind == "update"}
    erased = {p.relation for p in plans if p.kind == "erase"}
    pool, seen = [], set()
    for rel, f in [(p.relation, f) for p in plans for f in p.facts] + list(extra):
        key = (rel, f.subject)
        if key in seen or key in edited or rel in erased:
            continue
        seen.add(key)
        pool.append((rel, f))
    out = []
    for p in plans:
        inter = [f for r, f in pool if r != p.relation][:neighbours]
        if p.kind == "update":
            n = len(p.facts[0].prompts)
            intra = [f for r, f in pool if r == p.relation][:neighbours]
            out.append(Probe("update", p.relation, p.facts[:1], [set(range(n - held_out, n))], intra, inter, p.new_id))
        else:
            out.append(Probe("erase", p.relation, p.facts, [set() for _ in p.facts], [], inter))
    return out


# ---- measuring ----------------------------------------------------------------------

def _wanted(probes_: list[Probe]) -> dict[Prompt, set[int]]:
    want = defaultdict(set)
    for pr in probes_:
        for f in pr.facts + pr.intra + pr.inter:
            for p in f.prompts:
                want[p].add(f.target_id)
                if pr.new_id is not None and f in pr.facts:
                    want[p].add(pr.new_id)
    return want


@torch.no_grad()
def measure(model, probes_: list[Probe]) -> Seen:
    seen = {}
    for p, ids in _wanted(probes_).items():
        probs = verify.predict(model, p)
        seen[p.ids] = (int(probs.argmax()), {i: float(probs[i]) for i in sorted(ids)})
    return seen


def _by_layer(neurons) -> dict[int, list[int]]:
    out = defaultdict(list)
    for l, i in neurons:
        out[int(l)].append(int(i))
    return out


@torch.no_grad()
def scaled_p(model, prompt: Prompt, neurons, factor: float, target: int) -> float:
    """p(target) with the neurons' activations at the answer position multiplied by factor."""
    def fn(idx):
        def scale(x):
            x = x.clone()
            x[:, prompt.pos, idx] *= factor
            return x
        return scale

    with contextlib.ExitStack() as stack:
        for layer, idx in _by_layer(neurons).items():
            stack.enter_context(attribution.patched(model, layer, fn(idx)))
        return float(verify.predict(model, prompt)[target])


def intervention(model, fact: Fact, neurons, before: Seen) -> tuple[float | None, float | None]:
    """(suppression, amplification): mean relative change of p(gold) over the fact's prompts."""
    if not neurons:
        return None, None
    out = []
    for factor in (0.0, 2.0):
        out.append(mean(rel_change(before[p.ids][1][fact.target_id], scaled_p(model, p, neurons, factor, fact.target_id))
                        for p in fact.prompts))
    return out[0], out[1]


# ---- metrics from measurements ----------------------------------------------------------

def _rows(facts, seen):
    for f in facts:
        for p in f.prompts:
            top, ps = seen[p.ids]
            yield f, p, top, ps


def update_metrics(pr: Probe, before: Seen, after: Seen) -> dict:
    f = pr.facts[0]
    b = list(_rows(pr.facts, before))
    a = list(_rows(pr.facts, after))
    held = [k in pr.held[0] for k in range(len(f.prompts))]
    success = [x[2] == pr.new_id for x in a]
    ppl = lambda facts, seen: perplexity(ps[f_.target_id] for f_, _, _, ps in _rows(facts, seen))
    m = {
        "change_rate": mean(x[2] != y[2] for x, y in zip(b, a)),
        "success_rate": mean(success),
        "generalization": mean(s for s, h in zip(success, held) if h),
        "p_target_shift": mean(y[3][f.target_id] - x[3][f.target_id] for x, y in zip(b, a)),
        "p_new_shift": mean(y[3][pr.new_id] - x[3][pr.new_id] for x, y in zip(b, a)),
    }
    for name, facts in (("intra", pr.intra), ("inter", pr.inter)):
        m[f"{name}_ppl_before"], m[f"{name}_ppl_after"] = ppl(facts, before), ppl(facts, after)
        m[f"{name}_ppl_change"] = rel_change(m[f"{name}_ppl_before"], m[f"{name}_ppl_after"])
    return m


def _acc_ppl(facts, seen):
    rows = list(_rows(facts, seen))
    return mean(top == f.target_id for f, _, top, _ in rows), perplexity(ps[f.target_id] for f, _, _, ps in rows)


def erase_metrics(pr: Probe, before: Seen, after: Seen) -> dict:
    m = {}
    for name, facts in (("", pr.facts), ("other_", pr.inter)):
        (ab, pb), (aa, pa) = _acc_ppl(facts, before), _acc_ppl(facts, after)
        m.update({f"{name}accuracy_before": ab, f"{name}accuracy_after": aa,
                  f"{name}accuracy_change": None if ab is None or aa is None else aa - ab,
                  f"{name}ppl_before": pb, f"{name}ppl_after": pa, f"{name}ppl_change": rel_change(pb, pa)})
    return m


def edit_metrics(pr: Probe, before: Seen, after: Seen) -> dict:
    return update_metrics(pr, before, after) if pr.kind == "update" else erase_metrics(pr, before, after)


# ---- the random-neuron control ----------------------------------------------------------

def draw(neurons, n_per_layer: int, rng: random.Random, exclude=()) -> list[Neuron]:
    """As many neurons per layer as `neurons` has, drawn uniformly from that layer without the
    excluded (the real) ones."""
    exclude = {tuple(x) for x in exclude}
    out = []
    for layer, idx in sorted(_by_layer(neurons).items()):
        choices = [i for i in range(n_per_layer) if (layer, i) not in exclude]
        out += [(layer, i) for i in rng.sample(choices, len(idx))]
    return sorted(out)


def rng_for(seed: int, edit: int, draw_no: int, what: str = "edit") -> random.Random:
    return random.Random(f"kn-edit-control:{seed}:{edit}:{draw_no}:{what}")


def _mean_activation(model, fact: Fact, neurons) -> dict:
    acts = mean(attribution.clean_activations(model, p)[0] for p in fact.prompts)
    return {(l, i): float(acts[l, i]) for l, i in neurons}


def apply_edit(model, plan, neurons, method, unk, how: dict | None, activation: dict | None = None) -> None:
    """One edit, written the way `how` says (rule, lambdas, sign awareness, scale: what build chose
    for the real edit). Without `activation` the signs come from the fact's prompts (the control)."""
    if plan.kind == "update":
        signs = None
        if how["sign_aware"]:
            signs = activation if activation is not None else _mean_activation(model, plan.facts[0], neurons)
        edits.update(model, neurons, plan.facts[0].target_id, plan.new_id, how["rule"], how["lambda1"], how["lambda2"],
                     signs, how["scale"], how.get("norm_cap"))
    else:
        edits.erase(model, neurons, method.erase_value, unk)


def control_neurons(model, edited, seed: int, draws: int) -> list[list[list[Neuron]]]:
    """[draw][edit] -> random neurons matched to edited[edit]."""
    n = arch.shape(model)[1]
    return [[draw(e, n, rng_for(seed, k, d), e) for k, e in enumerate(edited)] for d in range(draws)]


def control(model, plans, probes_, located: list["Located"], before: Seen, method, unk, seed: int, draws: int) -> list[list[dict]]:
    """Per draw, per edit: the metrics of the spec's edits done on random neurons instead,
    applied in spec order like the real ones, on the base model (restored afterwards)."""
    out = []
    for sets in control_neurons(model, [l.edited for l in located], seed, draws):
        with edits.restored(model, [x for s in sets for x in s]):
            for p, s, loc in zip(plans, sets, located):
                apply_edit(model, p, s, method, unk, loc.how)
            after = measure(model, probes_)
        out.append([edit_metrics(pr, before, after) for pr in probes_])
    return out


def average(dicts: list[dict]) -> dict:
    keys = dicts[0].keys() if dicts else []
    return {k: mean(d[k] for d in dicts if d[k] is not None) for k in keys}


# ---- neuron statistics ------------------------------------------------------------------

def neuron_stats(groups: list[tuple[str, list[list[Neuron]]]]) -> dict:
    """groups: (relation, [neurons of each located fact]). Table 2 of the paper: neurons per
    fact, layer distribution, mean number of shared neurons between two facts of the same
    relation and of different relations."""
    facts = [(rel, {tuple(n) for n in ns}) for rel, fs in groups for ns in fs]
    layers = Counter(l for _, ns in facts for l, _ in ns)
    same = [len(a & b) for (r1, a), (r2, b) in combinations(facts, 2) if r1 == r2]
    other = [len(a & b) for (r1, a), (r2, b) in combinations(facts, 2) if r1 != r2]
    return {"neurons_per_fact": mean(len(ns) for _, ns in facts), "layers": {str(l): c for l, c in sorted(layers.items())},
            "overlap_same_relation": mean(same), "overlap_other_relation": mean(other)}


# ---- everything together ----------------------------------------------------------------

@dataclass
class Located:
    """What the metrics need from localization, per edit (build has it; verify reads neurons.json)."""

    edited: list[Neuron]  # the neurons the edit wrote
    fact_neurons: list[list[Neuron]]  # per located fact (update: edited fact, then relation_facts)
    coarse: list[list[list[Neuron]]]  # per located fact, per prompt
    how: dict | None = None  # update: rule, lambdas, sign awareness and scale the edit was written with


def evaluate_base(model, plans, probes_, located: list[Located], method, unk, seed, draws):
    """Everything measured on the base model: before, suppression/amplification (edit and
    control), and the control edits. Leaves the model as it found it."""
    before = measure(model, probes_)
    inter, inter_ctrl = [], []
    n = arch.shape(model)[1]
    for k, (pr, loc) in enumerate(zip(probes_, located)):
        real, rand = [], []
        for j, f in enumerate(pr.facts):
            ns = loc.fact_neurons[j]
            real.append(intervention(model, f, ns, before))
            rand.append(mean_pairs([intervention(model, f, draw(ns, n, rng_for(seed, k, d, f"fact{j}"), ns), before)
                                    for d in range(draws)]))
        inter.append(mean_pairs(real))
        inter_ctrl.append(mean_pairs(rand))
    ctrl = control(model, plans, probes_, located, before, method, unk, seed, draws)
    return before, inter, inter_ctrl, ctrl


def mean_pairs(pairs):
    return tuple(mean(x[i] for x in pairs if x[i] is not None) for i in range(2)) if pairs else (None, None)


def finish(probes_, located: list[Located], before: Seen, after: Seen, inter, inter_ctrl, ctrl) -> tuple[list[dict], dict]:
    """(per edit: {"metrics", "control"}, aggregate)."""
    per_edit = []
    for k, (pr, loc) in enumerate(zip(probes_, located)):
        m = edit_metrics(pr, before, after)
        m["suppression"], m["amplification"] = inter[k]
        facts = loc.coarse[:1] if pr.kind == "update" else loc.coarse
        m["consistency"] = mean(c for c in (consistency(s) for s in facts) if c is not None)
        m["neurons"] = len(loc.edited)
        c = average([d[k] for d in ctrl]) if ctrl else None
        if c is not None:
            c["suppression"], c["amplification"] = inter_ctrl[k]
            c["neurons"] = len(loc.edited)
        per_edit.append({"metrics": m, "control": c})
    return per_edit, aggregate(probes_, per_edit, located)


def _agg(per_edit, kind_of, which):
    ups = [e[which] for e, k in zip(per_edit, kind_of) if k == "update" and e[which] is not None]
    ers = [e[which] for e, k in zip(per_edit, kind_of) if k == "erase" and e[which] is not None]
    out = {}
    for prefix, group in (("", ups), ("erase_", ers)):
        for key in (group[0].keys() if group else []):
            if key in ("suppression", "amplification", "consistency", "neurons"):
                continue
            out[prefix + key] = mean(g[key] for g in group if g[key] is not None)
    both = ups + ers
    for key in ("suppression", "amplification", "consistency"):
        out[key] = mean(g[key] for g in both if g.get(key) is not None)
    return out


def aggregate(probes_, per_edit, located) -> dict:
    kinds = [pr.kind for pr in probes_]
    agg = _agg(per_edit, kinds, "metrics")
    ctrl = _agg(per_edit, kinds, "control") if any(e["control"] for e in per_edit) else {}
    ctrl.pop("consistency", None)
    for name in GATE_METRICS:
        agg.setdefault(name, None)
    s, c = agg.get("success_rate"), ctrl.get("success_rate")
    agg["success_over_control"] = None if s is None or c is None else s - c
    groups = [(pr.relation, loc.fact_neurons) for pr, loc in zip(probes_, located)]
    return {**agg, "neurons": neuron_stats(groups), "control": ctrl}


# ---- gates -------------------------------------------------------------------------------

OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t,
       "<": lambda v, t: v < t, "==": lambda v, t: abs(v - t) <= 1e-12}


def gates(verify_cfg, agg: dict) -> dict:
    results = []
    for name, text in gates_of(verify_cfg).items():
        op, threshold = parse_gate(text)
        value = agg.get(name)
        results.append({"name": name, "op": op, "threshold": threshold, "value": value,
                        "passed": value is not None and OPS[op](value, threshold)})
    return {"results": results, "passed": all(r["passed"] for r in results)}


def status(gate_doc: dict) -> str:
    if not gate_doc["results"]:
        return "built"
    return "passed" if gate_doc["passed"] else "failed"


def describe_failure(r: dict) -> str:
    if r["value"] is None:
        return f"gate {r['name']} {r['op']} {r['threshold']:g} failed: not measured (no edit of that kind, or no prompts)"
    by = abs(r["value"] - r["threshold"])
    return f"gate {r['name']} {r['op']} {r['threshold']:g} failed: value {r['value']:.4g} (off by {by:.4g})"
