"""Prompts as the model sees them: token ids, the answer position, and single-token targets.

A prompt is text with one [Y]. For a masked LM, [Y] becomes the mask token and the answer
position is the mask. For a causal LM the text is cut at [Y] (only a final '.' may follow
it) and the answer position is the last token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAIL = re.compile(r"^\s*\.?\s*$")


@dataclass(frozen=True)
class Prompt:
    text: str  # with [Y]
    ids: tuple[int, ...]
    pos: int  # answer position
    subject: int | None = None  # position of the subject's last token, when the subject is known


class PromptError(ValueError):
    pass


def causal_ok(text: str) -> bool:
    return bool(_TAIL.match(text.split("[Y]", 1)[1]))


def encode(tok, text: str, causal: bool, subject: str | None = None) -> Prompt:
    if causal:
        head, tail = text.split("[Y]", 1)
        if not _TAIL.match(tail):
            raise PromptError(f"{text!r}: for a causal model [Y] must end the prompt (only a '.' may follow)")
        seen = head.rstrip()
        ids = tok(seen, add_special_tokens=True).input_ids
        return Prompt(text, tuple(ids), len(ids) - 1, _last_token(tok, seen, subject))
    seen = text.replace("[Y]", tok.mask_token)
    ids = tok(seen).input_ids
    return Prompt(text, tuple(ids), ids.index(tok.mask_token_id), _last_token(tok, seen, subject))


def _last_token(tok, seen: str, subject: str | None) -> int | None:
    """The position of the token that ends the subject's first occurrence in `seen` (None when the
    subject is not there or the tokenizer gives no character offsets)."""
    at = seen.find(subject) if subject else -1
    if at < 0:
        return None
    end = at + len(subject)
    try:
        spans = tok(seen, add_special_tokens=True, return_offsets_mapping=True).offset_mapping
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
        return None
    inside = [k for k, (a, b) in enumerate(spans) if b > a and a < end]
    return inside[-1] if inside else None


def target_id(tok, prompt: Prompt, word: str, causal: bool) -> int:
    """The single token that puts `word` at the prompt's answer position.

    Found by tokenizing the prompt with the word in place and comparing, so the leading
    space conventions of each tokenizer need no special cases."""
    if causal:
        head = prompt.text.split("[Y]", 1)[0].rstrip()
        full = tok(f"{head} {word}", add_special_tokens=True).input_ids
        ok = len(full) == len(prompt.ids) + 1 and tuple(full[:-1]) == prompt.ids
        tid = full[-1]
    else:
        full = tok(prompt.text.replace("[Y]", word)).input_ids
        ok = len(full) == len(prompt.ids) and all(a == b for i, (a, b) in enumerate(zip(full, prompt.ids)) if i != prompt.pos)
        tid = full[prompt.pos] if ok else None
    if not ok:
        pieces = tok.tokenize(word if not causal else f" {word}")
        raise PromptError(f"{word!r} is not a single token of this model's vocabulary (it splits into {pieces})")
    if tid is not None and tid == getattr(tok, "unk_token_id", None) and word != tok.unk_token:
        raise PromptError(f"{word!r} is not in this model's vocabulary (it becomes the unknown token {tok.unk_token!r})")
    return tid


def unknown(tok, text: str) -> bool:
    """Whether some of `text` becomes the tokenizer's unknown token."""
    unk = getattr(tok, "unk_token_id", None)
    return unk is not None and unk in tok(text, add_special_tokens=False).input_ids
