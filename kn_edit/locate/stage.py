"""The locate step: attribution on each prompt of each fact, coarse sets per prompt, then the
refined neurons per fact (one adaptive share per group of facts located together)."""

from __future__ import annotations

from .. import progress
from . import attribution
from .neurons import Located, choose_share, coarse, finish


def locate_fact(model, fact, method, dtype=None, tick=lambda: None) -> Located:
    """One fact (plan.batch.Fact): per prompt attribution scores, coarse sets and activations.
    method: spec.Locate; tick() after each prompt."""
    sets, total, acts = [], None, None
    for p in fact.prompts:
        s = attribution.scores(model, p, fact.target_ids, method.steps, method.engine, dtype, method.rule)
        a, _ = attribution.clean_activations(model, p)
        sets.append(coarse(s, method.threshold))
        total = s if total is None else total + s
        acts = a if acts is None else acts + a
        tick()
    n = len(fact.prompts)
    seen = sorted({x for s in sets for x in s})
    return Located(
        subject=fact.subject,
        target=fact.target,
        prompts=[p.text for p in fact.prompts],
        coarse=sets,
        score={x: float(total[x]) / n for x in seen},
        activation={x: float(acts[x]) / n for x in seen},
    )


def locate(model, edits, method, dtype=None, store=None) -> None:
    """Fill in each edit's `located` (spec.Method `method`). With `store` (a locate.cache.Cache),
    facts found there are not recomputed and new ones are stored."""

    def groups_of(e):
        # the batch solve needs only the updated fact's neurons; relation_facts serve the
        # shared-neuron filter of the single-edit rules
        g = e.locate_groups()
        return g[:1] if e.kind == "update" and method.update.rule in ("auto", "solve") else g

    groups = [g for e in edits for g in groups_of(e) if g]
    r = method.refine
    with progress.bar(sum(len(f.prompts) for g in groups for f in g), "locating neurons", "prompt") as bar:

        def one(f):
            tick = lambda: bar.update(1)
            if store is not None:
                return store.locate(model, f, method.locate, dtype, tick)
            return locate_fact(model, f, method.locate, dtype, tick)

        for e in edits:
            e.located = []
            for group in groups_of(e):
                if not group:
                    continue
                found = []
                for f in group:
                    found.append(one(f))
                finish(found, choose_share(found, r.share, r.share_step, *r.target_neurons, r.adaptive_share))
                e.located += found
