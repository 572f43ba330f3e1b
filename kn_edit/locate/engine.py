"""Plumbing of the fast attribution engine: tapping each block's FFN during one clean pass, and
running blocks again from the middle (the answer position only, against clean keys/values).
Module paths come from model/arch.py; nothing here names a family."""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch

from ..model import arch


@contextlib.contextmanager
def ffn_taps(model, pos: int, store: dict, seq: int):
    """Record per layer l, for sequences of length seq: store[l]["out"], the block's output [batch, seq, hidden], and
    store[l]["residual"], what the FFN's output (after its ffn_norm, if any) is added to at position pos."""
    a = arch.arch_of(model)
    hooks = []

    def keep(rec, key, x):
        rec[key] = x.detach().clone()  # blocks may add to the FFN's output in place (Falcon)

    for l, block in enumerate(arch.blocks(model)):
        rec = store.setdefault(l, {})
        ffn_out = arch.get(block, a.ffn_norm or a.value)
        hooks.append(
            ffn_out.register_forward_hook(lambda m, args, out, rec=rec: keep(rec, "y", arch.by_position(model, out, seq)[:, pos]))
        )
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
    block = arch.blocks(model)[layer]
    y = arch.value_module(model, layer)(act)
    v = residual + (arch.get(block, a.ffn_norm)(y) if a.ffn_norm else y).to(residual.dtype)
    return arch.get(block, a.post_norm)(v) if a.post_norm else v


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
    rope: list | None = None  # per layer: rotary (cos, sin)
    mask: list | None = None  # per layer: additive attention mask


def attention_masks(model, q: torch.Tensor, k: int, dtype) -> list | None:
    """Per layer, the additive mask [1, 1, len(q), k] of attention from positions q to positions 0..k-1:
    causal for a causal LM; a sliding-window layer (marked so in config.layer_types, or every layer
    when the config has a window and no layer types) sees the last config.sliding_window positions
    (causal) or those within config.sliding_window either side (masked LM). None when nothing is masked."""
    cfg, L = model.config, len(arch.blocks(model))
    causal = arch.arch_of(model).causal
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * L
    d = q[:, None] - torch.arange(k, device=q.device)[None]
    by_type = {}
    for t in set(types[:L]):
        ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
        if window and t == "sliding_attention":
            ok &= d < window if causal else d.abs() <= window
        by_type[t] = ok
    if all(bool(ok.all()) for ok in by_type.values()):
        return None
    masks = {
        t: torch.zeros(ok.shape, dtype=dtype, device=q.device).masked_fill(~ok, torch.finfo(dtype).min)[None, None]
        for t, ok in by_type.items()
    }
    return [masks[t] for t in types[:L]]


def cache_kwargs(model) -> dict:
    """For the clean pass of a causal LM: a cache keeping every position's keys and values (the
    model's own would keep only a sliding window's on such layers; the masks say what is seen)."""
    import inspect

    from transformers import DynamicCache

    if not arch.arch_of(model).causal:
        return {"use_cache": False}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers >= 5.24: cache
    return {"use_cache": True, name: DynamicCache()}


def kv_cache(out):
    """The key/value cache a forward pass returned (`cache` since transformers 5.24, `past_key_values` before)."""
    got = out.get("cache") if hasattr(out, "get") else None
    return got if got is not None else out.past_key_values


def block_inputs(model, ids: torch.Tensor, out, k: int = 1) -> BlockInputs:
    """From a full forward pass (cache_kwargs, output_hidden_states=True) over `ids` [1, S], what
    is needed to run the blocks again on the last k positions alone (causal) or on the whole sequence (masked)."""
    h = out.hidden_states[0]
    if not arch.arch_of(model).causal:
        return sequence_inputs(model, h)
    layers = kv_cache(out).layers
    kv = PrefixKV([x.keys[:, :, :-k].detach() for x in layers], [x.values[:, :, :-k].detach() for x in layers])
    last = torch.arange(ids.shape[1] - k, ids.shape[1], device=ids.device)
    return BlockInputs(kv, arch.rope(model, h[:, -k:], last[None]), attention_masks(model, last, ids.shape[1], h.dtype))


