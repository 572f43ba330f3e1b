"""Where each architecture keeps its FFN: the one place that knows; everything else asks here.

The families are data (architectures.yaml, beside this file). A knowledge neuron of layer l is one
intermediate unit of that layer's FFN: the input of its output projection W2 (post-GELU for BERT
and GPT-2, act(gate) * up for gated MLPs). Its value slot is the matching column of W2's torch
weight (a row of W2 in the paper's notation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
import yaml

from ..errors import ModelError


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple[str, ...]
    causal: bool
    blocks: str
    value: str
    output: str
    key: str | None = None
    gate: str | None = None
    conv1d: bool = False
    gated: bool = False
    ffn_norm: str | None = None
    post_norm: str | None = None
    head: tuple[str, ...] = ()
    softcap: str | None = None
    rotary: str | None = None
    rotary_by_layer_type: bool = False
    attention: str | None = None
    flat: bool = False
    block_args: tuple[tuple[str, object], ...] = ()
    requires: tuple[tuple[str, object], ...] = ()
    unsupported: str | None = None


class UnsupportedModel(ModelError):
    pass


REQUIRED = ("model_types", "causal", "blocks", "value", "output")


@cache
def table() -> dict[str, Arch]:
    """model_type -> Arch, from architectures.yaml."""
    raw = yaml.safe_load((resources.files(__package__) / "architectures.yaml").read_text())
    out = {}
    for name, entry in raw.items():
        lacking = [k for k in REQUIRED if k not in entry and "unsupported" not in entry]
        if lacking:
            raise ValueError(f"architectures.yaml: entry {name!r} lacks {', '.join(lacking)}")
        entry = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        for key in ("requires", "block_args"):
            entry[key] = tuple(entry.get(key, {}).items())
        a = Arch(name=name, **{"causal": False, "blocks": "", "value": "", "output": "", **entry})
        out.update({t: a for t in a.model_types})
    return out


def for_type(model_type: str) -> Arch:
    archs = table()
    if model_type not in archs:
        supported = ", ".join(sorted(t for t, a in archs.items() if not a.unsupported))
        raise UnsupportedModel(
            f"model type {model_type!r} is not supported: kn_edit/model/architectures.yaml has no entry for it "
            f"(an entry names its blocks, the FFN's output projection, the output embedding and the head); "
            f"supported: {supported}"
        )
    a = archs[model_type]
    if a.unsupported:
        raise UnsupportedModel(f"model type {model_type!r} is not supported: {a.unsupported}")
    return a


def arch_of(model) -> Arch:
    return for_type(model.config.model_type)


def check(model) -> Arch:
    """The model's Arch, after checking that its config is one the entry covers and that every
    path of the entry leads to a module of this model; else UnsupportedModel naming what is missing."""
    a, cfg = arch_of(model), model.config
    t = cfg.model_type
    for key, want in a.requires:
        got = getattr(cfg, key, None)
        if got != want:
            raise UnsupportedModel(f"{t!r} models with {key}={got!r} are not supported (only {key}={want!r})")
    on_model = {"blocks": [a.blocks], "output": [a.output], "rotary": [a.rotary], "head": list(a.head)}
    on_block = {"value": a.value, "ffn_norm": a.ffn_norm, "post_norm": a.post_norm, "attention": a.attention}
    missing = [
        (k, p, "the model") for k, ps in on_model.items() for p in ps if p and p not in _activations() and not _has(model, p)
    ]
    if not missing:
        block = get(model, a.blocks)[0]
        missing = [(k, p, "a block") for k, p in on_block.items() if p and not _has(block, p)]
    if missing:
        key, path, where = missing[0]
        raise UnsupportedModel(
            f"{t!r}: {key} {path!r} of the architectures.yaml entry {a.name!r} is not in {where} ({type(model).__name__})"
        )
    if a.softcap and not hasattr(model.config, a.softcap):
        raise UnsupportedModel(f"{t!r}: the config has no {a.softcap!r} (softcap of entry {a.name!r})")
    return a


def _activations():
    from transformers.activations import ACT2FN

    return ACT2FN


def _has(obj, path: str) -> bool:
    try:
        get(obj, path)
    except AttributeError:
        return False
    return True


def get(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def blocks(model) -> list[torch.nn.Module]:
    return list(get(model, arch_of(model).blocks))


def value_module(model, layer: int) -> torch.nn.Module:
    """W2 of `layer`; a forward pre-hook on it sees (and may replace) the neuron activations."""
    return get(blocks(model)[layer], arch_of(model).value)


def value_slots(model, layer: int) -> torch.Tensor:
    """[n_neurons, hidden] view of W2: row i is neuron i's value slot. Writes go to the weight."""
    w = value_module(model, layer).weight
    return w if arch_of(model).conv1d else w.t()


def key_module(model, layer: int) -> torch.nn.Module:
    """The FFN's input projection whose output row i is neuron i's (up-)projection: W1, or `up` of act(gate) * up."""
    a = arch_of(model)
    if a.key is None:
        raise UnsupportedModel(f"{a.name}: no `key` entry in architectures.yaml (the key rows cannot be changed)")
    return get(blocks(model)[layer], a.key)


