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
    conv1d: bool = False
    gated: bool = False
    post_norm: str | None = None
    head: tuple[str, ...] = ()
    rotary: str | None = None
    attention: str | None = None


class UnsupportedModel(ModelError):
    pass


@cache
def table() -> dict[str, Arch]:
    """model_type -> Arch, from architectures.yaml."""
    raw = yaml.safe_load((resources.files(__package__) / "architectures.yaml").read_text())
    out = {}
    for name, entry in raw.items():
        a = Arch(name=name, **{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()})
        out.update({t: a for t in a.model_types})
    return out


def for_type(model_type: str) -> Arch:
    archs = table()
    if model_type not in archs:
        raise UnsupportedModel(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(archs))}")
    return archs[model_type]


def arch_of(model) -> Arch:
    return for_type(model.config.model_type)


def get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
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
    from transformers.activations import ACT2FN

    for step in arch_of(model).head:
        h = ACT2FN[step](h) if step in ACT2FN else get(model, step)(h)
    return h
