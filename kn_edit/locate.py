"""Locate a fact's knowledge neurons: attribution on each of its prompts, then coarse sets."""
from __future__ import annotations

from . import attribution
from .neurons import Located, coarse
from .prompts import Prompt


def locate(model, subject: str, target: str, prompts: list[Prompt], target_id: int, method, dtype=None) -> Located:
    sets, total, acts = [], None, None
    for p in prompts:
        s = attribution.scores(model, p, target_id, method.steps, method.engine, dtype)
        a, _ = attribution.clean_activations(model, p)
        sets.append(coarse(s, method.threshold))
        total = s if total is None else total + s
        acts = a if acts is None else acts + a
    n = len(prompts)
    seen = sorted({x for s in sets for x in s})
    return Located(
        subject=subject,
        target=target,
        prompts=[p.text for p in prompts],
        coarse=sets,
        score={x: float(total[x]) / n for x in seen},
        activation={x: float(acts[x]) / n for x in seen},
    )
