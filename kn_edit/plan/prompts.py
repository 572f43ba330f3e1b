"""Prompts as the model sees them: token ids, the answer position, and targets as token ids.

A prompt is text with one [Y]. For a masked LM, [Y] becomes the mask token and the answer
position is the mask. For a causal LM the text is cut at [Y] (only a final '.' may follow
it) and the answer position is the last token.

A target of k tokens t_1..t_k is read at k positions starting at the answer position
(`answering`): a causal LM gets t_1..t_{k-1} appended to the prompt (teacher forcing), so
position pos + j predicts t_{j+1}; a masked LM gets k mask tokens in place of [Y].
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


def target_ids(tok, prompt: Prompt, word: str, causal: bool) -> tuple[int, ...]:
    """The tokens that put `word` at the prompt's answer position (one or more).

    Found by tokenizing the prompt with the word in place and comparing, so the leading
    space conventions of each tokenizer need no special cases: the tokens before and after
    [Y] must come out as in the prompt, and what lies between them is the target."""
    if causal:
        head = prompt.text.split("[Y]", 1)[0].rstrip()
        full = tok(f"{head} {word}", add_special_tokens=True).input_ids
        ids = tuple(full[len(prompt.ids) :])
        ok = tuple(full[: len(prompt.ids)]) == prompt.ids
    else:
        full = tok(prompt.text.replace("[Y]", word)).input_ids
        after = len(prompt.ids) - prompt.pos - 1
        ids = tuple(full[prompt.pos : len(full) - after])
        ok = (
            tuple(full[: prompt.pos]) == prompt.ids[: prompt.pos]
            and tuple(full[len(full) - after :]) == prompt.ids[prompt.pos + 1 :]
        )
    if not ok or not ids:
        raise PromptError(
            f"{word!r} does not tokenize apart from the prompt {prompt.text!r} (it merges with the text around [Y])"
        )
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise PromptError(f"{word!r} has a token unknown to this model's vocabulary (it tokenizes as {pieces(tok, ids)})")
    return ids


def target_id(tok, prompt: Prompt, word: str, causal: bool) -> int:
    """The single token that puts `word` at the prompt's answer position."""
    ids = target_ids(tok, prompt, word, causal)
    if len(ids) != 1:
        raise PromptError(f"{word!r} is not a single token of this model's vocabulary (it splits into {pieces(tok, ids)})")
    return ids[0]


def as_ids(x) -> tuple[int, ...]:
    """A target as token ids: one id, or a sequence of them."""
    return (int(x),) if isinstance(x, int) else tuple(x)


def pieces(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(list(ids))


def answering(prompt: Prompt, ids: tuple[int, ...], causal: bool) -> Prompt:
    """The prompt made to read the k-token answer `ids` at positions pos .. pos + k - 1: a causal
    LM's with ids[:-1] appended (teacher forcing), a masked LM's with k masks in place of the
    one. A one-token answer gives the prompt itself."""
    k, p = len(ids), prompt.pos
    if k == 1:
        return prompt
    seq = prompt.ids + tuple(ids[:-1]) if causal else prompt.ids[:p] + (prompt.ids[p],) * k + prompt.ids[p + 1 :]
    return Prompt(prompt.text, seq, p, prompt.subject)


def unknown(tok, text: str) -> bool:
    """Whether some of `text` becomes the tokenizer's unknown token."""
    unk = getattr(tok, "unk_token_id", None)
    return unk is not None and unk in tok(text, add_special_tokens=False).input_ids
