"""The batch update: the value-slot changes of all updates solved together, with what must not change
in the objective.

Variables: one change d_j (hidden-sized) per selected value slot j = (layer, neuron); nothing else
moves, so the checkpoint differs from the base in those columns of W2 only. With a_j(x) the
neuron's activation, the FFN output becomes  W2 a(x) + sum_j a_j(x) d_j  at every position.

Objective, minimised with Adam (all edits at once):

    mean_edit_prompts  -log p(t' | prompt)                            the edits take
  + keep * mean_prompts  KL(p_base || p)  at the answer position       preservation prompts keep their answers
  + keep * mean_about    KL(p_base || p)  at the answer position       the edited subjects' other relations too
  + text * mean_tokens   KL(p_base || p)                               plain text keeps its distribution
  + l2   * sum_j |d_j|^2 / |v_j|^2                                     small changes
  + spread * sum_layers mean_x |sum_j a_j(x) d_j|^2 / mean_x |FFN(x)|^2  no change elsewhere
                  (x: every position of the plain text and preservation prompts; the mean over
                  them is d^T C d with C the slots' activation second moments, computed once)

An edit prompt stops pulling once t' leads every other token by `margin` (log-probability); the
solve stops when all do, once it has taken `min_steps` (the preservation terms keep working after the
edits are done). From half of the steps on, a position not done weighs `rise` times more after
every step (a multiplier on an unmet constraint), so the preservation terms can slow an edit but
not stop it. A target of k tokens is read under teacher forcing (plan.prompts.answering):
-log p(t') is the sum over its tokens, each position stopping once its token leads by the margin
(then the greedy continuation is t'). An erase pushes down the first token of t alone: once it
trails, no continuation starts with t (a masked LM: at as many masks as t has). Nothing below the
lowest edited layer changes, so the hidden states entering that layer are computed once and each
step runs only the blocks above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import progress
from ..locate import engine
from ..model import arch
from ..plan.prompts import answering, as_ids


@dataclass
class Goal:
    """One edit's prompts (token ids, answer position) and what they should answer: `new_ids` (an
    update), or anything but `old_ids` (an erase); a token id is taken as one-token target."""

    prompts: list  # plan.prompts.Prompt
    new_ids: tuple[int, ...] | None = None
    old_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        self.new_ids = None if self.new_ids is None else as_ids(self.new_ids)
        self.old_ids = None if self.old_ids is None else as_ids(self.old_ids)

    def reads(self, causal: bool) -> list[tuple]:
        """(prompt as the model reads it, token ids to score at its positions pos, pos + 1, ...): an
        update's whole t', an erase's first token of t (a masked LM's read at as many masks as t has)."""
        if self.new_ids is not None:
            return [(answering(p, self.new_ids, causal), self.new_ids) for p in self.prompts]
        return [(answering(p, self.old_ids, causal), self.old_ids[:1]) for p in self.prompts]


@dataclass
class Settings:
    steps: int = 80
    lr: float = 0.1  # Adam step per coordinate, in units of a slot's typical coordinate (mean norm / sqrt(hidden))
    keep: float = 1.0
    text: float = 1.0
    l2: float = 0.01
    spread: float = 0.0
    margin: float = 2.0  # log p(t') - max log p(other) that counts as done
    rise: float = 1.0  # from step steps // 2 on: an edit position's weight x rise after every step it is not done
    min_steps: int = 0  # steps taken even when every edit prompt is done (the preservation terms keep working)
    edit_sample: int = 128  # edit prompts per step, at most (drawn afresh each step; all of them when fewer)
    sample: int = 32  # preservation prompts per step (and as many text tokens x 2), drawn afresh each step
    seed: int = 0
    norm_floor: bool = False  # a slot's size (l2 term, step unit) at least its layer's mean slot norm (patched neurons)


@dataclass
class Stats:
    steps: int = 0
    reached: bool = False
    loss: list[float] = field(default_factory=list)


@dataclass
class _Rows:
    """Sequences of one length, as they enter the lowest edited block, and the positions scored."""

    h: torch.Tensor  # [rows, S, hidden]
    at: tuple[torch.Tensor, torch.Tensor]  # (row, position) of each scored position
    order: list[int]  # which sequence each row is
    idx: torch.Tensor  # [scored positions] each one's index among all sequences' scored positions
    base: torch.Tensor | None = None  # [scored positions, vocab] log-probs of the base model


def _rows(model, seqs: list[list[int]], scored: list[list[int]], layer: int, batch: int, causal: bool = False) -> list[_Rows]:
    """The sequences in groups of up to `batch`, with the hidden states entering block `layer`;
    scored[k]: the positions of sequence k whose output distribution counts. A causal model's
    sequences are padded on the right (no position looks ahead, so padding changes nothing it
    scores); a masked LM's are grouped by length instead."""
    first = [0]
    for s in scored:
        first.append(first[-1] + len(s))
    groups: dict[int, list[int]] = {}
    for k, s in enumerate(seqs):
        groups.setdefault(0 if causal else len(s), []).append(k)
    out = []
    for _, ks in sorted(groups.items()):
        if causal:
            ks = sorted(ks, key=lambda k: len(seqs[k]))
        for i in range(0, len(ks), batch):
            chunk = ks[i : i + batch]
            width = max(len(seqs[k]) for k in chunk)
            ids = [seqs[k] + [seqs[k][-1]] * (width - len(seqs[k])) for k in chunk]
            store: list = []
            with torch.no_grad(), engine.block_input(model, layer, store):
                model(input_ids=torch.tensor(ids, device=model.device))
            pairs = [(r, p) for r, k in enumerate(chunk) for p in scored[k]]
            at = tuple(torch.tensor(x, device=model.device) for x in zip(*pairs, strict=True))
            idx = torch.tensor([first[k] + j for k in chunk for j in range(len(scored[k]))], device=model.device)
            out.append(_Rows(store[0], at, chunk, idx))
    return out


