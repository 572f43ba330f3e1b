"""Knowledge attribution: integrated gradients of p(target) w.r.t. each FFN neuron at the
answer position (Dai et al., 2022, eq. 3-4).

For layer l with activation a_l at the answer position, the whole layer's activation there is
scaled together: score_l = a_l / m * sum_{k=0}^{m-1} d p(t | activation = (k/m) a_l) / d activation.
alpha = k/m for k = 0..m-1 (a left Riemann sum, as in the authors' released code).

Two implementations that give the same numbers:
- `reference`: the authors' structure. For each layer, a batch of the m scaled copies of the
  prompt runs through the whole model. Plain; it defines the result.
- `fast`: the layers below l do not change when layer l is scaled, so each layer's m rows
  join the batch at their own layer, starting from the clean hidden states. For causal models
  the earlier positions do not change either: the rows are the last position only, attending
  to the clean prefix keys and values. The vocabulary projection runs at the answer position only.
"""
from __future__ import annotations

import contextlib

import torch

from . import arch
from .prompts import Prompt


@contextlib.contextmanager
def patched(model, layer: int, fn):
    """Replace the input of layer's W2 (the neuron activations) by fn(activations)."""
    h = arch.value_module(model, layer).register_forward_pre_hook(lambda mod, args: (fn(args[0]),) + args[1:])
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def recorded(model, pos: int, store: dict):
    """Record every layer's activations at position pos (rows of the batch kept)."""
    L = arch.shape(model)[0]
    hooks = [
        arch.value_module(model, l).register_forward_pre_hook(lambda mod, args, l=l: store.__setitem__(l, args[0][:, pos].detach()))
        for l in range(L)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _alphas(steps: int, device) -> torch.Tensor:
    return torch.arange(steps, device=device, dtype=torch.float32) / steps


def _replace_at(x: torch.Tensor, first_row: int, pos: int, value: torch.Tensor) -> torch.Tensor:
    """x with x[first_row:, pos] = value, differentiably."""
    tail = x[first_row:].clone()
    tail[:, pos] = value.to(x.dtype)
    return torch.cat([x[:first_row], tail]) if first_row else tail


def clean_activations(model, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, I] activations at the answer position, and the [vocab] output probabilities there."""
    ids = torch.tensor([prompt.ids], device=model.device)
    store: dict = {}
    with torch.no_grad(), recorded(model, prompt.pos, store):
        logits = model(ids).logits[0, prompt.pos]
    return torch.stack([store[l][0] for l in range(len(store))]).float(), logits.float().softmax(-1)


def reference(model, prompt: Prompt, target: int, steps: int = 20) -> torch.Tensor:
    """[L, I] attribution scores, one whole-model pass per layer (batch of m scaled copies)."""
    acts, _ = clean_activations(model, prompt)
    ids = torch.tensor([prompt.ids], device=model.device).expand(steps, -1)
    alphas = _alphas(steps, model.device)
    scores = torch.zeros_like(acts)
    for l in range(acts.shape[0]):
        scaled = (alphas[:, None] * acts[l][None]).requires_grad_(True)
        with patched(model, l, lambda x: _replace_at(x, 0, prompt.pos, scaled)):
            logits = model(ids).logits[:, prompt.pos]
        p = logits.float().softmax(-1)[:, target]
        (grad,) = torch.autograd.grad(p.sum(), scaled)
        scores[l] = grad.sum(0) * acts[l] / steps
    return scores


def fast(model, prompt: Prompt, target: int, steps: int = 20, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same numbers as `reference` (fp32), with layers joining the batch at their own layer."""
    a = arch.arch_of(model)
    L, _ = arch.shape(model)
    ids = torch.tensor([prompt.ids], device=model.device)
    store: dict = {}
    with torch.no_grad(), recorded(model, prompt.pos, store), _autocast(model, dtype):
        out = model(ids, use_cache=a.causal, output_hidden_states=True)
    inputs = arch.block_inputs(model, ids, out)
    # causal: rows are the last position alone; masked: rows are whole sequences
    span = slice(-1, None) if a.causal else slice(None)
    pos = 0 if a.causal else prompt.pos
    alphas = _alphas(steps, model.device)

    acts = [store[l][0].float() for l in range(L)]
    leaves, hooks = [], []
    h = None
    try:
        for l in range(L):
            fresh = out.hidden_states[l][:, span].detach().expand(steps, -1, -1)
            first = 0 if h is None else h.shape[0]
            h = fresh if h is None else torch.cat([h, fresh])
            leaf = (alphas[:, None] * acts[l][None]).requires_grad_(True)
            leaves.append(leaf)
            hooks.append(
                arch.value_module(model, l).register_forward_pre_hook(
                    lambda mod, args, first=first, leaf=leaf: (_replace_at(args[0], first, pos, leaf),) + args[1:]
                )
            )
            with _autocast(model, dtype):
                h = arch.run_block(model, l, h, inputs)
        with _autocast(model, dtype):
            logits = arch.head(model, h[:, pos])
        p = logits.float().softmax(-1)[:, target]
        grads = torch.autograd.grad(p.sum(), leaves)
    finally:
        for hk in hooks:
            hk.remove()
    return torch.stack([g.float().sum(0) * acts[l] / steps for l, g in enumerate(grads)])


def _autocast(model, dtype):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


ENGINES = {"reference": reference, "fast": fast}


def scores(model, prompt: Prompt, target: int, steps: int = 20, engine: str = "fast", dtype=None) -> torch.Tensor:
    if engine == "reference":
        with _autocast(model, dtype):
            return reference(model, prompt, target, steps)
    return fast(model, prompt, target, steps, dtype)
