"""From attribution scores to knowledge neurons: coarse sets per prompt, refined per fact.

- coarse: per prompt, neurons scoring >= threshold x that prompt's max score;
- refined: neurons in the coarse sets of >= share of the fact's prompts;
- adaptive share: start at `share` and move it by `share_step` (down when facts have fewer
  than target_neurons[0] neurons on average, up when more than target_neurons[1]) until the
  mean lies in range or the share reaches its bound. The share is chosen once for a group of
  facts located together (one update, or one erased relation).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

Neuron = tuple[int, int]  # (layer, index)


@dataclass
class Located:
    """One fact's attribution, reduced to what the later steps need."""

    subject: str
    target: str
    prompts: list[str]
    coarse: list[list[Neuron]]  # per prompt, sorted
    score: dict[Neuron, float] = field(default_factory=dict)  # mean over prompts, coarse neurons only
    activation: dict[Neuron, float] = field(default_factory=dict)  # mean activation at the answer position
    neurons: list[Neuron] = field(default_factory=list)  # refined
    share: float = 0.0


def coarse(scores: torch.Tensor, threshold: float) -> list[Neuron]:
    top = scores.max()
    if top <= 0:
        return []
    idx = (scores >= threshold * top).nonzero().tolist()
    return sorted((int(l), int(i)) for l, i in idx)


def refine(sets: list[list[Neuron]], share: float) -> list[Neuron]:
    counts = Counter(n for s in sets for n in set(s))
    need = share * len(sets) - 1e-9
    return sorted(n for n, c in counts.items() if c >= need)


def choose_share(facts: list[Located], share: float, step: float, lo: int, hi: int, adaptive: bool) -> float:
    def mean(p):
        return sum(len(refine(f.coarse, p)) for f in facts) / max(len(facts), 1)

    if not adaptive:
        return share
    # work in whole steps so that repeated moves do not drift
    k, unit = round(share / step), step
    kmax = round(1.0 / step)
    while mean(k * unit) < lo and k > 1:
        k -= 1
    while mean(k * unit) > hi and k < kmax:
        k += 1
    return round(k * unit, 10)


def finish(facts: list[Located], share: float) -> None:
    for f in facts:
        f.share = share
        f.neurons = refine(f.coarse, share)


def shared_by(facts: list[Located], min_facts: int) -> list[Neuron]:
    counts = Counter(n for f in facts for n in set(f.neurons))
    return sorted(n for n, c in counts.items() if c >= min_facts)
