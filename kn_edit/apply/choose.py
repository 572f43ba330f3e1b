"""The choose step: which neurons each edit writes, and with which rule and scale.

- update: the fact's refined neurons, less those shared by more than `relation_filter` of its
  relation_facts; the rule's `auto` settings resolved for the architecture; a searched scale is
  chosen on the base model, on the prompts used to locate (never the held-out ones), and the
  weights are left as they were;
- erase: neurons shared by >= `min_facts` of the relation's located facts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import progress
from ..locate.neurons import shared_by
from ..model import arch
from ..plan.batch import Written
from . import rules


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
    rule = method.rule if method.rule != "auto" else ("plain" if gated else "authors")
    sign = method.sign_aware if method.sign_aware != "auto" else gated
    search = method.scale == "search" or (method.scale == "auto" and gated)
    l1 = 1.0 if method.lambda1 is None else method.lambda1
    l2 = method.lambda2 if method.lambda2 is not None else (8.0 if rule == "authors" else 1.0)
    cap = method.norm_cap if method.norm_cap != "auto" else (1.0 if gated else None)
    return Rule(rule, l1, l2, bool(sign), search, cap)


def choose(model, edits, method) -> None:
    """Fill in each edit's `neurons` (and for updates `dropped_shared`, `written`). method: spec.Method."""
    with progress.bar(len(edits), "choosing neurons and scales", "edit") as bar:
        for e in edits:
            if e.kind == "erase":
                e.neurons = shared_by(e.located, method.erase.min_facts)
            else:
                fact, others = e.located[0], e.located[1:]
                limit = method.update.relation_filter * len(others)
                e.dropped_shared = sorted(n for n in fact.neurons if others and sum(n in o.neurons for o in others) > limit)
                e.neurons = [n for n in fact.neurons if n not in e.dropped_shared]
                e.written = _written(model, method.update, e)
            bar.update(1)


def _written(model, method, e) -> Written:
    r = resolve(method, arch.arch_of(model).gated)
    if not r.search:
        return Written(r.rule, r.lambda1, r.lambda2, r.sign_aware, 1.0, r.cap)
    signs = e.located[0].activation if r.sign_aware else None
    ds = rules.deltas(model, e.neurons, e.fact.target_id, e.new_id, r.rule, r.lambda1, r.lambda2, signs)
    grid = rules.grid(method.scale_min, method.scale_max, method.scale_factor)
    located_prompts = e.fact.prompts[: len(e.fact.prompts) - e.held_out]
    with rules.restored(model, e.neurons):
        s = rules.search_scale(model, ds, located_prompts, e.new_id, grid, method.scale_need, r.cap)
    return Written(r.rule, r.lambda1, r.lambda2, r.sign_aware, s.scale, r.cap, scale_searched=True, scale_reached=s.ok)