def key_rows(model, layer: int) -> torch.Tensor:
    """[n_neurons, hidden] view of the key module's weight: row i is neuron i's key. Writes go to the weight."""
    w = key_module(model, layer).weight
    return w.t() if arch_of(model).conv1d else w


def gate_rows(model, layer: int) -> torch.Tensor:
    """[n_neurons, hidden]: row i is neuron i's gate row (gated MLPs with a `gate` entry)."""
    a = arch_of(model)
    if a.gate is None:
        raise UnsupportedModel(f"{a.name}: no `gate` entry in architectures.yaml (needs a gated MLP with its own gate)")
    return get(blocks(model)[layer], a.gate).weight


def gate_param_name(model, layer: int) -> str:
    a = arch_of(model)
    return f"{a.blocks}.{layer}.{a.gate}.weight"


def value_param_name(model, layer: int) -> str:
    a = arch_of(model)
    return f"{a.blocks}.{layer}.{a.value}.weight"


def key_param_name(model, layer: int) -> str:
    a = arch_of(model)
    return f"{a.blocks}.{layer}.{a.key}.weight"


@torch.no_grad()
def widen(model, n: int):
    """Every layer's FFN n neurons wider (gated MLPs with `gate` and `key` entries): the new neurons'
    gate and up rows and value slots are zero, so they read 0 and write 0 until set, and
    `config.intermediate_size` grows by n (the saved checkpoint loads as any of its family). The
    base model's modules are kept, not changed: the returned function puts them back."""
    a = arch_of(model)
    if a.gate is None or a.key is None or a.conv1d:
        raise UnsupportedModel(f"{a.name}: widening the FFN needs a gated MLP with `gate` and `key` entries")
    old_width = model.config.intermediate_size
    kept = []
    for block in blocks(model):
        for path, dim in ((a.gate, 0), (a.key, 0), (a.value, 1)):
            *up, name = path.split(".")
            parent = get(block, ".".join(up)) if up else block
            lin = getattr(parent, name)
            w = lin.weight
            pad = list(w.shape)
            pad[dim] = n
            new = torch.nn.Linear(w.shape[1] + n * dim, w.shape[0] + n * (1 - dim), bias=lin.bias is not None)
            new = new.to(w.device, w.dtype).requires_grad_(False)
            new.weight.copy_(torch.cat([w, w.new_zeros(pad)], dim))
            if lin.bias is not None:
                new.bias.copy_(torch.cat([lin.bias, lin.bias.new_zeros(n)]) if dim == 0 else lin.bias)
            kept.append((parent, name, lin))
            setattr(parent, name, new)
    model.config.intermediate_size = old_width + n

    def restore():
        for parent, name, lin in kept:
            setattr(parent, name, lin)
        model.config.intermediate_size = old_width

    return restore


def by_position(model, x: torch.Tensor, seq: int) -> torch.Tensor:
    """An FFN tensor as [batch, seq, features] (flat families' FFNs see [batch * seq, features])."""
    return x.view(-1, seq, x.shape[-1]) if arch_of(model).flat else x


def shape(model) -> tuple[int, int]:
    """(layers, neurons per layer)."""
    return len(blocks(model)), value_slots(model, 0).shape[0]


def output_module(model) -> torch.nn.Module:
    """The output embedding: a Linear from the head's output to the vocabulary (tied or not)."""
    return get(model, arch_of(model).output)


def output_embedding(model) -> torch.Tensor:
    """[vocab, hidden]: the word embeddings the output layer scores against."""
    return output_module(model).weight


def softcap(model) -> float | None:
    """c when the logits are soft-capped as c * tanh(z / c), else None."""
    a = arch_of(model)
    return getattr(model.config, a.softcap, None) if a.softcap else None


def head_input(model, h: torch.Tensor) -> torch.Tensor:
    """The last block's output as the output projection reads it (final norm / MLM transform)."""
    ACT2FN = _activations()
    for step in arch_of(model).head:
        h = ACT2FN[step](h) if step in ACT2FN else get(model, step)(h)
    return h


def logits(model, h: torch.Tensor) -> torch.Tensor:
    """The model's logits for the last block's output h (head, output embedding, soft cap)."""
    z = output_module(model)(head_input(model, h))
    c = softcap(model)
    return z if c is None else c * torch.tanh(z / c)


def rope(model, h: torch.Tensor, pos: torch.Tensor) -> list | None:
    """Per layer, the rotary (cos, sin) of positions pos [rows, S]; None without rotary embeddings."""
    a = arch_of(model)
    if not a.rotary:
        return None
    emb, L = get(model, a.rotary), len(blocks(model))
    if not a.rotary_by_layer_type:
        return [emb(h, pos)] * L
    types = model.config.layer_types
    by_type = {t: emb(h, pos, t) for t in set(types)}
    return [by_type[t] for t in types[:L]]
