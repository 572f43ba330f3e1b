"""Does the edited model still work everywhere else? Measured on data shipped with kn-edit
(kn_edit/data, written for it, MIT), which the edits never see:

- plain-text perplexity: exp(mean -log p) over the tokens of text_probe.txt (causal: next token
  under teacher forcing; masked: each token masked once, in 7 interleaved passes per window);
- probe answers: the share of everyday factual prompts (prompts_probe.txt) whose top-1 answer is
  the same as the base model's. Prompts that name a subject the spec edits are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources

import torch

from ..plan.prompts import encode
from .predict import predict_many

WINDOW = 1024  # tokens per window of the text, at most (less where the model's positions end sooner)
GROUPS = 7  # masked LMs: every 7th token masked per pass


def shipped(name: str) -> str:
    return (resources.files("kn_edit") / "data" / name).read_text()


def prompts(name: str, tok, causal: bool, avoid: set[str] = frozenset()) -> list:
    """The shipped prompts of `name` (a data file), encoded; those naming an edited subject left out."""
    out = []
    for line in shipped(name).splitlines():
        if not line.strip() or any(s.lower() in line.lower() for s in avoid):
            continue
        try:
            out.append(encode(tok, line.strip(), causal))
        except Exception:  # noqa: BLE001 - a prompt this tokenizer cannot read is left out
            continue
    return out


def _windows(ids: list[int], n: int) -> list[list[int]]:
    return [ids[i : i + n] for i in range(0, len(ids), n) if len(ids[i : i + n]) > 1]


@torch.no_grad()
def text_nll(model, tok, text: str, causal: bool) -> tuple[float, int]:
    """(sum of -log p over the scored tokens, number of scored tokens)."""
    ids = tok(text, add_special_tokens=False).input_ids
    total, count = 0.0, 0
    dev = model.device
    window = min(WINDOW, getattr(model.config, "max_position_embeddings", WINDOW) - 2)
    if causal:
        bos = tok("", add_special_tokens=True).input_ids  # what the tokenizer puts before a text, if anything
        for w in _windows(ids, window):
            x = torch.tensor([bos + w], device=dev)
            logp = model(x).logits[0].float().log_softmax(-1)  # [len, vocab]
            start = len(bos)  # score every token that has a context (the first only after a bos)
            first = max(start, 1)
            tgt = x[0, first:]
            total -= float(logp[first - 1 : -1].gather(1, tgt[:, None]).sum())
            count += len(tgt)
        return total, count
    for w in _windows(ids, window):
        body = torch.tensor(w, device=dev)
        rows = []
        for g in range(GROUPS):
            masked = body.clone()
            masked[g::GROUPS] = tok.mask_token_id
            rows.append(torch.tensor([tok.cls_token_id, *masked.tolist(), tok.sep_token_id], device=dev))
        logp = model(torch.stack(rows)).logits.float().log_softmax(-1)  # [GROUPS, len + 2, vocab]
        for g in range(GROUPS):
            pos = torch.arange(g, len(w), GROUPS, device=dev)
            total -= float(logp[g, pos + 1].gather(1, body[pos][:, None]).sum())
            count += len(pos)
    return total, count


def perplexity(model, tok, text: str, causal: bool) -> float:
    nll, n = text_nll(model, tok, text, causal)
    return math.exp(nll / n)


@dataclass
class Probe:
    """Safety measurements of one model (base or edited)."""

    text_ppl: float | None  # None: the tokenizer cannot read the text
    answers: list[int]  # top-1 per probe prompt


def measure(model, tok, causal: bool, probe_prompts) -> Probe:
    answers = [int(p.argmax()) for p in predict_many(model, probe_prompts)] if probe_prompts else []
    try:
        ppl = perplexity(model, tok, shipped("text_probe.txt"), causal)
    except Exception:  # noqa: BLE001 - e.g. a word-level test tokenizer without an unknown token
        ppl = None
    return Probe(ppl, answers)


def compare(before: Probe, after: Probe) -> dict:
    kept = [a == b for a, b in zip(before.answers, after.answers, strict=True)]
    change = None if before.text_ppl is None or after.text_ppl is None else after.text_ppl / before.text_ppl - 1.0
    return {
        "text_ppl_before": before.text_ppl,
        "text_ppl_after": after.text_ppl,
        "text_ppl_change": change,
        "probe_prompts": len(kept),
        "probe_kept": sum(kept) / len(kept) if kept else None,
    }
