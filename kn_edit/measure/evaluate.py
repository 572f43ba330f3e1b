"""The verify step: answers measured before and after the edits, interventions on the located
neurons, and a random-neuron control for each edit.

- suppression / amplification: relative change of p(gold) when a fact's neurons are set to 0 /
  doubled at the answer position (on the base model);
- the control: per edit, as many random neurons from the same layers, drawn from the spec's
  seed, edited with the same rule; every metric is computed for it the same way.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from .. import progress
from ..apply import rules
from ..apply.write import apply
from ..locate import attribution
from ..model import arch
from ..plan.prompts import Prompt, answering, as_ids
from . import predict as prediction
from .metrics import Seen, average, consistency, edit_metrics, mean, rel_change

Neuron = tuple[int, int]


@dataclass
class EditResult:
    """What verification found for one edit."""

    intervention: tuple = (None, None)  # (suppression, amplification) of its located neurons, base model
    intervention_control: tuple = (None, None)  # the same for random neurons
    control_runs: list[dict] = field(default_factory=list)  # metrics of the control, per draw
    metrics: dict | None = None
    control: dict | None = None  # mean over the draws


def _wanted(edits) -> dict[tuple[int, ...], tuple[Prompt, set[tuple[int, ...]]]]:
    """Per prompt's token ids, a prompt with them and every answer watched there: prompts that read the
    same ("X, developed by [Y]." of one edit and "X, developed by [Y]" of another) are one, measured once
    with the answers of both."""
    want = {}
    for e in edits:
        pr = e.probe
        for f in pr.facts + pr.intra + pr.inter:
            for p in f.prompts:
                got = want.setdefault(p.ids, (p, set()))[1]
                got.add(f.target_ids)
                if pr.new_ids is not None and f in pr.facts:
                    got.add(pr.new_ids)
    return want


@torch.no_grad()
def measure(model, edits) -> Seen:
    """The answers (of each length watched) and the watched answers' probabilities on every
    prompt the edits' probes name."""
    seen = {}
    for p, want in _wanted(edits).values():
        probs = prediction.predict(model, p)
        tops = prediction.answers(model, p, {len(t) for t in want}, int(probs.argmax()))
        seen[p.ids] = (tops, {t: answer_p(model, p, t, probs) for t in sorted(want)})
    return seen


def answer_p(model, prompt: Prompt, ids: tuple[int, ...], probs: torch.Tensor) -> float:
    """p(ids): read from probs, the answer position's distribution, for one token."""
    return float(probs[ids[0]]) if len(ids) == 1 else prediction.answer_prob(model, prompt, ids)


def _by_layer(neurons) -> dict[int, list[int]]:
    out = defaultdict(list)
    for l, i in neurons:
        out[int(l)].append(int(i))
    return out


@torch.no_grad()
def scaled_p(model, prompt: Prompt, neurons, factor: float, target) -> float:
    """p(target) with the neurons' activations at the answer position multiplied by factor."""

    def fn(idx):
        def scale(x):
            x = x.clone()
            x[:, prompt.pos, idx] *= factor
            return x

        return scale

    target = as_ids(target)
    seq = len(answering(prompt, target, arch.arch_of(model).causal).ids)  # what the model reads
    with contextlib.ExitStack() as stack:
        for layer, idx in _by_layer(neurons).items():
            stack.enter_context(attribution.patched(model, layer, fn(idx), seq))
        if len(target) == 1:
            return float(prediction.predict(model, prompt)[target[0]])
        return prediction.answer_prob(model, prompt, target)


def intervention(model, fact, neurons, before: Seen) -> tuple[float | None, float | None]:
    """(suppression, amplification): mean relative change of p(gold) over the fact's prompts."""
    if not neurons:
        return None, None
    out = []
    for factor in (0.0, 2.0):
        out.append(
            mean(
                rel_change(before[p.ids][1][fact.target_ids], scaled_p(model, p, neurons, factor, fact.target_ids))
                for p in fact.prompts
            )
        )
    return out[0], out[1]


def mean_pairs(pairs):
    return tuple(mean(x[i] for x in pairs if x[i] is not None) for i in range(2)) if pairs else (None, None)


