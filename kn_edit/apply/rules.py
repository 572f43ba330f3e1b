"""The rules that write value slots (rows of W2 in the paper's notation): update a fact, erase a relation.

Edits of one spec are applied in spec order, each reading the slots as the earlier ones left
them; so two edits touching one slot compose in a fixed, documented order.

Why the default differs on gated MLPs: the paper's rule (v += l2 |v|/|e_t'| e_t') assumes a
neuron's activation is positive, as GELU's mostly is where it matters. act(gate) * up is signed:
about half of the neurons located on a SmolLM2 fact are negative at the answer position, and
adding e_t' to their slots pushes the output away from t'. There the default follows the
activation's sign and picks the smallest scale that makes the edit work on the fact's own
prompts, since a fixed large lambda teaches the whole relation to say t' (benchmarks/gated_edits.py).

A target of several tokens enters the update rules through the mean of its tokens' output
embeddings (e_t = mean_j e_{t_j}; one token: e_t itself), and the scale search asks for the
whole new target as the greedy continuation. The erase rules do not read targets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..locate.neurons import Neuron
from ..measure import predict as prediction
from ..model import arch
from ..plan.prompts import as_ids


@torch.no_grad()
def deltas(
    model,
    neurons: list[Neuron],
    old_ids,
    new_ids,
    rule: str,
    lambda1: float,
    lambda2: float,
    signs: dict[Neuron, float] | None = None,
) -> dict[Neuron, torch.Tensor]:
    """authors: delta = -l1 |v|/|e_t| e_t + l2 |v|/|e_t'| e_t'  (Dai et al.'s released rule)
    plain:   delta = -l1 e_t + l2 e_t'
    old_ids, new_ids: a token id or a target's ids (e_t: the mean of their embeddings). With `signs`, a neuron whose activation is negative gets the opposite direction: its
    slot enters the output multiplied by a negative number."""
    emb = _embedding_in_value_space(model)
    e_old, e_new = (emb[list(as_ids(t))].float().mean(0) for t in (old_ids, new_ids))
    out = {}
    for layer, i in neurons:
        v = arch.value_slots(model, layer)[i].float()
        if rule == "authors":
            d = -lambda1 * v.norm() / e_old.norm() * e_old + lambda2 * v.norm() / e_new.norm() * e_new
        elif rule == "plain":
            d = -lambda1 * e_old + lambda2 * e_new
        else:
            raise ValueError(f"unknown update rule {rule!r}")
        if signs is not None and signs.get((layer, i), 1.0) < 0:
            d = -d
        out[(layer, i)] = d
    return out


class Snapshot:
    """Value slots as they are now; `restore()` puts them back bit for bit (and narrows an FFN that
    apply widened: `narrow`). Neurons beyond the width are added ones: nothing to save."""

    def __init__(self, model, neurons):
        self.model = model
        self.narrow = None
        width = arch.shape(model)[1]
        self.saved = {(l, i): arch.value_slots(model, l)[i].clone() for l, i in sorted({tuple(n) for n in neurons}) if i < width}
        # and their gate and up rows, which solve.select: patch writes
        patchable = arch.arch_of(model).gate and arch.arch_of(model).key
        self.keys = {n: arch.key_rows(model, n[0])[n[1]].clone() for n in self.saved} if patchable else {}
        self.gates = {n: arch.gate_rows(model, n[0])[n[1]].clone() for n in self.saved} if patchable else {}

    @torch.no_grad()
    def restore(self) -> None:
        if self.narrow is not None:
            self.narrow()
            self.narrow = None
        for (l, i), v in self.saved.items():
            arch.value_slots(self.model, l)[i] = v
        for (l, i), k in self.keys.items():
            arch.key_rows(self.model, l)[i] = k
        for (l, i), g in self.gates.items():
            arch.gate_rows(self.model, l)[i] = g


@contextlib.contextmanager
def restored(model, neurons):
    """Edit value slots inside the block; they are put back bit for bit afterwards."""
    snap = Snapshot(model, neurons)
    try:
        yield
    finally:
        snap.restore()


@torch.no_grad()
def write(model, ds: dict[Neuron, torch.Tensor], scale: float = 1.0, cap: float | None = None) -> None:
    """v <- v + scale * delta; with `cap`, |change| <= cap * |v| per slot."""
    for (layer, i), d in ds.items():
        slots = arch.value_slots(model, layer)
        v = slots[i].float()
        d = scale * d
        if cap is not None and d.norm() > cap * v.norm():
            d = d * (cap * v.norm() / d.norm())
        slots[i] = (v + d).to(slots.dtype)


@torch.no_grad()
def update(
    model,
    neurons: list[Neuron],
    old_ids,
    new_ids,
    rule: str,
    lambda1: float,
    lambda2: float,
    signs: dict[Neuron, float] | None = None,
    scale: float = 1.0,
    cap: float | None = None,
) -> None:
    write(model, deltas(model, neurons, old_ids, new_ids, rule, lambda1, lambda2, signs), scale, cap)


def grid(lo: float, hi: float, factor: float) -> list[float]:
    """lo, lo*factor, ... up to hi (hi included)."""
    out, s = [], lo
    while s < hi * (1 - 1e-9):
        out.append(round(s, 6))
        s *= factor
    return out + [hi]


@dataclass
class Search:
    scale: float
    ok: bool  # False: no scale in the grid worked; the largest was written
    success: float  # share of the prompts answering the new target at the written scale
    tries: int


@torch.no_grad()
def search_scale(
    model, ds: dict[Neuron, torch.Tensor], prompts, new_ids, scales: list[float], need: float = 1.0, cap: float | None = None
) -> Search:
    """Write the smallest scale of `scales` at which >= `need` of `prompts` answer new_ids (a token
    id or a target's ids: the greedy continuation starts with them).

    Each try is undone by copying back the touched rows, so the slots are bit-identical to
    the start until the final write. None works: the largest scale is written (ok=False)."""

    def rate_at(s):
        with restored(model, ds):
            write(model, ds, s, cap)
            return prediction.rate(prediction.starts(model, p, as_ids(new_ids)) for p in prompts)

    r = 0.0
    for k, s in enumerate(scales, 1):
        r = rate_at(s)
        if r >= need:
            write(model, ds, s, cap)
            return Search(s, True, r, k)
    write(model, ds, scales[-1], cap)
    return Search(scales[-1], False, r, len(scales))


def _embedding_in_value_space(model) -> torch.Tensor:
    """The output embedding, for rules that write word embeddings into value slots: only where both have one size."""
    emb, hidden = arch.output_embedding(model), arch.value_slots(model, 0).shape[1]
    if emb.shape[1] != hidden:
        raise ValueError(
            f"this model's output embedding ({emb.shape[1]}) and value slots ({hidden}) differ in size, so the "
            "paper's rules cannot write embeddings into slots; use update.rule / erase.rule: solve"
        )
    return emb


@torch.no_grad()
def erase(model, neurons: list[Neuron], value: str, unk_id: int | None) -> None:
    if value == "unk" and unk_id is None:
        raise ValueError("this model's tokenizer has no unknown token; use erase_value: zero")
    emb = _embedding_in_value_space(model) if value == "unk" else None
    for layer, i in neurons:
        slots = arch.value_slots(model, layer)
        slots[i] = emb[unk_id].to(slots.dtype) if value == "unk" else 0.0
