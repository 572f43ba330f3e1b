"""What the model answers on a set of prompts."""

from __future__ import annotations

import torch

from ..plan.prompts import Prompt


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


def answer(top: int, probs: dict[int, float], tok, watch: dict[str, int]) -> dict:
    """A report row: the top-1 token and the probabilities of the watched tokens."""
    word = tok.decode([top])
    return {"top1": word.strip() or repr(word), "top1_id": top, **{f"p_{k}": probs[v] for k, v in watch.items()}}


def rate(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0