# ---- the random-neuron control ----------------------------------------------------------


def draw(neurons, n_per_layer: int, rng: random.Random, exclude=()) -> list[Neuron]:
    """As many neurons per layer as `neurons` has, drawn uniformly from that layer without the
    excluded (the real) ones."""
    exclude = {tuple(x) for x in exclude}
    out = []
    for layer, idx in sorted(_by_layer(neurons).items()):
        choices = [i for i in range(n_per_layer) if (layer, i) not in exclude]
        out += [(layer, i) for i in rng.sample(choices, len(idx))]
    return sorted(out)


def rng_for(seed: int, edit: int, draw_no: int, what: str = "edit") -> random.Random:
    return random.Random(f"kn-edit-control:{seed}:{edit}:{draw_no}:{what}")


def control_neurons(model, edited, seed: int, draws: int) -> list[list[list[Neuron]]]:
    """[draw][edit] -> random neurons matched to edited[edit]."""
    n = arch.shape(model)[1]
    return [[draw(e, n, rng_for(seed, k, d), e) for k, e in enumerate(edited)] for d in range(draws)]


def _control(model, batch, before: Seen, method, seed: int, draws: int) -> list[Seen]:
    """Per draw: the answers after the spec's edits done on random neurons instead, written the
    same way as the real ones (solved together, or in spec order), on the base model (restored
    afterwards); per edit its metrics."""
    edits = batch.edits
    out = []
    for d, sets in enumerate(control_neurons(model, [e.neurons for e in edits], seed, draws)):
        progress.log.info("random-neuron control, draw %d of %d", d + 1, draws)
        with rules.restored(model, [x for s in sets for x in s]):
            apply(model, batch, method, neurons=sets, seed=seed)
            after = measure(model, edits)
        for e in edits:
            e.result.control_runs.append(edit_metrics(e.probe, before, after))
        out.append(after)
    return out


@dataclass
class Baseline:
    """The answers of the base model, and of each control draw."""

    before: Seen
    controls: list[Seen] = field(default_factory=list)


def measure_base(model, batch, method, seed: int, draws: int) -> Baseline:
    """Everything measured on the base model: the answers before, suppression/amplification
    (located and random neurons) and the control edits. Leaves the model as it found it."""
    edits = batch.edits
    with progress.phase("measuring the base model"):
        before = measure(model, edits)
    n = arch.shape(model)[1]
    with (
        progress.timed("suppressing and amplifying"),
        progress.bar(len(edits), "suppressing and amplifying the located neurons", "edit") as bar,
    ):
        for k, e in enumerate(edits):
            _interventions(model, k, e, before, n, seed, draws)
            bar.update(1)
    with progress.phase("the random-neuron control"):
        controls = _control(model, batch, before, method, seed, draws)
    return Baseline(before, controls)


def _interventions(model, k, e, before, n, seed, draws) -> None:
    """Suppression / amplification of edit k's located neurons, and of matched random ones."""
    e.result = EditResult()
    real, rand = [], []
    for j, f in enumerate(e.probe.facts):
        ns = e.located[j].neurons
        real.append(intervention(model, f, ns, before))
        drawn = [draw(ns, n, rng_for(seed, k, d, f"fact{j}"), ns) for d in range(draws)]
        rand.append(mean_pairs([intervention(model, f, r, before) for r in drawn]))
    e.result.intervention = mean_pairs(real)
    e.result.intervention_control = mean_pairs(rand)


def judge(edits, before: Seen, after: Seen) -> None:
    """Each edit's metrics and control from the answers before and after."""
    for e in edits:
        r = e.result
        m = edit_metrics(e.probe, before, after)
        m["suppression"], m["amplification"] = r.intervention
        coarse = [f.coarse for f in (e.located[:1] if e.kind == "update" else e.located)]
        m["consistency"] = mean(c for c in (consistency(s) for s in coarse) if c is not None)
        m["neurons"] = len(e.neurons)
        c = average(r.control_runs) if r.control_runs else None
        if c is not None:
            c["suppression"], c["amplification"] = r.intervention_control
            c["neurons"] = len(e.neurons)
        r.metrics, r.control = m, c
