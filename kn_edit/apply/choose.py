"""The choose step: which neurons each edit writes, and with which rule and scale.

- solve (the default, updates and erases): a fact's `solve.neurons` highest-scoring located neurons in
  layers >= `solve.min_layer` x layers (an erase: the relation's, by score summed over its facts);
  the values are solved later, for the whole batch at once (apply/solve.py);
- authors / plain update: the fact's refined neurons, less those shared by more than `relation_filter`
  of its relation_facts; the rule's `auto` settings resolved for the architecture; a searched scale is
  chosen on the base model, on the prompts used to locate (never the held-out ones), and the weights
  are left as they were;
- paper erase: neurons shared by >= `min_facts` of the relation's located facts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .. import progress
from ..locate.attribution import clean_activations
from ..locate.neurons import shared_by
from ..model import arch
from ..plan.batch import Written
from . import patch, rules


@dataclass(frozen=True)
class Rule:
    """A spec's update settings made concrete for one architecture."""

    rule: str
    lambda1: float
    lambda2: float
    sign_aware: bool
    search: bool
    cap: float | None = None


def resolve(method, gated: bool) -> Rule:
    """`auto` settings (method: spec.UpdateMethod): sign-aware plain rule with a searched scale and each
    slot's change capped at its norm where activations are signed (gated MLPs), the paper's fixed
    authors' rule elsewhere."""
    rule = method.rule if method.rule not in ("auto", "solve") else ("plain" if gated else "authors")
    sign = method.sign_aware if method.sign_aware != "auto" else gated
    search = method.scale == "search" or (method.scale == "auto" and gated)
    l1 = 1.0 if method.lambda1 is None else method.lambda1
    l2 = method.lambda2 if method.lambda2 is not None else (8.0 if rule == "authors" else 1.0)
    cap = method.norm_cap if method.norm_cap != "auto" else (1.0 if gated else None)
    return Rule(rule, l1, l2, bool(sign), search, cap)


def solves(e, method) -> bool:
    """Whether edit e is written by the batch solve."""
    rule = method.update.rule if e.kind == "update" else method.erase.rule
    return rule in ("auto", "solve")


def top_neurons(located, n: int, layers: range, weight=None) -> list:
    """The n highest-scoring neurons in `layers`, by score summed over the located facts (times
    weight[layer, neuron] when given)."""
    score: dict = {}
    for f in located:
        for k, v in f.score.items():
            if k[0] in layers:
                score[k] = score.get(k, 0.0) + v * (1.0 if weight is None else float(weight[k]))
    return sorted(sorted(score, key=lambda k: (-score[k], k))[:n])