def _logits(model, rows: _Rows, layer: int) -> torch.Tensor:
    """[scored positions, vocab]: the blocks from `layer` up, then the output head."""
    h = rows.h
    inputs = engine.sequence_inputs(model, h)
    for l in range(layer, len(arch.blocks(model))):
        h = engine.run_block(model, l, h, inputs)
    return arch.logits(model, h[rows.at]).float()


def _mean_norm(slots: torch.Tensor) -> float:
    """The mean norm of a layer's value slots, less the zero ones (neurons added by select: add)."""
    n = slots.norm(dim=1)
    return float(n[n > 0].mean())


class _Delta:
    """Forward hooks adding sum_j a_j d_j to the FFN outputs of the layers that hold selected slots."""

    def __init__(self, model, columns, floor: bool = False):
        by_layer: dict[int, list[int]] = {}
        for l, i in sorted(columns):
            by_layer.setdefault(l, []).append(i)
        hidden = arch.value_slots(model, 0).shape[1]
        self.idx = {l: torch.tensor(idx, device=model.device) for l, idx in by_layer.items()}
        self.d = {l: torch.zeros(len(idx), hidden, device=model.device, requires_grad=True) for l, idx in by_layer.items()}
        self.norms = {l: arch.value_slots(model, l)[self.idx[l]].norm(dim=1).detach() for l in by_layer}
        if floor:
            self.norms = {l: n.clamp_min(_mean_norm(arch.value_slots(model, l))) for l, n in self.norms.items()}
        self.model = model
        self.hooks = []

    def __enter__(self):
        for l in self.d:
            mod = arch.value_module(self.model, l)
            self.hooks.append(mod.register_forward_hook(lambda m, args, out, l=l: out + args[0][..., self.idx[l]] @ self.d[l]))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def l2(self):
        return sum(((d / self.norms[l][:, None]) ** 2).sum() for l, d in self.d.items())

    @torch.no_grad()
    def moments(self, rows: list[_Rows], layer: int) -> None:
        """The base model's log-probs at each row's scored positions (`r.base`) and, in the same pass, per
        layer over every position of `rows`: C = mean a a^T of the selected neurons' activations [n, n],
        and mean |FFN(x)|^2 (for spread())."""
        c = {l: torch.zeros(len(i), len(i), dtype=torch.float64, device=i.device) for l, i in self.idx.items()}
        e, n = dict.fromkeys(self.d, 0.0), dict.fromkeys(self.d, 0)

        def seen(l, m, args, out):
            a = args[0].flatten(0, -2)[:, self.idx[l]].double()  # [positions, n]
            c[l] = c[l] + a.T @ a
            e[l] += float(out.double().pow(2).sum())
            n[l] += a.shape[0]

        hooks = [arch.value_module(self.model, l).register_forward_hook(lambda m, a, o, l=l: seen(l, m, a, o)) for l in self.d]
        try:
            for r in rows:
                r.base = _logits(self.model, r, layer).log_softmax(-1)
        finally:
            for h in hooks:
                h.remove()
        self.c = {l: (c[l] / max(n[l], 1) / max(e[l] / max(n[l], 1), 1e-12)).float() for l in self.d}

    def spread(self):
        """sum over layers of mean_x |a(x) D|^2 / mean_x |FFN(x)|^2 on the rows given to moments()."""
        return sum((d * (self.c[l] @ d)).sum() for l, d in self.d.items())

    def result(self) -> dict:
        return {(l, int(i)): self.d[l][k].detach().clone() for l in self.d for k, i in enumerate(self.idx[l].tolist())}


def _edit_loss(model, rows: _Rows, layer: int, target, update, margin: float, pull=None):
    """(summed loss, done flags) of a group of edit prompts' scored positions: an update pulls each
    token of t' up until it leads every other token by the margin; an erase pushes t down until it
    trails by it."""
    logp = _logits(model, rows, layer).log_softmax(-1)
    t, up = target[rows.idx], update[rows.idx]
    gold = logp.gather(1, t[:, None])[:, 0]
    others = logp.scatter(1, t[:, None], -math.inf).max(-1).values
    pulling = torch.where(up, gold - others, others - gold) < margin
    w = pulling if pull is None else pulling * pull[rows.idx]
    return (torch.where(up, -gold, gold - others) * w).sum(), ~pulling


