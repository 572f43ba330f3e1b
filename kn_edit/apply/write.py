"""The apply step: write every edit into the model's value slots, in spec order (each edit reads
the slots as the earlier ones left them, so two edits touching one slot compose in a fixed order).
The slots written are saved first, so the whole batch can be undone bit for bit."""

from __future__ import annotations

from ..locate.attribution import clean_activations
from ..measure.metrics import mean
from . import rules


def _mean_activation(model, fact, neurons) -> dict:
    acts = mean(clean_activations(model, p)[0] for p in fact.prompts)
    return {(l, i): float(acts[l, i]) for l, i in neurons}


def write(model, e, neurons, erase_method, unk: int | None, activation: dict | None = None) -> None:
    """Edit record `e` written onto `neurons` the way `e.written` says (rule, lambdas, sign
    awareness, scale: what was chosen for the real edit). Without `activation` the signs come
    from the fact's prompts (the random-neuron control)."""
    if e.kind == "update":
        w = e.written
        signs = None
        if w.sign_aware:
            signs = activation if activation is not None else _mean_activation(model, e.fact, neurons)
        rules.update(model, neurons, e.fact.target_id, e.new_id, w.rule, w.lambda1, w.lambda2, signs, w.scale, w.norm_cap)
    else:
        rules.erase(model, neurons, erase_method.value, unk)


def apply(model, edits, method, unk: int | None) -> rules.Snapshot:
    """Write all edits (method: spec.Method); returns the slots as they were (`.restore()` undoes the batch)."""
    done = rules.Snapshot(model, [n for e in edits for n in e.neurons])
    for e in edits:
        write(model, e, e.neurons, method.erase, unk, e.located[0].activation if e.kind == "update" else None)
    return done