def top_of(score: torch.Tensor, n: int, layers: range) -> list:
    """The n neurons with the highest score[layer, neuron] in `layers`."""
    part = score[layers.start : layers.stop]
    flat = part.flatten().topk(min(n, part.numel())).indices
    return sorted((layers.start + int(k) // part.shape[1], int(k) % part.shape[1]) for k in flat)


FEW_PROMPTS = 3  # a fact located on fewer prompts has nothing to refine its neurons against


def _activations(model, prompts, at_subject: bool, memo: dict | None = None) -> torch.Tensor:
    """[prompts, L, I] at the answer position, or at the subject's last token (prompts without one
    left out). A causal LM's activations at a position depend on the tokens up to it only, so
    they are kept in `memo` by that prefix (prompts of one template share their subjects')."""
    causal = arch.arch_of(model).causal
    if at_subject:
        prompts = [replace(p, pos=p.subject) for p in prompts if p.subject is not None]
    memo = {} if memo is None else memo
    out = []
    for p in prompts:
        key = p.ids[: p.pos + 1] if causal else (p.ids, p.pos)
        if key not in memo:
            memo[key] = clean_activations(model, replace(p, ids=p.ids[: p.pos + 1]) if causal else p)[0]
        out.append(memo[key])
    return torch.stack(out) if out else torch.zeros(0)


def specificity(
    model, fact_prompts, other_prompts, at_subject: bool = False, memo: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, I] a_f^2 / (a_f^2 + mean a_o^2), with a_f a neuron's mean activation on the fact's prompts
    and a_o its activation on prompts of the same relation about other subjects: near 1 for a
    neuron that fires for this subject only, near 0 for one that fires for the whole relation;
    and [L, I] |a_f|."""
    a_f = _activations(model, fact_prompts, at_subject, memo).mean(0)
    a_o = _activations(model, other_prompts, at_subject, memo)
    if not len(a_o):
        return torch.ones_like(a_f), a_f.abs()
    return a_f.pow(2) / (a_f.pow(2) + a_o.pow(2).mean(0) + 1e-12), a_f.abs()


LAYERS = {
    "subject": (0.1, 0.6),
    "score": (0.5, 1.0),
    "specific": (0.5, 1.0),
    "patch": (0.1, 0.167),
    "add": (0.167, 0.234),
}  # the auto layer ranges (add: layers 5-6 of SmolLM2's 30; 3-4 read names that end alike more, README "Memory neurons, measured")
ADD_DEPTH = 10  # select: auto is add from this many layers on


def selection(model, solve) -> str:
    """`solve.select` made concrete: auto is add on causal LMs with a gated MLP whose gate and up rows
    kn-edit can write, of at least ADD_DEPTH layers (measured on SmolLM2: far more local than any choice
    among the existing neurons; on 4-layer models, whose add range was layer 0 alone, where the FFN reads
    little more than the token, the edits did not take); subject on other
    causal LMs (more general and more local than the answer position's located neurons); score on
    masked LMs (the paper's setting)."""
    if solve.select != "auto":
        return solve.select
    a = arch.arch_of(model)
    if a.causal and a.gate and a.key and not a.conv1d and arch.shape(model)[0] >= ADD_DEPTH:
        return "add"
    return "subject" if a.causal else "score"


def layer_range(model, solve, select: str) -> range:
    """The layers the solve may write, from `solve.min_layer`/`max_layer` (fractions of the depth;
    None: LAYERS[select])."""
    L = arch.shape(model)[0]
    lo, hi = (
        (LAYERS[select][0] if solve.min_layer is None else solve.min_layer),
        (LAYERS[select][1] if solve.max_layer is None else solve.max_layer),
    )
    return range(int(lo * L), max(int(lo * L) + 1, round(hi * L)))


def choose(model, edits, method, others=None, text=(), near=None) -> list[str]:
    """Fill in each edit's `neurons` (and for updates `dropped_shared`, `written`). method: spec.Method.
    others: per edit, prompts of its relation about other subjects (solve.select: specific, subject, patch);
    text: token ids of plain text (select: patch, add); near: per edit, prompts about near misses of its
    subject (select: patch, add; preserve.near_misses). Returns warnings for the report."""
    warnings, memo = [], {}
    patched = []
    for e in edits:  # chosen afresh (a benchmark chooses again on the same records)
        e.keys = None
    keyed = selection(model, method.solve)
    if others is not None and keyed in ("patch", "add"):
        patched = [k for k, e in enumerate(edits) if e.kind == "update" and solves(e, method)]
        seqs = [list(t) for t in text] + [list(p.ids) for k in patched for p in others[k]]
        patch.choose(
            model,
            [edits[k] for k in patched],
            layer_range(model, method.solve, keyed),
            list({tuple(s): s for s in seqs}.values()),
            add=keyed == "add",
            near=[near[k] for k in patched] if near else None,
        )
    with progress.bar(len(edits), "choosing neurons and scales", "edit") as bar:
        for k, e in enumerate(edits):
            located_on = len(e.located_prompts) if e.kind == "update" else None
            if located_on is not None and located_on < FEW_PROMPTS:
                warnings.append(
                    f"edit {k + 1} ({e.fact.subject}): located on {located_on} prompt(s); with fewer than {FEW_PROMPTS} "
                    "its neurons cannot be refined against other prompts (give more templates)"
                )
            if k in patched:
                e.written = Written("solve")
            elif solves(e, method):
                facts = e.located[:1] if e.kind == "update" else e.located
                n = method.solve.neurons * (1 if e.kind == "update" else 4)
                select = selection(model, method.solve) if e.kind == "update" and others is not None else "score"
                if select == "subject" and not any(p.subject is not None for p in e.located_prompts):
                    warnings.append(f"edit {k + 1} ({e.fact.subject}): the subject is not in its prompts; its neurons "
                                    "are chosen by attribution score at the answer instead")  # fmt: skip
                    select = "score"
                layers = layer_range(model, method.solve, select)
                if select == "subject":
                    spec, size = specificity(model, e.located_prompts, others[k], at_subject=True, memo=memo)
                    e.neurons = top_of(spec * size, n, layers)
                else:
                    weight = specificity(model, e.located_prompts, others[k])[0] if select == "specific" else None
                    e.neurons = top_neurons(facts, n, layers, weight)
                e.written = Written("solve") if e.kind == "update" else None
            elif e.kind == "erase":
                e.neurons = shared_by(e.located, method.erase.min_facts)
            else:
                fact, rest = e.located[0], e.located[1:]
                limit = method.update.relation_filter * len(rest)
                e.dropped_shared = sorted(n for n in fact.neurons if rest and sum(n in o.neurons for o in rest) > limit)
                e.neurons = [n for n in fact.neurons if n not in e.dropped_shared]
                if located_on < FEW_PROMPTS:  # bounded by its scores: the refine step had nothing to refine against
                    most = method.refine.target_neurons[1]
                    e.neurons = sorted(sorted(e.neurons, key=lambda n: (-fact.score.get(n, 0.0), n))[:most])
                e.written = _written(model, method.update, e)
                if e.written.scale_reached is False:
                    warnings.append(
                        f"edit {k + 1} ({e.fact.subject}): no scale up to {method.update.scale_max:g} made its prompts answer "
                        f"{e.new_target!r}; written at the largest"
                    )
            bar.update(1)
    return warnings


def _written(model, method, e) -> Written:
    r = resolve(method, arch.arch_of(model).gated)
    if not r.search:
        return Written(r.rule, r.lambda1, r.lambda2, r.sign_aware, 1.0, r.cap)
    signs = e.located[0].activation if r.sign_aware else None
    ds = rules.deltas(model, e.neurons, e.fact.target_ids, e.new_ids, r.rule, r.lambda1, r.lambda2, signs)
    grid = rules.grid(method.scale_min, method.scale_max, method.scale_factor)
    with rules.restored(model, e.neurons):
        s = rules.search_scale(model, ds, e.located_prompts, e.new_ids, grid, method.scale_need, r.cap)
    return Written(r.rule, r.lambda1, r.lambda2, r.sign_aware, s.scale, r.cap, scale_searched=True, scale_reached=s.ok)