class WholeKV:
    """Keys/values of whole sequences, for a masked LM's block run on one query position."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.keys, self.values


def run_block_at(model, layer: int, h: torch.Tensor, pos: int, inputs: BlockInputs, k: int = 1) -> torch.Tensor:
    """A masked LM's block output at positions pos .. pos + k - 1 only, [rows, k, hidden]: keys and
    values come from every position, the queries, attention output and FFN from those alone (the
    top block needs nothing else). Families without an `attention` entry run the whole block."""
    block = arch.blocks(model)[layer]
    a = arch.arch_of(model)
    if not a.attention:
        return run_block(model, layer, h, inputs)[:, pos : pos + k]
    sa = arch.get(block, a.attention)
    shape = (*h.shape[:-1], -1, sa.attention_head_size)
    keys = sa.key(h).view(shape).transpose(1, 2)
    values = sa.value(h).view(shape).transpose(1, 2)
    # contiguous: a strided 3-d input sends nn.Linear to a batched matmul over copies of the weight
    out = block(h[:, pos : pos + k].contiguous(), **{cache_arg(block): WholeKV(keys, values)})
    return out[0] if isinstance(out, tuple) else out


@functools.cache
def _params(forward) -> frozenset:
    return frozenset(inspect.signature(forward).parameters)


def cache_arg(block) -> str:
    """The name under which `block` takes its key/value cache (it differs between families)."""
    names = _params(type(block).forward)
    for name in ("cache", "past_key_values", "layer_past"):
        if name in names:
            return name
    raise arch.UnsupportedModel(f"{type(block).__name__}.forward takes no key/value cache (cache, past_key_values, layer_past)")


def run_block(model, layer: int, h: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    block = arch.blocks(model)[layer]
    kw = {}
    if inputs.rope is not None:
        kw["position_embeddings"] = inputs.rope[layer]
    if inputs.kv is not None:
        kw[cache_arg(block)] = inputs.kv
    kw["attention_mask"] = None if inputs.mask is None else inputs.mask[layer]
    kw.update(dict(arch.arch_of(model).block_args))
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def sequence_inputs(model, h: torch.Tensor) -> BlockInputs:
    """What a block needs to run on whole sequences [rows, S, hidden] from position 0, without padding
    (a causal LM's rows get causal masks: eager attention does not mask itself; a masked LM's rows
    have no padding, and masks only where a sliding window hides some positions)."""
    pos = torch.arange(h.shape[1], device=h.device)
    return BlockInputs(
        rope=arch.rope(model, h, pos[None].expand(h.shape[0], -1)), mask=attention_masks(model, pos, h.shape[1], h.dtype)
    )


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


# ---------------------------------------------------------------- several prompts in one pass
def padded_masks(model, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, dtype) -> list:
    """Per layer, additive masks [N, 1, Q, T] for N prompts: queries at positions q [N, Q] attend to
    keys at positions k [N, T] of which only `valid` [N, T] exist (the rest is padding). The same
    rules as attention_masks (causal, sliding windows by layer type), per prompt."""
    cfg, L = model.config, len(arch.blocks(model))
    causal = arch.arch_of(model).causal
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * L
    d = q[:, :, None] - k[:, None, :]
    masks = {}
    for t in set(types[:L]):
        ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
        if window and t == "sliding_attention":
            ok &= d < window if causal else d.abs() <= window
        ok &= valid[:, None, :]
        masks[t] = torch.zeros(ok.shape, dtype=dtype, device=q.device).masked_fill(~ok, torch.finfo(dtype).min)[:, None]
    return [masks[t] for t in types[:L]]


class RowPrefixKV:
    """PrefixKV for rows of several prompts: keys[l] [N, heads, P, head_dim] hold each prompt's prefix
    (padded to P); row r attends to the prefix of prompt who[r] plus its own keys."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], who: torch.Tensor):
        self.keys, self.values, self.who = keys, values, who

    def update(self, k, v, layer_idx, *args, **kwargs):
        pk = self.keys[layer_idx].index_select(0, self.who)
        pv = self.values[layer_idx].index_select(0, self.who)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


class _Picked:
    """Per layer, a prompt-indexed tensor (or (cos, sin) pair) taken at rows `who`; one shared by all
    prompts (first dimension 1) is passed as it is."""

    def __init__(self, per_layer: list, who: torch.Tensor):
        self.per_layer, self.who, self.done = per_layer, who, {}

    def __getitem__(self, layer):
        if layer not in self.done:
            x = self.per_layer[layer]
            pick = lambda t: t if t.shape[0] == 1 else t.index_select(0, self.who)
            self.done[layer] = tuple(map(pick, x)) if isinstance(x, tuple) else pick(x)
        return self.done[layer]


