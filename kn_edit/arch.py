"""Where each architecture keeps its FFN. The one place that knows; everything else asks here.

A knowledge neuron of layer l is one intermediate unit of that layer's FFN: the input of
its output projection W2 (post-GELU for BERT, act(gate) * up for gated MLPs, post-GELU
for GPT-2). Its value slot is the matching column of W2's torch weight (a row of W2
in the paper's notation).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Arch:
    name: str
    causal: bool
    blocks: str  # dotted path from the model to its list of transformer blocks
    value: str  # dotted path from a block to the FFN output projection (W2)
    conv1d: bool = False  # GPT-2's Conv1D stores W2 as [in, out] instead of [out, in]
    gated: bool = False  # act(gate) * up: activations are signed
    post_norm: str | None = None  # post-LN blocks: the norm applied to (residual + W2 output)


_BERT = dict(causal=False, value="output.dense", post_norm="output.LayerNorm")
_LLAMA = dict(causal=True, blocks="model.layers", value="mlp.down_proj", gated=True)
ARCHS = {
    "bert": Arch("bert", blocks="bert.encoder.layer", **_BERT),
    "roberta": Arch("roberta", blocks="roberta.encoder.layer", **_BERT),
    "llama": Arch("llama", **_LLAMA),
    "mistral": Arch("mistral", **_LLAMA),
    "qwen2": Arch("qwen2", **_LLAMA),
    "gpt2": Arch("gpt2", causal=True, blocks="transformer.h", value="mlp.c_proj", conv1d=True),
}


class UnsupportedModel(ValueError):
    pass


def arch_of(model) -> Arch:
    kind = model.config.model_type
    if kind not in ARCHS:
        raise UnsupportedModel(
            f"model type {kind!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[kind]


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def blocks(model) -> list[torch.nn.Module]:
    return list(_get(model, arch_of(model).blocks))


def value_module(model, layer: int) -> torch.nn.Module:
    """W2 of `layer`; a forward pre-hook on it sees (and may replace) the neuron activations."""
    return _get(blocks(model)[layer], arch_of(model).value)


def value_slots(model, layer: int) -> torch.Tensor:
    """[n_neurons, hidden] view of W2: row i is neuron i's value slot. Writes go to the weight."""
    w = value_module(model, layer).weight
    return w if arch_of(model).conv1d else w.t()


def value_param_name(model, layer: int) -> str:
    a = arch_of(model)
    return f"{a.blocks}.{layer}.{a.value}.weight"


def shape(model) -> tuple[int, int]:
    """(layers, neurons per layer)."""
    return len(blocks(model)), value_slots(model, 0).shape[0]


def output_embedding(model) -> torch.Tensor:
    """[vocab, hidden]: the word embeddings the output layer scores against."""
    return model.get_output_embeddings().weight


def head_input(model, h: torch.Tensor) -> torch.Tensor:
    """The last block's output as the output projection reads it (final norm / MLM transform)."""
    a = arch_of(model)
    if a.name == "bert":
        return model.cls.predictions.transform(h)
    if a.name == "roberta":
        from transformers.activations import gelu

        m = model.lm_head
        return m.layer_norm(gelu(m.dense(h)))
    if a.name == "gpt2":
        return model.transformer.ln_f(h)
    return model.model.norm(h)


@contextlib.contextmanager
def ffn_taps(model, pos: int, store: dict):
    """Record per layer l: store[l]["out"], the block's output [batch, seq, hidden], and
    store[l]["residual"], what the FFN's output is added to at position pos."""
    a = arch_of(model)
    hooks = []

    def keep(rec, key, x):
        rec[key] = x.detach()

    for l, block in enumerate(blocks(model)):
        rec = store.setdefault(l, {})
        hooks.append(_get(block, a.value).register_forward_hook(lambda m, args, out, rec=rec: keep(rec, "y", out[:, pos])))
        if a.post_norm:
            hooks.append(_get(block, a.post_norm).register_forward_pre_hook(
                lambda m, args, rec=rec: keep(rec, "sum", args[0][:, pos])))
        hooks.append(block.register_forward_hook(
            lambda m, args, out, rec=rec: keep(rec, "out", out[0] if isinstance(out, tuple) else out)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
    for rec in store.values():
        rec["residual"] = (rec.pop("sum") if a.post_norm else rec["out"][:, pos]) - rec.pop("y")


def ffn_output(model, layer: int, residual: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The block's output at the tapped position when its neuron activations are `act` [rows, I]."""
    a = arch_of(model)
    v = residual + value_module(model, layer)(act).to(residual.dtype)
    return _get(blocks(model)[layer], a.post_norm)(v) if a.post_norm else v


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
    a = arch_of(model)
    if not a.causal:
        return BlockInputs()
    layers = out.past_key_values.layers
    kv = PrefixKV([x.keys[:, :, :-1].detach() for x in layers], [x.values[:, :, :-1].detach() for x in layers])
    rope = None
    if a.name != "gpt2":
        pos = torch.tensor([[ids.shape[1] - 1]], device=ids.device)
        rope = model.model.rotary_emb(out.hidden_states[0][:, -1:], pos)
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
    block = blocks(model)[layer]
    sa = block.attention.self
    shape = (*h.shape[:-1], -1, sa.attention_head_size)
    k = sa.key(h).view(shape).transpose(1, 2)
    v = sa.value(h).view(shape).transpose(1, 2)
    # contiguous: a strided 3-d input sends nn.Linear to a batched matmul over copies of the weight
    out = block(h[:, pos : pos + 1].contiguous(), past_key_values=WholeKV(k, v))
    return out[0] if isinstance(out, tuple) else out


def run_block(model, layer: int, h: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    block = blocks(model)[layer]
    a = arch_of(model)
    if not a.causal:
        out = block(h)
    elif a.name == "gpt2":
        out = block(h, past_key_values=inputs.kv)
    else:
        out = block(h, position_embeddings=inputs.rope, past_key_values=inputs.kv)
    return out[0] if isinstance(out, tuple) else out
