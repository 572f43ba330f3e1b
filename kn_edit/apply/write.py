"""The apply step: write every edit into the model's value slots. Edits written by the batch solve
are solved together first (apply/solve.py); the others are written after, in spec order, each
reading the slots as the earlier ones left them (two edits touching one slot compose in a fixed
order). The slots written are saved first, so the whole batch can be undone bit for bit."""

from __future__ import annotations

from .. import progress
from ..locate.attribution import clean_activations
from ..measure.metrics import mean
from ..model import arch
from . import patch, preserve, rules
from .choose import solves
from .solve import Goal, Settings, solve


def _mean_activation(model, fact, neurons) -> dict:
    acts = mean(clean_activations(model, p)[0] for p in fact.prompts)
    return {(l, i): float(acts[l, i]) for l, i in neurons}


def write(model, e, neurons, erase_method, unk: int | None, activation: dict | None = None) -> None:
    """Edit record `e` written alone onto `neurons` the way `e.written` says (rule, lambdas, sign
    awareness, scale: what was chosen for the real edit). Without `activation` the signs come
    from the fact's prompts (the random-neuron control)."""
    if e.kind == "update":
        w = e.written
        signs = None
        if w.sign_aware:
            signs = activation if activation is not None else _mean_activation(model, e.fact, neurons)
        rules.update(model, neurons, e.fact.target_ids, e.new_ids, w.rule, w.lambda1, w.lambda2, signs, w.scale, w.norm_cap)
    else:
        rules.erase(model, neurons, erase_method.value, unk)


def goals(model, batch, e, seed: int = 0) -> list[Goal]:
    """What the solve asks of edit e: its located prompts answer t' (update), or not t (erase: on the
    facts given, and on its templates about other subjects where the model gives one of their answers)."""
    if e.kind == "update":
        return [Goal(e.located_prompts, new_ids=e.new_ids)]
    elsewhere = [Goal([p], old_ids=(t,)) for p, t in preserve.erased_elsewhere(model, batch, e, seed=seed)]
    return [Goal(f.prompts, old_ids=f.target_ids) for f in e.facts] + elsewhere


def claimed(goals: list[Goal]) -> list[Goal]:
    """`goals` less the prompts an earlier update already asks for another target (plan.batch.contradictions
    warns of them): at most one target can hold on one prompt, and pulled two ways it gives neither, while
    the two edits' other prompts go unmet beside it. The first edit in spec order keeps the prompt."""
    asked, out = {}, []
    for g in goals:
        if g.new_ids is not None:
            g = Goal([p for p in g.prompts if asked.setdefault(p.ids, g.new_ids) == g.new_ids], new_ids=g.new_ids)
        if g.prompts:
            out.append(g)
    return out


def settings(method, seed: int, erases: bool = False, keyed: bool = False) -> Settings:
    """erases: the batch erases (min_steps unset: then all steps; an erase is done after one); keyed: it
    writes memory neurons (select: patch, add), whose slots start empty or foreign (norm_floor)."""
    s = method.solve
    names = ("steps", "lr", "keep", "text", "l2", "spread", "margin", "rise", "sample")
    min_steps = s.min_steps if s.min_steps is not None else (s.steps if erases else 0)
    return Settings(**{k: getattr(s, k) for k in names}, min_steps=min_steps, seed=seed, norm_floor=keyed)


def apply(model, batch, method, neurons: list | None = None, seed: int = 0) -> rules.Snapshot:
    """Write all edits of `batch` (method: spec.Method); `neurons`: per edit, the slots to write
    instead of the chosen ones (the random-neuron control). Returns the slots as they were
    (`.restore()` undoes the batch)."""
    edits = batch.edits
    real = neurons is None
    neurons = [e.neurons for e in edits] if real else neurons
    done = rules.Snapshot(model, [n for ns in neurons for n in ns])
    solved = [k for k, e in enumerate(edits) if solves(e, method) and neurons[k]]
    if real:
        width = arch.shape(model)[1]
        done.narrow = patch.write(model, edits)
        batch.added = arch.shape(model)[1] - width
    if solved:
        columns = sorted({n for k in solved for n in neurons[k]})
        max_pos = getattr(model.config, "max_position_embeddings", 1 << 16)
        deltas, stats = solve(model, columns, claimed([g for k in solved for g in goals(model, batch, edits[k], seed)]), preserve.keep_prompts(batch, seed),
                              preserve.text_windows(batch, max_pos), settings(method, seed, any(edits[k].kind == "erase" for k in solved), any(edits[k].keys for k in solved)), batch.causal,
                              preserve.pararel_prompts(batch, method.solve.pararel_facts, seed), preserve.subject_prompts(batch, method.solve.subject_prompts, seed, model))  # fmt: skip
        progress.log.info("batch solve: %d steps, every edit prompt done: %s", stats.steps, stats.reached)
        rules.write(model, deltas)
        if real:
            batch.solve_stats = stats
    unk = getattr(batch.tok, "unk_token_id", None)
    for k, e in enumerate(edits):
        if k not in solved:
            activation = e.located[0].activation if real and e.kind == "update" else None
            write(model, e, neurons[k], method.erase, unk, activation)
    return done