@dataclass
class Batch:
    """What blocks need to run the rows of several prompts together (`batch_inputs`). Tensors have one
    entry per prompt along their first dimension, or one shared by all (first dimension 1).

    Causal LMs: a row is a prompt's last K positions (its answer's k, right-padded to the longest k),
    attending to that prompt's prefix keys/values (padded to the longest prefix) and to its own.
    Masked LMs: a row is a whole sequence, right-padded to the longest. Padding is hidden by the masks;
    prompts of the same shape need none beyond what one prompt alone needs, and share rope and masks."""

    width: int  # positions per row: K (causal) or the longest sequence (masked)
    keys: list | None = None  # causal: per layer [N, heads, P, head_dim]
    values: list | None = None
    rope: list | None = None
    mask: list | None = None
    top_mask: torch.Tensor | None = None  # masked LMs with padding: [N, 1, K, width] for the top block's queries

    def rows(self, who: torch.Tensor) -> BlockInputs:
        """Block inputs for rows belonging to prompts who [rows]."""
        kv = None
        if self.keys is not None:
            kv = RowPrefixKV(self.keys, self.values, who)
        rope = None if self.rope is None else _Picked(self.rope, who)
        mask = None if self.mask is None else _Picked(self.mask, who)
        return BlockInputs(kv, rope, mask)


def batch_inputs(model, clean: list) -> Batch:
    """From the clean passes of N prompts, clean[i] = (ids [1, S_i], out, k_i, answer position) (as
    block_inputs takes them), what their rows need to run the blocks together."""
    causal = arch.arch_of(model).causal
    lens = [c[0].shape[1] for c in clean]
    ks = [c[2] for c in clean]
    h0 = clean[0][1].hidden_states[0]
    dev = h0.device
    if not causal:
        S = max(lens)
        if len(set(lens)) == 1:  # no padding: what one prompt needs serves all
            one = sequence_inputs(model, h0)
            return Batch(S, rope=one.rope, mask=one.mask)
        pos = torch.arange(S, device=dev)
        q = pos[None].expand(len(clean), -1)
        valid = pos[None] < torch.tensor(lens, device=dev)[:, None]
        K = max(ks)
        tops = torch.tensor([c[3] for c in clean], device=dev)[:, None] + torch.arange(K, device=dev)
        top = padded_masks(model, tops.clamp(max=S - 1), q, valid, h0.dtype)[-1]
        return Batch(S, rope=arch.rope(model, h0, pos[None]), mask=padded_masks(model, q, q, valid, h0.dtype), top_mask=top)
    K = max(ks)
    prefix = [n - k for n, k in zip(lens, ks)]
    P = max(prefix)
    L = len(kv_cache(clean[0][1]).layers)

    def stacked(kind, l):
        parts = []
        for (_, out, *_), p in zip(clean, prefix):
            x = getattr(kv_cache(out).layers[l], kind)[:, :, :p].detach()
            parts.append(torch.nn.functional.pad(x, (0, 0, 0, P - p)))
        return torch.cat(parts)

    keys, values = [stacked("keys", l) for l in range(L)], [stacked("values", l) for l in range(L)]
    if len(set(zip(prefix, ks))) == 1:
        one = block_inputs(model, clean[0][0], clean[0][1], ks[0])
        return Batch(K, keys, values, one.rope, one.mask)
    j = torch.arange(K, device=dev)
    p = torch.tensor(prefix, device=dev)[:, None]
    q = p + j  # each prompt's answer positions
    at = torch.cat([torch.arange(P, device=dev).expand(len(clean), -1), q], 1)
    valid = torch.cat([torch.arange(P, device=dev)[None] < p, j[None] < torch.tensor(ks, device=dev)[:, None]], 1)
    return Batch(K, keys, values, arch.rope(model, h0, q), padded_masks(model, q, at, valid, h0.dtype))


def run_block_rows(model, layer: int, h: torch.Tensor, q: torch.Tensor, inputs: BlockInputs, mask=None) -> torch.Tensor:
    """A masked LM's block output at positions q [rows, k] of each row, [rows, k, hidden]: run_block_at
    with each row's own positions (`mask`: [rows, 1, k, S] when rows are padded)."""
    block = arch.blocks(model)[layer]
    a = arch.arch_of(model)
    r = torch.arange(h.shape[0], device=h.device)[:, None]
    if not a.attention:
        return run_block(model, layer, h, inputs)[r, q]
    sa = arch.get(block, a.attention)
    shape = (*h.shape[:-1], -1, sa.attention_head_size)
    keys = sa.key(h).view(shape).transpose(1, 2)
    values = sa.value(h).view(shape).transpose(1, 2)
    kw = {} if mask is None else {"attention_mask": mask}
    out = block(h[r, q], **{cache_arg(block): WholeKV(keys, values)}, **kw)
    return out[0] if isinstance(out, tuple) else out