@torch.no_grad()
def _all_done(model, rows, layer, target, update, margin) -> bool:
    return all(bool(_edit_loss(model, r, layer, target, update, margin)[1].all()) for r in rows)


def _kl(base_logp, logits):
    """Summed over rows of KL(p_base || p)."""
    return (base_logp.exp() * (base_logp - logits.log_softmax(-1))).sum()


def solve(
    model, columns, goals: list[Goal], keep_prompts=(), text=(), settings: Settings | None = None, causal=False, near=(), about=()
):
    """{(layer, neuron): change of its value slot} for all goals together, and Stats.
    text: (token ids, scored positions) windows of plain text; causal: the model is a causal LM;
    near: prompts kept by the KL term like keep_prompts but left out of the spread term's moments (facts
    of the edited relations, which fire the edits' own neurons: in the spread term they would hold
    every edit back; at the answer the KL holds back only what changes their answers); about: the same
    for the edited subjects in other relations' prompts, drawn apart (`sample` per step), so that they
    neither crowd out the other preservation prompts nor go unseen."""
    s = settings or Settings()
    layer = min(l for l, _ in columns)
    reads = [(g, *r) for g in goals for r in g.reads(arch.arch_of(model).causal)]
    # one entry per scored position: the token it should read, and whether it is an update's
    target = torch.tensor([t for _, _, ids in reads for t in ids], device=model.device)
    update = torch.tensor([g.new_ids is not None for g, _, ids in reads for _ in ids], device=model.device)
    seqs, scored = [list(p.ids) for _, p, _ in reads], [list(range(p.pos, p.pos + len(ids))) for _, p, ids in reads]
    edit_rows = _rows(model, seqs, scored, layer, 32, causal)
    # preservation rows in small groups, a random share of them per step

    def prompt_rows(prompts):  # scored at the answer position
        return _rows(model, [list(p.ids) for p in prompts], [[p.pos] for p in prompts], layer, 16, causal)

    keep_rows, near_rows, about_rows = prompt_rows(keep_prompts), prompt_rows(near), prompt_rows(about)
    text_rows = _rows(model, [list(w) for w, _ in text], [list(at) for _, at in text], layer, 1, causal)
    delta = _Delta(model, columns, s.norm_floor)
    delta.moments(keep_rows + text_rows, layer)  # the base log-probs, and the spread term's moments
    with torch.no_grad():
        for r in near_rows + about_rows:
            r.base = _logits(model, r, layer).log_softmax(-1)
    keep_rows = keep_rows + near_rows
    gen = torch.Generator().manual_seed(s.seed)

    def draw(rows, budget, size=lambda r: len(r.base)):
        """Groups adding up to about `budget` scored positions, and the weight of one of their positions."""
        total = sum(size(r) for r in rows)
        if total <= budget:
            return rows, 1 / max(total, 1)
        picked, n = [], 0
        for k in torch.randperm(len(rows), generator=gen).tolist():
            if n >= budget:
                break
            picked.append(rows[k])
            n += size(rows[k])
        return picked, 1 / n

    done = torch.zeros(len(target), dtype=torch.bool, device=model.device)  # as last seen, per scored position
    pull = torch.ones(len(target), device=model.device)  # each edit position's weight

    hidden = next(iter(delta.d.values())).shape[1]
    unit = float(torch.cat(list(delta.norms.values())).mean()) / math.sqrt(hidden)
    opt = torch.optim.Adam(list(delta.d.values()), lr=s.lr * unit)
    stats = Stats()
    with delta, progress.bar(s.steps, "solving the batch update", "step") as bar:
        for step in range(s.steps):
            opt.zero_grad()
            total = 0.0
            picked = edit_rows if len(reads) <= s.edit_sample else draw(edit_rows, s.edit_sample, size=lambda r: len(r.order))[0]
            n = sum(len(r.order) for r in picked)
            for r in picked:
                loss, ok = _edit_loss(model, r, layer, target, update, s.margin, pull)
                done[r.idx] = ok
                if not ok.all():
                    (loss / n).backward()
                total += float(loss.detach()) / n
            if step >= s.min_steps and done.all():
                if len(picked) == len(edit_rows) or _all_done(model, edit_rows, layer, target, update, s.margin):
                    stats.reached = True
                    break
            for rows, weight, budget in (
                (keep_rows, s.keep, s.sample),
                (about_rows, s.keep, s.sample),
                (text_rows, s.text, 2 * s.sample),
            ):
                picked, per = draw(rows, budget) if weight else ([], 0)
                for r in picked:
                    loss = weight * per * _kl(r.base, _logits(model, r, layer))
                    loss.backward()
                    total += float(loss.detach())
            loss = s.l2 * delta.l2() + (s.spread * delta.spread() if s.spread else 0)
            loss.backward()
            opt.step()
            if step >= s.steps // 2:
                pull[~done] *= s.rise
            stats.loss.append(total + float(loss.detach()))
            stats.steps = step + 1
            bar.update(1)
        else:
            stats.reached = _all_done(model, edit_rows, layer, target, update, s.margin)
    return delta.result(), stats
