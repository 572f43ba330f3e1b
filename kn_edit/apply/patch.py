"""solve.select: add (the default on gated causal LMs of >= 10 layers) and patch (opt-in) — a memory neuron per edit and layer,
whose key fires for the edit's subject only. add: the neuron is added to the FFN (write() widens every
layer by the batch's count, zero outside the edited layers; undo narrows back); patch: an existing one
is taken over, as described below. Every word below about the key holds for both.

The subject's neurons of the default also fire, more weakly, for other subjects, so whatever is written
into their value slots is read there too (README, "Where the leaks enter"). Here each update takes, in
each layer of `layers`, the least-used neuron of that layer (smallest mean a^2 |v|^2 on the plain text
and the edits' templates about other subjects: the one whose loss changes the model least) and gives it a new key: with
x_p the FFN input at the subject's last token in the edit's located prompt p, or at the token after it where
the subject is the prompt's first token (read_at; one per distinct state: templates that go on alike after the
subject give one), and K = mean x x^T, mu = mean x
over the plain text and the edits' templates about other subjects,

    k = K^-1 (X^T l - mu),  l such that k . x_p = 1 for every p   (the least mean (k . x + 1)^2 over the
                                                          background: the background's mean mu serves as
                                                          the bias the FFN does not have)
    gate row = ALPHA k,  up row = (SIZE / act(ALPHA)) k

so the neuron's activation act(ALPHA k.x) (SIZE / act(ALPHA)) k.x is SIZE at the subject and near 0
where k.x <= 0 (measured on SmolLM2 with one constraint at the prompts' mean state, layer 4, 24 facts of 8 relations: k.x is -0.8 at the median other
subject of the edited relation and > 0 for 2% of them, below 0 everywhere on unseen text, at least
0.83 on held-out paraphrases; the same k without mu's target, K^-1 x_e / (x_e K^-1 x_e), leaves other
subjects at +0.09 and the activation falling only as (k.x)^2).

The up row, by default, is keyed apart (`apart`, solve.near_misses): u instead of k in the up row, the
least mean (u . x)^2 over the background with u . x_p = 1 at the subject's states and u . x_q = 0 at the
states of near misses of the subject (preserve.near_misses: its last word alone or after other words, and names one
word apart from it).
The gate still decides where the neuron is open (about nowhere on the background); where it opens for a
name that ends like the subject's ("Donetsk People's Republic" on the key of "Russian Soviet Federative
Socialist Republic", 0.97 of the subject's reading at SmolLM2's layer 3), the up row reads about 0 and
the neuron writes about nothing. Holding the gate's key itself to -1 there grew its norm 2-3x and made
it fire elsewhere (README, "Memory neurons, measured").

One constraint per state, not one at their mean: a subject read at a prompt's first token and in mid
sentence gives two very different states, and a key fitted to their mean fired at one and not the other
(SmolLM2, the demo's "Germany's capital is" vs "The capital of Germany is": k . x -0.53 vs 3.3, so the
edit held on 2 of its 5 prompts; README, "Memory neurons, measured").

The value slots are then solved as for
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
GRAM_RIDGE = 1e-6  # X K^-1 X^T + GRAM_RIDGE * its mean diagonal I (a guard: the constraints hold to ~1e-4)


def _act(model, layer: int):
    mlp = getattr(arch.blocks(model)[layer], "mlp", None)
    return getattr(mlp, "act_fn", torch.nn.functional.silu)


class _Reached(Exception):
    pass


def _run_to(model, module, ids) -> None:
    """Run `ids` through the model until `module` has run (its forward hooks included), and no further:
    the layers above it and the vocabulary projection change nothing the hooks below it see."""

    def stop(m, a, o):
        raise _Reached

    h = module.register_forward_hook(stop)  # after the hooks already there, so they run first
    try:
        model(input_ids=torch.tensor([list(ids)], device=model.device))
    except _Reached:
        pass
    finally:
        h.remove()


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
            _run_to(model, arch.value_module(model, max(layers)), ids)
            n[0] += len(ids)
    finally:
        for h in hooks:
            h.remove()
    use = {l: a2[l] / n[0] * arch.value_slots(model, l).double().norm(dim=1).cpu().pow(2) for l in layers}
    return {l: K[l] / n[0] for l in layers}, {l: S[l] / n[0] for l in layers}, use


def read_at(p) -> int:
    """Where a memory neuron's key reads prompt p: at the subject's last token, or at the token after it
    where that is the prompt's first token. A first token reads alike whatever it is (SmolLM2, layer 3: FFN
    inputs at cosine 0.95-0.98 for "Israel", "The", "France", "Toyota"...), so a key held to 1 there and -1 on
    the background grew 4x and fired on 10% of other relations' prompt positions ("Israel's capital is": README,
    "Memory neurons, measured")."""
    return p.subject if p.subject > 0 or p.pos == 0 else 1


@torch.no_grad()
def _subject_states(model, prompts, layers) -> dict[int, torch.Tensor]:
    """Per layer, the FFN inputs where the key reads each prompt (read_at: the subject's last token), one
    row per distinct state over `prompts` [states, hidden] (a subject opening the prompt reads the same
    state in every template that goes on alike)."""
    out = {l: [] for l in layers}
    hooks = [
        arch.key_module(model, l).register_forward_hook(
            lambda m, a, o, l=l: out[l].append(a[0].flatten(0, -2)[-1].double().cpu())
        )
        for l in layers
    ]
    try:
        for p in prompts:
            _run_to(model, arch.key_module(model, max(layers)), p.ids[: read_at(p) + 1])
    finally:
        for h in hooks:
            h.remove()
    return {l: torch.unique(torch.stack(v), dim=0) for l, v in out.items()}


def key(K_inv: torch.Tensor, mu: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """The least mean (k . x + 1)^2 over the background (second moment K, mean mu) with k . x_p = 1 for
    every row of X [P, hidden]: k = K^-1 (X^T l - mu), (X K^-1 X^T) l = 1 + X K^-1 mu [hidden]. One row
    is the closed form of the module docstring; a small ridge on the P x P system keeps near-identical
    states from blowing k up."""
    A, km = K_inv @ X.T, K_inv @ mu  # [hidden, P], [hidden]
    G = X @ A
    if len(G) > 1:
        G = G + GRAM_RIDGE * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
    return A @ torch.linalg.solve(G, 1 + X @ km) - km


def apart(K_inv: torch.Tensor, X: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """The least mean (k . x)^2 over the background with k . x_p = 1 for every row of X and k . x_q = 0
    for every row of N [Q, hidden]: k = K^-1 A^T (A K^-1 A^T)^-1 b, A = [X; N], b = [1; 0] [hidden]."""
    A = torch.cat([X, N])
    b = torch.cat([torch.ones(len(X)), torch.zeros(len(N))]).to(A.dtype)
    KA = K_inv @ A.T  # [hidden, P + Q]
    G = A @ KA
    G = G + GRAM_RIDGE * G.diagonal().mean() * torch.eye(len(G), dtype=G.dtype)
    return KA @ torch.linalg.solve(G, b)


def choose(model, edits, layers: range, seqs: list[list[int]], add: bool = False, near: list | None = None) -> None:
    """Fill in each edit's `neurons` (one per layer of `layers`, distinct over the batch) and `keys`
    {(layer, neuron): (gate row, up row)}. seqs: token ids of the plain text and of prompts about other
    subjects (K and the neurons' use). add: new neurons, numbered from the layer's width on (write()
    widens the FFN), instead of the least-used ones. near: per edit, prompts about near misses of its
    subject (preserve.near_misses); where given, the up row is keyed apart from the gate: 1 at the
    subject, 0 at the near misses, so the neuron stays off where the gate fires for a name that ends
    alike."""
    layers = list(layers)
    K, mu, use = _stats(model, layers, seqs)
    width = arch.shape(model)[1]
    free = {l: list(range(width, width + len(edits))) if add else use[l].argsort().tolist() for l in layers}
    inv = {}
    for l in layers:
        k = K[l]
        inv[l] = torch.linalg.inv(k + RIDGE * k.diagonal().mean() * torch.eye(len(k), dtype=k.dtype))
    with progress.bar(len(edits), "giving each edit its memory neurons", "edit") as bar:
        for j, e in enumerate(edits):
            # a prompt without its subject is read at its answer position
            x = _subject_states(
                model, [p if p.subject is not None else replace(p, subject=p.pos) for p in e.located_prompts], layers
            )
            misses = _subject_states(model, near[j], layers) if near and near[j] else None
            e.neurons, e.keys = [], {}
            for l in layers:
                i = free[l].pop(0)
                k = key(inv[l], mu[l], x[l])
                u = k if misses is None else apart(inv[l], x[l], misses[l])
                up = SIZE / float(_act(model, l)(torch.tensor(ALPHA)))
                e.neurons.append((l, i))
                e.keys[(l, i)] = ((ALPHA * k).float(), (up * u).float())
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
