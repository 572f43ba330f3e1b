"""solve.select: add and patch (both opt-in) — a memory neuron per edit and layer,
whose key fires for the edit's subject only. add: the neuron is added to the FFN (write() widens every
layer by the batch's count, zero outside the edited layers; undo narrows back); patch: an existing one
is taken over, as described below. Every word below about the key holds for both.

The subject's neurons of the default also fire, more weakly, for other subjects, so whatever is written
into their value slots is read there too (README, "Where the leaks enter"). Here each update takes, in
each layer of `layers`, the least-used neuron of that layer (smallest mean a^2 |v|^2 on the plain text
and the edits' templates about other subjects: the one whose loss changes the model least) and gives it a new key: with x the FFN input at the
subject's last token, averaged over the edit's prompts, and K = mean x x^T, mu = mean x over the plain
text and the edits' templates about other subjects,

    k = K^-1 (a x_e - mu),  a such that k . x_e = 1     (the least mean (k . x + 1)^2 over the background:
                                                          the background's mean mu serves as the bias
                                                          the FFN does not have)
    gate row = ALPHA k,  up row = (SIZE / act(ALPHA)) k

so the neuron's activation act(ALPHA k.x) (SIZE / act(ALPHA)) k.x is SIZE at the subject and near 0
where k.x <= 0 (measured on SmolLM2, layer 4, 24 facts of 8 relations: k.x is -0.8 at the median other
subject of the edited relation and > 0 for 2% of them, below 0 everywhere on unseen text, at least
0.83 on held-out paraphrases; the same k without mu's target, K^-1 x_e / (x_e K^-1 x_e), leaves other
subjects at +0.09 and the activation falling only as (k.x)^2). The value slots are then solved as for
any chosen neuron (apply/solve.py), starting from what they held. Like T-Patcher (Huang et al., 2023), but in existing neurons: the checkpoint differs in
the chosen neurons' gate and up rows and value slots only. Gated MLPs with a `gate` entry only.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import progress
from ..model import arch

ALPHA = 8.0  # sharpness: act(ALPHA k.x) is near 0 for k.x <= 0
SIZE = 4.0  # the activation at the subject
RIDGE = 1e-4  # K + RIDGE * mean diag(K) I


def _act(model, layer: int):
    mlp = getattr(arch.blocks(model)[layer], "mlp", None)
    return getattr(mlp, "act_fn", torch.nn.functional.silu)


@torch.no_grad()
def _stats(model, layers, seqs: list[list[int]]) -> tuple[dict, dict]:
    """Per layer: K = mean x x^T [hidden, hidden] and mu = mean x of the FFN inputs over every position of
    `seqs`, and each neuron's use, mean a^2 |v|^2 [neurons]."""
    hidden = arch.key_rows(model, layers[0]).shape[1]
    width = arch.shape(model)[1]
    K = {l: torch.zeros(hidden, hidden, dtype=torch.float64) for l in layers}
    S = {l: torch.zeros(hidden, dtype=torch.float64) for l in layers}
    a2 = {l: torch.zeros(width, dtype=torch.float64) for l in layers}
    n = [0]

    def seen_x(l, m, args, out):
        x = args[0].flatten(0, -2).double().cpu()
        K[l] += x.T @ x
        S[l] += x.sum(0)

    def seen_a(l, m, args, out):
        a2[l] += args[0].flatten(0, -2).double().pow(2).sum(0).cpu()

    hooks = [arch.key_module(model, l).register_forward_hook(lambda m, a, o, l=l: seen_x(l, m, a, o)) for l in layers]
    hooks += [arch.value_module(model, l).register_forward_hook(lambda m, a, o, l=l: seen_a(l, m, a, o)) for l in layers]
    try:
        for ids in seqs:
            model(input_ids=torch.tensor([ids], device=model.device))
            n[0] += len(ids)
    finally:
        for h in hooks:
            h.remove()
    use = {l: a2[l] / n[0] * arch.value_slots(model, l).double().norm(dim=1).cpu().pow(2) for l in layers}
    return {l: K[l] / n[0] for l in layers}, {l: S[l] / n[0] for l in layers}, use


@torch.no_grad()
def _subject_states(model, prompts, layers) -> dict[int, torch.Tensor]:
    """Per layer, the mean FFN input at the subject's last token over `prompts` [hidden]."""
    out = {l: [] for l in layers}
    hooks = [
        arch.key_module(model, l).register_forward_hook(
            lambda m, a, o, l=l: out[l].append(a[0].flatten(0, -2)[-1].double().cpu())
        )
        for l in layers
    ]
    try:
        for p in prompts:
            model(input_ids=torch.tensor([list(p.ids[: p.subject + 1])], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return {l: torch.stack(v).mean(0) for l, v in out.items()}


def choose(model, edits, layers: range, seqs: list[list[int]], add: bool = False) -> None:
    """Fill in each edit's `neurons` (one per layer of `layers`, distinct over the batch) and `keys`
    {(layer, neuron): (gate row, up row)}. seqs: token ids of the plain text and of prompts about other
    subjects (K and the neurons' use). add: new neurons, numbered from the layer's width on (write()
    widens the FFN), instead of the least-used ones."""
    layers = list(layers)
    K, mu, use = _stats(model, layers, seqs)
    width = arch.shape(model)[1]
    free = {l: list(range(width, width + len(edits))) if add else use[l].argsort().tolist() for l in layers}
    inv = {}
    for l in layers:
        k = K[l]
        inv[l] = torch.linalg.inv(k + RIDGE * k.diagonal().mean() * torch.eye(len(k), dtype=k.dtype))
    with progress.bar(len(edits), "giving each edit its memory neurons", "edit") as bar:
        for e in edits:
            # a prompt without its subject is read at its answer position
            x = _subject_states(
                model, [p if p.subject is not None else replace(p, subject=p.pos) for p in e.located_prompts], layers
            )
            e.neurons, e.keys = [], {}
            for l in layers:
                i = free[l].pop(0)
                # least mean (k . x + 1)^2 over the background with k . x_e = 1: k = K^-1 (a x_e - mu)
                kx, km = inv[l] @ x[l], inv[l] @ mu[l]
                k = (1 + x[l] @ km) / (x[l] @ kx) * kx - km
                up = SIZE / float(_act(model, l)(torch.tensor(ALPHA)))
                e.neurons.append((l, i))
                e.keys[(l, i)] = ((ALPHA * k).float(), (up * k).float())
            e.neurons.sort()
            bar.update(1)


@torch.no_grad()
def write(model, edits):
    """The edits' new gate and up rows into the model, the FFN first widened to hold added neurons;
    returns the function that takes the widening back (None when nothing was added)."""
    width = arch.shape(model)[1]
    added = max((i + 1 - width for e in edits for _, i in (e.keys or {})), default=0)
    narrow = arch.widen(model, added) if added > 0 else None
    for e in edits:
        for (l, i), (g, u) in (e.keys or {}).items():
            rows = arch.gate_rows(model, l)
            rows[i] = g.to(rows.device, rows.dtype)
            rows = arch.key_rows(model, l)
            rows[i] = u.to(rows.device, rows.dtype)
    return narrow
