"""What the model answers on a set of prompts."""

from __future__ import annotations

import torch

from ..model import arch
from ..plan.prompts import Prompt, answering


@torch.no_grad()
def predict(model, prompt: Prompt) -> torch.Tensor:
    """[vocab] output probabilities at the answer position."""
    ids = torch.tensor([prompt.ids], device=model.device)
    return model(ids).logits[0, prompt.pos].float().softmax(-1)


@torch.no_grad()
def predict_many(model, prompts: list[Prompt], batch: int = 32) -> list[torch.Tensor]:
    """`predict` for many prompts, in right-padded batches (padding after the answer position
    changes nothing a causal model sees before it; masked models get an attention mask)."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        n = max(len(p.ids) for p in chunk)
        ids = torch.tensor([list(p.ids) + [0] * (n - len(p.ids)) for p in chunk], device=model.device)
        mask = torch.tensor([[1] * len(p.ids) + [0] * (n - len(p.ids)) for p in chunk], device=model.device)
        logits = model(ids, attention_mask=mask).logits
        out += [logits[j, p.pos].float().softmax(-1) for j, p in enumerate(chunk)]
    return out


@torch.no_grad()
def answer_prob(model, prompt: Prompt, ids: tuple[int, ...]) -> float:
    """p(answer) = prod_j p(ids[j] | prompt, ids[:j]) (teacher forcing; a masked LM: k masks)."""
    from ..locate.attribution import answer_prob as prob

    p = answering(prompt, ids, arch.arch_of(model).causal)
    return float(prob(model(torch.tensor([p.ids], device=model.device)).logits, p.pos, ids)[0])


@torch.no_grad()
def says(model, prompt: Prompt, k: int, first: int | None = None) -> tuple[int, ...]:
    """The model's k-token answer: its greedy continuation (causal), or the top token at each of k
    masks (masked LM). first: the top token at the answer position, when already known."""
    if not arch.arch_of(model).causal:
        p = answering(prompt, (0,) * k, False)
        logits = model(torch.tensor([p.ids], device=model.device)).logits[0, p.pos : p.pos + k]
        return tuple(int(x) for x in logits.float().argmax(-1))
    ids = list(prompt.ids)
    for _ in range(k):
        nxt = first if first is not None and len(ids) == len(prompt.ids) else None
        if nxt is None:
            nxt = int(model(torch.tensor([ids], device=model.device)).logits[0, -1].float().argmax())
        ids.append(nxt)
    return tuple(ids[len(prompt.ids) :])


def says_many(model, prompts: list[Prompt], lengths, batch: int = 32) -> list[tuple[int, ...]]:
    """`says` for many prompts (lengths: one k per prompt, or one k for all): a causal model's greedy
    continuations decoded together, a token per step, in right-padded batches (`predict_many`)."""
    ks = [lengths] * len(prompts) if isinstance(lengths, int) else list(lengths)
    if not arch.arch_of(model).causal:
        return [says(model, p, k) for p, k in zip(prompts, ks, strict=True)]
    out = [[] for _ in prompts]
    for step in range(max(ks, default=0)):
        at = [i for i, k in enumerate(ks) if k > step]
        grown = [_grown(prompts[i], out[i]) for i in at]
        for i, x in zip(at, predict_many(model, grown, batch), strict=True):
            out[i].append(int(x.argmax()))
    return [tuple(x) for x in out]


def starts_many(model, prompts: list[Prompt], targets, batch: int = 32) -> list[bool]:
    """`starts` for many prompts, each with its target ids: a causal model's answers are checked a token
    per step (teacher forcing, which is greedy decoding while the tokens so far agree), and a prompt
    leaves once one differs, so a screen of many prompts costs little more than their first tokens."""
    targets = [tuple(t) for t in targets]
    if not arch.arch_of(model).causal:
        return [starts(model, p, t) for p, t in zip(prompts, targets, strict=True)]
    ok = [True] * len(prompts)
    for step in range(max(map(len, targets), default=0)):
        at = [i for i, t in enumerate(targets) if ok[i] and len(t) > step]
        grown = [_grown(prompts[i], targets[i][:step]) for i in at]
        for i, x in zip(at, predict_many(model, grown, batch), strict=True):
            ok[i] = int(x.argmax()) == targets[i][step]
    return ok


def _grown(prompt: Prompt, ids) -> Prompt:
    """A causal prompt with `ids` appended, its answer position the last one."""
    return Prompt(prompt.text, prompt.ids + tuple(ids), prompt.pos + len(ids), prompt.subject)


def answers(model, prompt: Prompt, lengths, top: int) -> dict[int, tuple[int, ...]]:
    """{k: the model's k-token answer} for k = 1 and each k of lengths; top: the top token at the
    answer position. A causal model's are the prefixes of one greedy continuation."""
    lengths = {1, *lengths}
    n = max(lengths)
    if n == 1:
        return {1: (top,)}
    if arch.arch_of(model).causal:
        cont = says(model, prompt, n, top)
        return {k: cont[:k] for k in sorted(lengths)}
    return {k: (top,) if k == 1 else says(model, prompt, k) for k in sorted(lengths)}


def starts(model, prompt: Prompt, ids: tuple[int, ...]) -> bool:
    """Whether the model's answer (greedy continuation; k masks) is `ids`."""
    if len(ids) == 1:
        return int(predict(model, prompt).argmax()) == ids[0]
    return says(model, prompt, len(ids)) == tuple(ids)


def answer(top: int, probs: dict[int, float], tok, watch: dict[str, int]) -> dict:
    """A report row: the top-1 token and the probabilities of the watched tokens."""
    word = tok.decode([top])
    return {"top1": word.strip() or repr(word), "top1_id": top, **{f"p_{k}": probs[v] for k, v in watch.items()}}


def rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0
