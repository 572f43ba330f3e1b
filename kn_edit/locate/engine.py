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


def block_inputs(model, ids: torch.Tensor, out) -> BlockInputs:
    """From a full forward pass (use_cache=True) over `ids` [1, S], what is needed to run the
    blocks again on the last position alone (causal) or on the whole sequence (masked)."""
    a = arch.arch_of(model)
    if not a.causal:
        return BlockInputs()
    layers = out.past_key_values.layers
    kv = PrefixKV([x.keys[:, :, :-1].detach() for x in layers], [x.values[:, :, :-1].detach() for x in layers])
    rope = None
    if a.rotary:
        pos = torch.tensor([[ids.shape[1] - 1]], device=ids.device)
        rope = arch.get(model, a.rotary)(out.hidden_states[0][:, -1:], pos)
    return BlockInputs(kv, rope)


class WholeKV:
    """Keys/values of whole sequences, for a masked LM's block run on one query position."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.keys, self.values


def run_block_at(model, layer: int, h: torch.Tensor, pos: int) -> torch.Tensor:
    """A masked LM's block output at position pos only, [rows, 1, hidden]: keys and values come
    from every position, the query, attention output and FFN from pos alone (the top block
    needs nothing else)."""
    block = arch.blocks(model)[layer]
    sa = arch.get(block, arch.arch_of(model).attention)
    shape = (*h.shape[:-1], -1, sa.attention_head_size)
    k = sa.key(h).view(shape).transpose(1, 2)
    v = sa.value(h).view(shape).transpose(1, 2)
    # contiguous: a strided 3-d input sends nn.Linear to a batched matmul over copies of the weight
    out = block(h[:, pos : pos + 1].contiguous(), past_key_values=WholeKV(k, v))
    return out[0] if isinstance(out, tuple) else out


def run_block(model, layer: int, h: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    block = arch.blocks(model)[layer]
    kw = {}
    if inputs.kv is not None:
        kw["past_key_values"] = inputs.kv
    if inputs.rope is not None:
        kw["position_embeddings"] = inputs.rope
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
