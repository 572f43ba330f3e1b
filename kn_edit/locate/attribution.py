"""Knowledge attribution: integrated gradients of p(target) w.r.t. each FFN neuron at the
answer position (Dai et al., 2022, eq. 3-4).

A target of k tokens t_1..t_k is attributed through the probability of the whole answer,
p(t) = prod_j p(t_j | prompt, t_<j): a causal LM reads it under teacher forcing (t_1..t_{k-1}
appended to the prompt), a masked LM at k masks put in place of [Y] (plan.prompts.answering).
The neurons are those at the answer position (the last prompt token; the first mask): that is
where the model commits to the answer, and scaling them there reaches every later answer
position through attention. k = 1 is the paper's p(t).

For layer l with activation a_l at the answer position, the whole layer's activation there is
scaled together: score_l = a_l * int_0^1 d p(t | activation = alpha a_l) / d activation d alpha, the
integral taken by a quadrature rule of m gradient evaluations, score_l = a_l * sum_k w_k g(alpha_k).
The paper's (the default, `riemann`): alpha = k/m for k = 0..m-1, w = 1/m (a left Riemann sum, as in
the authors' released code). The others (`QUADRATURE`) are higher-order rules for the same integral;
whether fewer evaluations suffice depends on the model (README, Integral rules). Each layer's integral
is its own, so a layer may have its own rule and m (`Quadrature.layers`, e.g. more points where the integrand
is sharp).

Two implementations that give the same numbers:
- `reference`: the authors' structure. For each layer, a batch of the m scaled copies of the
  prompt runs through the whole model. Plain; it defines the result.
- `fast`: the layers below l do not change when layer l is scaled, so each layer's m rows
  join the batch at the output of block l: the clean output with the answer position recomputed
  from its residual and the scaled activations. For causal models the earlier positions do not
  change either: the rows are the last position only, attending to the clean prefix keys and
  values. A masked LM's top block runs for the answer position only (keys and values from all).
  The vocabulary projection runs at the answer position only, and p(target) and its gradient
  come from one softmax per block of rows (`TargetProb`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..model import arch
from ..plan.prompts import Prompt, answering, as_ids
from . import engine


@contextlib.contextmanager
def patched(model, layer: int, fn, seq: int):
    """Replace the input of layer's W2 (the neuron activations, [batch, seq, I]) by fn(activations)."""

    def hook(mod, args):
        return (fn(arch.by_position(model, args[0], seq)).reshape(args[0].shape),) + args[1:]

    h = arch.value_module(model, layer).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def recorded(model, pos: int, store: dict, seq: int):
    """Record every layer's activations at position pos of sequences of length seq (rows of the batch kept)."""
    L = arch.shape(model)[0]
    hooks = [
        arch.value_module(model, l).register_forward_pre_hook(
            lambda mod, args, l=l: store.__setitem__(l, arch.by_position(model, args[0], seq)[:, pos].detach())
        )
        for l in range(L)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


QUADRATURE = ("riemann", "midpoint", "trapezoid", "gauss", "lobatto")
ENDS = ("trapezoid", "lobatto")  # the rules that evaluate both end points


def quadrature(rule: str, steps: int, device=None, like_riemann: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Points alpha_k in [0, 1] and weights w_k of `rule` with `steps` evaluations, for
    int_0^1 g(alpha) d alpha ~ sum_k w_k g(alpha_k); weights None: all 1/steps.

    riemann: alpha = k/m, k = 0..m-1 (the paper's left Riemann sum; error O(1/m));
    midpoint: alpha = (k + 1/2)/m (O(1/m^2)); trapezoid: alpha = k/(m-1), end points weighted
    1/2 (O(1/m^2), m >= 2); gauss: Gauss-Legendre on [0, 1] (exact for polynomials of degree 2m - 1);
    lobatto: Gauss-Lobatto on [0, 1], both end points among its nodes (exact to degree 2m - 3, m >= 2).

    like_riemann M (a rule of ENDS): the left Riemann sum of M points instead of the integral. That
    sum is exactly the trapezoid rule on its M + 1 points plus (g(0) - g(1)) / 2M, so adding that
    end correction to a rule closer to the integral than the trapezoid gives the paper's sum to
    within the trapezoid's error, (g'(1) - g'(0)) / 12M^2 (Euler-Maclaurin)."""
    if like_riemann and rule not in ENDS:
        raise ValueError(f"like_riemann needs a rule that evaluates both end points ({', '.join(ENDS)})")
    if rule in ("riemann", "midpoint"):
        k = torch.arange(steps, device=device, dtype=torch.float32)
        return (k if rule == "riemann" else k + 0.5) / steps, None
    import numpy as np

    if rule in ENDS and steps < 2:
        raise ValueError(f"the {rule} rule needs steps >= 2")
    if rule == "trapezoid":
        alpha, w = np.linspace(0.0, 1.0, steps), np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
    elif rule == "gauss":
        x, w = np.polynomial.legendre.leggauss(steps)
        alpha, w = (x + 1) / 2, w / 2
    elif rule == "lobatto":
        # nodes: -1, 1 and the roots of P'_{m-1}; weights 2 / (m (m - 1) P_{m-1}(x)^2)
        p = np.polynomial.legendre.Legendre.basis(steps - 1)
        x = np.concatenate([[-1.0], np.sort(p.deriv().roots().real), [1.0]]) if steps > 2 else np.array([-1.0, 1.0])
        alpha, w = (x + 1) / 2, 1.0 / (steps * (steps - 1) * p(x) ** 2)
    else:
        raise ValueError(f"unknown quadrature rule {rule!r} (expected one of {', '.join(QUADRATURE)})")
    if like_riemann:
        w = w.copy()
        w[0] += 1 / (2 * like_riemann)
        w[-1] -= 1 / (2 * like_riemann)
    as_tensor = lambda v: torch.tensor(v, device=device, dtype=torch.float32)
    return as_tensor(alpha), as_tensor(w)


@dataclass(frozen=True)
class Quadrature:
    """How each layer's integral is taken: `rule` with `steps` evaluations (and like_riemann, see
    `quadrature`), except the layers of `layers`, {layer: (rule, steps[, like_riemann])}, which have
    their own. Quadrature(20) is the paper's sum; every function below also takes a plain step count."""

    steps: int = 20
    rule: str = "riemann"
    like_riemann: int | None = None
    layers: dict = field(default_factory=dict)

    @classmethod
    def of(cls, q: Quadrature | int) -> Quadrature:
        return q if isinstance(q, Quadrature) else cls(int(q))

    def points(self, L: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per layer of L, its points and weights."""
        own = {int(l): tuple(r) + (None,) * (3 - len(r)) for l, r in self.layers.items()}
        bad = [l for l in own if not 0 <= l < L]
        if bad:
            raise InputError(f"method.locate.layer_rules: layer {bad[0]} is not a layer of this model (it has 0..{L - 1})")
        rest = (self.rule, self.steps, self.like_riemann)
        made = {r: quadrature(r[0], r[1], device, r[2]) for r in {rest, *own.values()}}
        return [made[own.get(l, rest)] for l in range(L)]


def _integral(grad: torch.Tensor, act: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """act * sum_k w_k grad_k for grad [m, I]; uniform weights as act * sum_k grad_k / m."""
    grad = grad.float()
    if weights is None:
        return grad.sum(0) * act / grad.shape[0]
    return (weights[:, None] * grad).sum(0) * act


def _replace_at(x: torch.Tensor, first_row: int, pos: int, value: torch.Tensor) -> torch.Tensor:
    """x with x[first_row:, pos] = value, differentiably."""
    tail = x[first_row:].clone()
    tail[:, pos] = value.to(x.dtype)
    return torch.cat([x[:first_row], tail]) if first_row else tail


def clean_activations(model, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, I] activations at the answer position, and the [vocab] output probabilities there."""
    ids = torch.tensor([prompt.ids], device=model.device)
    store: dict = {}
    with torch.no_grad(), recorded(model, prompt.pos, store, len(prompt.ids)):
        logits = model(ids).logits[0, prompt.pos]
    return torch.stack([store[l][0] for l in range(len(store))]).float(), logits.float().softmax(-1)


def answer_prob(logits: torch.Tensor, pos: int, targets: tuple[int, ...]) -> torch.Tensor:
    """[rows] prod_j p(t_j) read at positions pos + j of logits [rows, S, vocab]."""
    p = logits[:, pos].float().softmax(-1)[:, targets[0]]
    for j, t in enumerate(targets[1:], 1):
        p = p * logits[:, pos + j].float().softmax(-1)[:, t]
    return p


def reference(model, prompt: Prompt, target, quad: Quadrature | int = 20, with_acts: bool = False) -> torch.Tensor:
    """[L, I] attribution scores, one whole-model pass per layer (batch of m scaled copies).
    target: a token id, or the token ids of a k-token answer; quad: a Quadrature or the paper's m.
    with_acts: (scores, the [L, I] activations at the answer position of the clean pass)."""
    targets = as_ids(target)
    prompt = answering(prompt, targets, arch.arch_of(model).causal)
    acts, _ = clean_activations(model, prompt)
    points = Quadrature.of(quad).points(acts.shape[0], model.device)
    scores = torch.zeros_like(acts)
    for l in range(acts.shape[0]):
        alphas, weights = points[l]
        ids = torch.tensor([prompt.ids], device=model.device).expand(alphas.shape[0], -1)
        scaled = (alphas[:, None] * acts[l][None]).requires_grad_(True)
        with patched(model, l, lambda x: _replace_at(x, 0, prompt.pos, scaled), len(prompt.ids)):
            p = answer_prob(model(ids).logits, prompt.pos, targets)
        (grad,) = torch.autograd.grad(p.sum(), scaled)
        scores[l] = _integral(grad, acts[l], weights)
    return (scores, acts) if with_acts else scores


def fast(
    model, prompt: Prompt, target, quad: Quadrature | int = 20, dtype=None, max_rows: int | None = None, with_acts=False
) -> torch.Tensor:
    """Same numbers as `reference` (fp32), with layers joining the batch at their own layer.
    with_acts: (scores, the [L, I] activations at the answer position of the clean pass).

    Layers are taken in contiguous groups small enough for memory (`max_rows` row-blocks, or a
    budget from free memory); each group starts from the clean output of its first layer.
    Parameters are frozen during the call (no weight-gradient bookkeeping) and restored after.
    bf16/fp16 run on a cached low-precision copy of the weights, under autocast."""
    run = low_precision(model, dtype)
    with frozen(run), _attention(run):
        points = Quadrature.of(quad).points(arch.shape(run)[0], run.device)
        out = _fast(run, prompt, target, dtype, max_rows, points)
    return out if with_acts else out[0]


def _attention(model):
    """On CPU, the plain (math) attention kernel: with these short sequences and many rows the
    fused CPU kernels are slower (BERT-base, 10 tokens: 30% of the whole pass in fp32, more in bf16)."""
    if model.device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _fast(model, prompt, target, dtype, max_rows, points):
    """points: per layer (alphas, weights), Quadrature.points."""
    a = arch.arch_of(model)
    L, _ = arch.shape(model)
    c = _clean_pass(model, a, prompt, target, dtype)
    ids, out, k, _ = c.clean
    inputs = engine.block_inputs(model, ids, out, k)
    if max_rows is None:
        max_rows = row_budget(model, ids.shape[1], dtype)
    grads = []
    for group in layer_groups(L, [len(x) for x, _ in points], max_rows):
        grads += _group_grads(model, a, group, c.taps, inputs, c.acts, c.pos, c.targets, points, dtype)
    return torch.stack([_integral(g, c.acts[l], points[l][1]) for l, g in enumerate(grads)]), torch.stack(c.acts)


def _group_grads(model, a, layers, taps, inputs, acts, answer_pos, targets, points, dtype):
    """Gradients of p(answer) w.r.t. the scaled activations of `layers` (contiguous); points: per
    layer (alphas, weights).

    Layer l's m rows start at the output of block l: the clean output, with the answer position
    recomputed from its residual and the scaled activations (nothing else in block l changes)."""
    k = len(targets)
    # causal: rows are the last k positions (the answer's); masked: rows are whole sequences
    span = slice(-k, None) if a.causal else slice(None)
    pos = 0 if a.causal else answer_pos
    read = span if a.causal else slice(answer_pos, answer_pos + k)  # the positions the head reads
    leaves, h = [], None
    top = len(acts) - 1
    for l in range(layers[0], len(acts)):
        with _autocast(model, dtype):
            if h is not None:
                # masked LMs: the top block runs for the answer position alone
                h = (
                    engine.run_block_at(model, l, h, pos, inputs, k)
                    if l == top and not a.causal
                    else engine.run_block(model, l, h, inputs)
                )
            if l in layers:
                alphas = points[l][0]
                steps = alphas.shape[0]
                leaf = (alphas[:, None] * acts[l][None]).requires_grad_(True)
                leaves.append(leaf)
                at = engine.ffn_output(model, l, taps[l]["residual"], leaf)
                if l == top and k == 1:
                    rows = at[:, None]
                elif l == top:
                    rows = _replace_at(taps[l]["out"][:, read].expand(steps, -1, -1), 0, 0, at)
                else:
                    rows = _replace_at(taps[l]["out"][:, span].expand(steps, -1, -1), 0, pos, at)
                h = rows if h is None else torch.cat([h, rows.to(h.dtype)])
    out = arch.output_module(model)
    p = None
    for j, t in enumerate(targets):  # k positions left: the answer's
        with _autocast(model, dtype):
            x = arch.head_input(model, h[:, j])
        pj = TargetProb.apply(x, out.weight, out.bias, t, arch.softcap(model))
        p = pj if p is None else p * pj
    return list(torch.autograd.grad(p.sum(), leaves))


class TargetProb(torch.autograd.Function):
    """p(target) = softmax(x W^T + b)[target] per row, and its gradient w.r.t. x only (with `cap`,
    the logits z are soft-capped first: cap * tanh(z / cap)). target: one token id, or a tensor of
    one per row.

    The same numbers as autograd through logits -> softmax -> index, without its extra
    [rows, vocab] tensors (the softmax output, its gradient, the zero-filled index gradient):
    one softmax per block of rows, kept for backward and turned into the gradient in place.
    Blocks stay under ~16 MB, small enough for the CPU allocator to reuse (larger ones are
    fresh pages on every call)."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, cap=None):
        w = weight.to(x.dtype)
        rows = max(1, (1 << 22) // weight.shape[0])
        soft, slope = [], []
        for xs in x.split(rows):
            z = (xs @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), xs, w.t())).float()
            if cap:
                z = torch.tanh(z / cap)
                slope.append(1 - z * z)  # d capped / d z
                z = cap * z
            soft.append(z.softmax(-1))
        ctx.soft, ctx.slope, ctx.target, ctx.rows = soft, slope, target, rows
        ctx.save_for_backward(w)
        if isinstance(target, torch.Tensor):  # one target per row (several prompts)
            return torch.cat([s.gather(1, t[:, None])[:, 0] for s, t in zip(soft, target.split(rows))])
        return torch.cat([s[:, target] for s in soft])

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        t, out = ctx.target, []
        # d p_t / d z = p_t (onehot_t - softmax(z))
        per_row = isinstance(t, torch.Tensor)
        ts = t.split(ctx.rows) if per_row else [t] * len(ctx.soft)
        for k, (s, g, tk) in enumerate(zip(ctx.soft, grad.float().split(ctx.rows), ts)):
            if per_row:
                r = torch.arange(s.shape[0], device=s.device)
                c = g * s[r, tk]
                s.mul_(-c[:, None])
                s[r, tk] += c
            else:
                c = g * s[:, t]
                s.mul_(-c[:, None])
                s[:, t] += c
            if ctx.slope:
                s.mul_(ctx.slope[k])
            out.append(s.to(w.dtype) @ w)
        ctx.soft = ctx.slope = None
        return torch.cat(out), None, None, None, None


def layer_groups(L: int, steps, max_rows: int) -> list[range]:
    """Contiguous layer groups whose rows x blocks (layer l's rows run L - l blocks) fit in
    max_rows; a group holds at least one layer. steps: rows per layer, one number or one per layer."""
    steps = [steps] * L if isinstance(steps, int) else steps
    groups, start, used = [], 0, 0
    for l in range(L):
        cost = steps[l] * (L - l)
        if l > start and used + cost > max_rows:
            groups.append(range(start, l))
            start, used = l, 0
        used += cost
    groups.append(range(start, L))
    return groups


def row_budget(model, seq: int, dtype=None) -> int:
    """How many row-blocks (one row through one block, activations kept for backward) fit in
    a share of the free memory: half the free GPU memory, a quarter of the free RAM."""
    cfg = model.config
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    heads = cfg.num_attention_heads
    causal = arch.arch_of(model).causal
    rows = 1 if causal else seq
    elem = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    # saved tensors of one block for one row: ~12 hidden-sized, ~4 intermediate-sized, attention probs
    per = rows * (12 * hidden + 4 * inter + 3 * heads * seq) * elem
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0] // 2
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    return max(1, int(free // per))


@contextlib.contextmanager
def frozen(model):
    """Parameters with requires_grad off (restored after): autograd then tracks the scaled
    activations only. With trainable parameters the backward pass is ~2.5x slower."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)


_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def low_precision(model, dtype):
    """The model itself for fp32; else a copy with weights in dtype, cached per model and
    rebuilt when any weight was changed in place since (edits write into W2)."""
    if dtype is None or dtype == torch.float32:
        return model
    key = (dtype, tuple(p._version for p in model.parameters()))
    hit = _copies.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    _copies.pop(model, None)
    low = copy.deepcopy(model).to(dtype)
    _copies[model] = (key, low)
    return low


def _autocast(model, dtype):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=dtype)


# ---------------------------------------------------------------- several prompts in one pass
def fast_many(model, items: list, quad: Quadrature | int = 20, dtype=None, max_rows: int | None = None, with_acts=False) -> list:
    """`fast` for several prompts at once: items [(prompt, target), ...], one [L, I] score tensor each
    (with_acts: (scores, activations) each).

    Each prompt has its own clean pass; then the m rows of every prompt join one batch at each layer,
    so that every block, the vocabulary projection and the backward pass run once for all of them.
    Prompts of different shapes are right-padded (causal: the answer's positions to the longest
    answer, the prefix keys/values to the longest prefix; masked: whole sequences to the longest),
    and the padding is masked out of attention: no position that is scored sees it. The numbers are
    those of `fast` on each prompt alone up to float rounding (the matrix products have other shapes)."""
    if len(items) == 1:
        return [fast(model, items[0][0], items[0][1], quad, dtype, max_rows, with_acts)]
    run = low_precision(model, dtype)
    with frozen(run), _attention(run):
        points = Quadrature.of(quad).points(arch.shape(run)[0], run.device)
        out = _fast_many(run, items, dtype, max_rows, points)
    return out if with_acts else [s for s, _ in out]


@dataclass
class _Clean:
    """One prompt's clean pass, for fast_many."""

    pos: int
    targets: tuple[int, ...]
    taps: dict
    acts: list
    clean: tuple  # (ids, out, k, pos) for engine.batch_inputs


def _clean_pass(model, a, prompt, target, dtype) -> _Clean:
    L, _ = arch.shape(model)
    targets = as_ids(target)
    prompt = answering(prompt, targets, a.causal)
    ids = torch.tensor([prompt.ids], device=model.device)
    store, taps = {}, {}
    seq = ids.shape[1]
    with (
        torch.no_grad(),
        recorded(model, prompt.pos, store, seq),
        engine.ffn_taps(model, prompt.pos, taps, seq),
        _autocast(model, dtype),
    ):
        out = model(ids, output_hidden_states=True, **engine.cache_kwargs(model))
    acts = [store[l][0].float() for l in range(L)]
    return _Clean(prompt.pos, targets, taps, acts, (ids, out, len(targets), prompt.pos))


def _fast_many(model, items, dtype, max_rows, points):
    a = arch.arch_of(model)
    L, _ = arch.shape(model)
    cs = [_clean_pass(model, a, p, t, dtype) for p, t in items]
    batch = engine.batch_inputs(model, [c.clean for c in cs])
    longest = max(c.clean[0].shape[1] for c in cs)
    for c in cs:
        c.clean = None  # the clean outputs (keys/values) are in `batch` now
    steps = [len(x) for x, _ in points]
    if max_rows is None:
        max_rows = row_budget(model, longest, dtype)
        if model.device.type == "cpu":
            # no larger than one prompt's group of every layer: on a CPU, larger groups run slower per
            # row (their tensors leave the caches; SmolLM2, 4 prompts: 4.1 s/prompt in one group, 2.5 in four)
            max_rows = min(max_rows, sum(m * (L - l) for l, m in enumerate(steps)))
    grads = [[] for _ in cs]
    for group in layer_groups(L, [m * len(cs) for m in steps], max_rows):
        for l, g in zip(group, _group_grads_many(model, a, group, cs, batch, points, dtype)):
            for i, gi in enumerate(g.split(steps[l])):
                grads[i].append(gi)
    return [
        (torch.stack([_integral(g, c.acts[l], points[l][1]) for l, g in enumerate(gs)]), torch.stack(c.acts))
        for c, gs in zip(cs, grads)
    ]


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """[1, n, hidden] right-padded with zeros to [1, width, hidden]."""
    return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))


def _group_grads_many(model, a, layers, cs, batch, points, dtype):
    """_group_grads for several prompts: per layer of `layers`, the gradients [N * m, I] of every
    prompt's rows (prompt after prompt, m rows each, m the layer's). Rows are ordered by layer, then
    prompt, then step."""
    dev = model.device
    n = len(cs)
    ks = torch.tensor([len(c.targets) for c in cs], device=dev)
    K = int(ks.max())
    top = len(cs[0].acts) - 1
    # the prompt of each row
    who = torch.cat([torch.arange(n, device=dev).repeat_interleave(len(points[l][0])) for l in layers])
    pos = torch.tensor([c.pos for c in cs], device=dev)
    # masked LMs' top block: each row's answer positions (padded answers read the last position, unused)
    tops = (pos[:, None] + torch.arange(K, device=dev)).clamp(max=batch.width - 1)
    leaves, h = [], None
    for l in range(layers[0], len(cs[0].acts)):
        with _autocast(model, dtype):
            if h is not None:
                w = who[: h.shape[0]]
                if l == top and not a.causal:
                    mask = None if batch.top_mask is None else batch.top_mask.index_select(0, w)
                    h = engine.run_block_rows(model, l, h, tops.index_select(0, w), batch.rows(w), mask)
                else:
                    h = engine.run_block(model, l, h, batch.rows(w))
            if l in layers:
                alphas = points[l][0]
                steps = alphas.shape[0]
                leaf = torch.cat([alphas[:, None] * c.acts[l][None] for c in cs]).requires_grad_(True)
                leaves.append(leaf)
                residual = torch.cat([c.taps[l]["residual"].expand(steps, -1) for c in cs])
                at = engine.ffn_output(model, l, residual, leaf)
                if l == top and K == 1:
                    rows = at[:, None]
                elif a.causal or l == top:  # the answer's positions, the scaled one first
                    span = [
                        c.taps[l]["out"][:, -len(c.targets) :]
                        if a.causal
                        else c.taps[l]["out"][:, c.pos : c.pos + len(c.targets)]
                        for c in cs
                    ]
                    rows = _replace_at(torch.cat([_padded(x, K).expand(steps, -1, -1) for x in span]), 0, 0, at)
                else:  # whole sequences, the scaled position each prompt's own
                    rows = torch.cat([_padded(c.taps[l]["out"], batch.width).expand(steps, -1, -1) for c in cs])
                    rows[torch.arange(n * steps, device=dev), pos.repeat_interleave(steps)] = at.to(rows.dtype)
                h = rows if h is None else torch.cat([h, rows.to(h.dtype)])
    out = arch.output_module(model)
    targets = torch.tensor([list(c.targets) + [0] * (K - len(c.targets)) for c in cs], device=dev)
    p = None
    for j in range(K):  # position j of each row's answer; rows whose answer is shorter are done
        sel = None if bool((ks > j).all()) else (ks.index_select(0, who) > j).nonzero()[:, 0]
        rows_j = who if sel is None else who.index_select(0, sel)
        with _autocast(model, dtype):
            x = arch.head_input(model, h[:, j] if sel is None else h[sel, j])
        pj = TargetProb.apply(x, out.weight, out.bias, targets[rows_j, j], arch.softcap(model))
        if p is None:
            p = pj
        elif sel is None:
            p = p * pj
        else:
            p = p.index_put((sel,), p[sel] * pj)
    return list(torch.autograd.grad(p.sum(), leaves))


def scores_many(
    model, items: list, quad: Quadrature | int = 20, engine: str = "fast", dtype=None, batch=1, tick=None, with_acts=False
) -> list:
    """`scores` of items [(prompt, target), ...], in their order (with_acts: (scores, activations), see `scores`). batch > 1 (the fast engine): passes of up
    to `batch` prompts (fast_many), formed after sorting the prompts by shape, so that prompts of equal
    length share a pass where they can (no padding). batch 1: `scores` prompt by prompt. tick(n) after
    every n prompts done."""
    tick = tick or (lambda n: None)
    if batch <= 1 or engine != "fast":
        out = []
        for p, t in items:
            out.append(scores(model, p, t, quad, engine, dtype, with_acts))
            tick(1)
        return out
    causal = arch.arch_of(model).causal

    def shape(k):
        p, t = items[k]
        ids, n = len(answering(p, as_ids(t), causal).ids), len(as_ids(t))
        return (n, ids) if causal else (ids, n)  # what padding costs most: the answer's length (causal)

    order = sorted(range(len(items)), key=shape)
    out = [None] * len(items)
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        for k, s in zip(chunk, fast_many(model, [items[k] for k in chunk], quad, dtype, None, with_acts)):
            out[k] = s
        tick(len(chunk))
    return out


ENGINES = {"reference": reference, "fast": fast}


def scores(model, prompt: Prompt, target, quad: Quadrature | int = 20, engine: str = "fast", dtype=None, with_acts=False):
    """[L, I] scores; with_acts: (scores, [L, I] activations at the answer position of the prompt the answer
    is read from (a k-token answer: with its first k - 1 tokens appended, or k masks), in the compute dtype)."""
    if engine == "reference":
        with _autocast(model, dtype):
            return reference(model, prompt, target, quad, with_acts)
    return fast(model, prompt, target, quad, dtype, with_acts=with_acts)
