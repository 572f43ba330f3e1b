"""Write to value slots (rows of W2 in the paper's notation): update a fact, erase a relation.

Edits of one spec are applied in spec order, each reading the slots as the earlier ones left
them; so two edits touching one slot compose in a fixed, documented order.
"""
from __future__ import annotations

import torch

from . import arch
from .neurons import Neuron


@torch.no_grad()
def update(model, neurons: list[Neuron], old_id: int, new_id: int, rule: str, lambda1: float, lambda2: float,
           signs: dict[Neuron, float] | None = None) -> None:
    """authors: v <- v - l1 |v|/|e_t| e_t + l2 |v|/|e_t'| e_t'  (Dai et al.'s released rule)
    plain:   v <- v - l1 e_t + l2 e_t'
    With `signs`, a neuron whose activation is negative gets the opposite direction: its
    slot enters the output multiplied by a negative number."""
    emb = arch.output_embedding(model)
    e_old, e_new = emb[old_id].float(), emb[new_id].float()
    for layer, i in neurons:
        slots = arch.value_slots(model, layer)
        v = slots[i].float()
        if rule == "authors":
            delta = -lambda1 * v.norm() / e_old.norm() * e_old + lambda2 * v.norm() / e_new.norm() * e_new
        elif rule == "plain":
            delta = -lambda1 * e_old + lambda2 * e_new
        else:
            raise ValueError(f"unknown update rule {rule!r}")
        if signs is not None and signs.get((layer, i), 1.0) < 0:
            delta = -delta
        slots[i] = (v + delta).to(slots.dtype)


@torch.no_grad()
def erase(model, neurons: list[Neuron], value: str, unk_id: int | None) -> None:
    emb = arch.output_embedding(model)
    if value == "unk" and unk_id is None:
        raise ValueError("this model's tokenizer has no unknown token; use erase_value: zero")
    for layer, i in neurons:
        slots = arch.value_slots(model, layer)
        slots[i] = emb[unk_id].to(slots.dtype) if value == "unk" else 0.0
