"""Plumbing of the fast attribution engine: tapping each block's FFN during one clean pass, and
running blocks again from the middle (the answer position only, against clean keys/values).
Module paths come from model/arch.py; nothing here names a family."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..model import arch


@contextlib.contextmanager
def ffn_taps(model, pos: int, store: dict):
    """Record per layer l: store[l]["out"], the block's output [batch, seq, hidden], and
    store[l]["residual"], what the FFN's output is added to at position pos."""
    a = arch.arch_of(model)
    hooks = []

    def keep(rec, key, x):
        rec[key] = x.detach()

    for l, block in enumerate(arch.blocks(model)):
        rec = store.setdefault(l, {})
        hooks.append(arch.get(block, a.value).register_forward_hook(lambda m, args, out, rec=rec: keep(rec, "y", out[:, pos])))
        if a.post_norm:
            hooks.append(
                arch.get(block, a.post_norm).register_forward_pre_hook(lambda m, args, rec=rec: keep(rec, "sum", args[0][:, pos]))
            )
        hooks.append(
            block.register_forward_hook(lambda m, args, out, rec=rec: keep(rec, "out", out[0] if isinstance(out, tuple) else out))
        )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
    for rec in store.values():
        rec["residual"] = (rec.pop("sum") if a.post_norm else rec["out"][:, pos]) - rec.pop("y")


def ffn_output(model, layer: int, residual: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The block's output at the tapped position when its neuron activations are `act` [rows, I]."""
    a = arch.arch_of(model)
    v = residual + arch.value_module(model, layer)(act).to(residual.dtype)
    return arch.get(arch.blocks(model)[layer], a.post_norm)(v) if a.post_norm else v


class PrefixKV:
    """Read-only stand-in for a transformers Cache: every row of a batch attends to the same
    prefix keys/values plus its own. Attention modules call .update(k, v, layer_idx)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, k, v, layer_idx, *args, **kwargs):
        pk = self.keys[layer_idx].expand(k.shape[0], -1, -1, -1)
        pv = self.values[layer_idx].expand(v.shape[0], -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


@dataclass
class BlockInputs:
    """What a block needs besides its hidden states, for re-running blocks from the middle."""

    kv: PrefixKV | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    allowed: torch.Tensor | None = None  # [k, P + k] which keys each of k > 1 query rows sees (else causal by itself)


def block_inputs(model, ids: torch.Tensor, out, k: int = 1) -> BlockInputs:
    """From a full forward pass (use_cache=True) over `ids` [1, S], what is needed to run the
    blocks again on the last k positions alone (causal) or on the whole sequence (masked)."""
    a = arch.arch_of(model)
    if not a.causal:
        return BlockInputs()
    layers = out.past_key_values.layers
    kv = PrefixKV([x.keys[:, :, :-k].detach() for x in layers], [x.values[:, :, :-k].detach() for x in layers])
    rope = None
    if a.rotary:
        pos = torch.arange(ids.shape[1] - k, ids.shape[1], device=ids.device)[None]
        rope = arch.get(model, a.rotary)(out.hidden_states[0][:, -k:], pos)
    allowed = None
    if k > 1:
        # query j sees the prefix and the rows' own positions up to j (the attention would align
        # an implicit causal mask to the top left, ignoring the prefix)
        allowed = torch.ones(k, ids.shape[1], dtype=torch.bool, device=ids.device).tril(ids.shape[1] - k)
    return BlockInputs(kv, rope, allowed)


class WholeKV:
    """Keys/values of whole sequences, for a masked LM's block run on one query position."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.keys, self.values


def run_block_at(model, layer: int, h: torch.Tensor, pos: int, k: int = 1) -> torch.Tensor:
    """A masked LM's block output at positions pos .. pos + k - 1 only, [rows, k, hidden]: keys and
    values come from every position, the queries, attention output and FFN from those alone
    (the top block needs nothing else)."""
    block = arch.blocks(model)[layer]
    sa = arch.get(block, arch.arch_of(model).attention)
    shape = (*h.shape[:-1], -1, sa.attention_head_size)
    keys = sa.key(h).view(shape).transpose(1, 2)
    values = sa.value(h).view(shape).transpose(1, 2)
    # contiguous: a strided 3-d input sends nn.Linear to a batched matmul over copies of the weight
    out = block(h[:, pos : pos + k].contiguous(), past_key_values=WholeKV(keys, values))
    return out[0] if isinstance(out, tuple) else out


def run_block(model, layer: int, h: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    block = arch.blocks(model)[layer]
    kw = {}
    if inputs.kv is not None:
        kw["past_key_values"] = inputs.kv
    if inputs.rope is not None:
        kw["position_embeddings"] = inputs.rope
    if inputs.allowed is not None:
        blocked = torch.zeros(inputs.allowed.shape, dtype=h.dtype, device=h.device)
        kw["attention_mask"] = blocked.masked_fill(~inputs.allowed, torch.finfo(h.dtype).min)[None, None]
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def sequence_inputs(model, h: torch.Tensor) -> BlockInputs:
    """What a block needs to run on whole sequences [rows, S, hidden] from position 0, without padding
    (causal attention masks itself when no mask is given; a masked LM's rows have no padding)."""
    a = arch.arch_of(model)
    if not a.rotary:
        return BlockInputs()
    pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
    return BlockInputs(rope=arch.get(model, a.rotary)(h, pos))


@contextlib.contextmanager
def block_input(model, layer: int, store: list):
    """Record the hidden states entering block `layer` (one tensor per forward pass)."""
    h = arch.blocks(model)[layer].register_forward_pre_hook(
        lambda m, args, kwargs: store.append((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True
    )
    try:
        yield
    finally:
        h.remove()
