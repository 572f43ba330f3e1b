"""The locate step: attribution on each prompt of each fact, coarse sets per prompt, then the
refined neurons per fact (one adaptive share per group of facts located together)."""

from __future__ import annotations

from .. import progress
from . import attribution
from .neurons import Located, choose_share, coarse, finish

# with method.batch = B > 1, facts are located in chunks of about this many passes' prompts: the
# prompts of a chunk are sorted by length into passes (fewer padded ones), and their scores are kept
# until their facts are done
CHUNK_PASSES = 8


def quadrature(method) -> attribution.Quadrature:
    """spec.Locate's integral settings as attribution takes them."""
    return attribution.Quadrature(method.steps, method.rule, method.like_riemann, method.own_rules())


def locate_fact(model, fact, method, dtype=None, tick=lambda: None) -> Located:
    """One fact (plan.batch.Fact): per prompt attribution scores, coarse sets and activations.
    method: spec.Locate; tick() after each prompt."""
    scores = (
        attribution.scores(model, p, fact.target_ids, quadrature(method), method.engine, dtype, with_acts=True)
        for p in fact.prompts
    )
    return _located(fact, scores, method.threshold, tick)


def _located(fact, scores, threshold: float, tick=lambda: None) -> Located:
    """The fact's Located from `scores`, an iterator giving each of its prompts' (scores, activations)
    in order (summed prompt by prompt, in that order)."""
    sets, total, acts = [], None, None
    for _ in fact.prompts:
        s, a = next(scores)
        sets.append(coarse(s, threshold))
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


def locate_facts(model, facts, method, dtype=None, tick=lambda: None, done=lambda i, located: None) -> list[Located]:
    """locate_fact of each fact; with method.batch > 1 (fast engine) the prompts of several facts are
    attributed together, `batch` per pass (attribution.scores_many). tick() after each prompt,
    done(i, located) as fact i is done."""
    out = []
    if method.batch <= 1 or method.engine != "fast":
        for i, f in enumerate(facts):
            out.append(locate_fact(model, f, method, dtype, tick))
            done(i, out[-1])
        return out
    chunk = []
    for i, f in enumerate(facts):
        chunk.append(f)
        if sum(len(g.prompts) for g in chunk) >= CHUNK_PASSES * method.batch or i == len(facts) - 1:
            for x in _locate_chunk(model, chunk, method, dtype, tick):
                out.append(x)
                done(len(out) - 1, x)
            chunk = []
    return out


def _locate_chunk(model, facts, method, dtype, tick) -> list[Located]:
    items = [(p, f.target_ids) for f in facts for p in f.prompts]
    ticks = lambda n: [tick() for _ in range(n)]
    scores = iter(
        attribution.scores_many(model, items, quadrature(method), method.engine, dtype, method.batch, ticks, with_acts=True)
    )
    return [_located(f, scores, method.threshold) for f in facts]


def locate(model, edits, method, dtype=None, store=None) -> None:
    """Fill in each edit's `located` (spec.Method `method`). With `store` (a locate.cache.Cache),
    facts found there are not recomputed and new ones are stored. The facts of every edit are located
    first (`locate_facts`: with method.locate.batch > 1, together), then refined group by group."""

    def groups_of(e):
        # the batch solve needs only the updated fact's neurons; relation_facts serve the
        # shared-neuron filter of the single-edit rules
        g = e.locate_groups()
        return g[:1] if e.kind == "update" and method.update.rule in ("auto", "solve") else g

    groups = [g for e in edits for g in groups_of(e) if g]
    r = method.refine
    with progress.bar(sum(len(f.prompts) for g in groups for f in g), "locating neurons", "prompt") as bar:
        tick = lambda: bar.update(1)
        facts = [f for g in groups for f in g]
        if store is not None:
            ready = iter(store.locate_many(model, facts, method.locate, dtype, tick))
        else:
            ready = iter(locate_facts(model, facts, method.locate, dtype, tick))

        for e in edits:
            e.located = []
            for group in groups_of(e):
                if not group:
                    continue
                found = [next(ready) for _ in group]
                finish(found, choose_share(found, r.share, r.share_step, *r.target_neurons, r.adaptive_share))
                e.located += found
