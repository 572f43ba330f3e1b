"""Metrics against hand-computed values, gates, and the random-neuron control."""

import math
import random

import pytest

from kn_edit import spec as specmod
from kn_edit.measure import evaluate as measure
from kn_edit.measure import gates, metrics
from kn_edit.measure.probes import Probe
from kn_edit.output.report import GateResult
from kn_edit.plan.batch import Fact
from kn_edit.plan.prompts import Prompt


def P(n):
    return Prompt(f"prompt {n} [Y]", (n,), 0)


def one(seen):
    """Seen answers written with one-token targets: ids -> (top-1, {token: p})."""
    return {ids: ({1: (top,)}, {(t,): p for t, p in ps.items()}) for ids, (top, ps) in seen.items()}


def test_perplexity_is_exp_mean_nll():
    assert metrics.perplexity([0.5, 0.25]) == pytest.approx(2**1.5)
    assert metrics.perplexity([1.0]) == pytest.approx(1.0)
    assert metrics.perplexity([]) is None
    assert metrics.rel_change(2.0, 3.0) == pytest.approx(0.5)


def _world():
    # edited fact: 4 prompts, gold 10, new 20; the last one held out
    fact = Fact("s", "t", 10, [P(1), P(2), P(3), P(4)])
    intra = Fact("s2", "u", 11, [P(5)])
    inter = Fact("s3", "v", 12, [P(6), P(7)])
    pr = Probe("update", "r", [fact], [{3}], [intra], [inter], new_ids=(20,))
    before = {
        (1,): (10, {10: 0.6, 20: 0.1}),
        (2,): (10, {10: 0.5, 20: 0.2}),
        (3,): (10, {10: 0.7, 20: 0.1}),
        (4,): (10, {10: 0.8, 20: 0.0}),
        (5,): (11, {11: 0.5}),
        (6,): (12, {12: 0.5}),
        (7,): (12, {12: 0.25}),
    }
    after = {
        (1,): (20, {10: 0.1, 20: 0.7}),
        (2,): (20, {10: 0.2, 20: 0.6}),
        (3,): (30, {10: 0.3, 20: 0.2}),
        (4,): (10, {10: 0.6, 20: 0.2}),
        (5,): (11, {11: 0.25}),
        (6,): (12, {12: 0.5}),
        (7,): (12, {12: 0.25}),
    }
    return pr, one(before), one(after)


def test_update_metrics_by_hand():
    pr, before, after = _world()
    m = metrics.update_metrics(pr, before, after)
    assert m["change_rate"] == pytest.approx(3 / 4)  # prompts 1, 2, 3 changed top-1
    assert m["success_rate"] == pytest.approx(2 / 4)  # prompts 1, 2 answer 20
    assert m["generalization"] == pytest.approx(0.0)  # held-out prompt 4 still answers 10
    assert m["p_target_shift"] == pytest.approx(((0.1 - 0.6) + (0.2 - 0.5) + (0.3 - 0.7) + (0.6 - 0.8)) / 4)
    assert m["p_new_shift"] == pytest.approx((0.6 + 0.4 + 0.1 + 0.2) / 4)
    assert m["intra_ppl_before"] == pytest.approx(2.0) and m["intra_ppl_after"] == pytest.approx(4.0)
    assert m["intra_ppl_change"] == pytest.approx(1.0)
    assert m["inter_ppl_before"] == pytest.approx(math.sqrt(2 * 4)) and m["inter_ppl_change"] == pytest.approx(0.0)


def test_right_kept_counts_only_the_answers_that_were_right():
    """Neighbour prompts: right -> right, right -> wrong, wrong -> right, wrong -> other wrong: top-1 kept 1/4,
    right answers kept 1/2 (of the two that were right, one still is)."""
    edited = Fact("s", "t", 10, [P(1)])
    inter = Fact("s3", "v", 12, [P(2), P(3), P(4), P(5)])
    pr = Probe("update", "r", [edited], [set()], [], [inter], new_ids=(20,))
    before = {
        (1,): (10, {10: 0.5, 20: 0.1}),
        (2,): (12, {12: 0.5}),
        (3,): (12, {12: 0.5}),
        (4,): (7, {12: 0.3}),
        (5,): (7, {12: 0.1}),
    }
    after = {
        (1,): (20, {10: 0.1, 20: 0.6}),
        (2,): (12, {12: 0.5}),
        (3,): (9, {12: 0.2}),
        (4,): (12, {12: 0.4}),
        (5,): (8, {12: 0.1}),
    }
    m = metrics.update_metrics(pr, one(before), one(after))
    assert m["inter_kept"] == pytest.approx(1 / 4)
    assert m["inter_right_kept"] == pytest.approx(1 / 2)
    assert m["intra_kept"] is None and m["intra_right_kept"] is None  # no intra neighbours


def test_erase_metrics_by_hand():
    a, b = Fact("a", "x", 1, [P(1), P(2)]), Fact("b", "y", 2, [P(3)])
    other = Fact("c", "z", 3, [P(4)])
    pr = Probe("erase", "r", [a, b], [set(), set()], [], [other])
    before = {(1,): (1, {1: 0.5}), (2,): (1, {1: 0.5}), (3,): (5, {2: 0.5}), (4,): (3, {3: 0.9})}
    after = {(1,): (7, {1: 0.125}), (2,): (1, {1: 0.5}), (3,): (5, {2: 0.125}), (4,): (8, {3: 0.3})}
    m = metrics.erase_metrics(pr, one(before), one(after))
    assert m["accuracy_before"] == pytest.approx(2 / 3) and m["accuracy_after"] == pytest.approx(1 / 3)
    assert m["accuracy_change"] == pytest.approx(-1 / 3)
    assert m["ppl_before"] == pytest.approx(2.0)
    assert m["ppl_after"] == pytest.approx(math.exp((math.log(8) * 2 + math.log(2)) / 3))
    assert m["other_accuracy_before"] == 1.0 and m["other_accuracy_after"] == 0.0
    assert m["other_ppl_change"] == pytest.approx(0.9 / 0.3 - 1)


def test_multi_token_metrics_by_hand():
    """Old target (10, 11), new (20, 21, 22): success needs the whole new target as the continuation,
    change is the old target's length of it changing; perplexities are per token."""
    fact = Fact("s", "t", (10, 11), [P(1), P(2), P(3)])
    intra = Fact("s2", "u", (5, 6), [P(4)])
    pr = Probe("update", "r", [fact], [{2}], [intra], [], new_ids=(20, 21, 22))
    old, new = (10, 11), (20, 21, 22)
    probs = lambda a, b: {old: a, new: b}
    before = {
        (1,): ({1: (10,), 2: (10, 11), 3: (10, 11, 9)}, probs(0.5, 0.01)),
        (2,): ({1: (10,), 2: (10, 11), 3: (10, 11, 9)}, probs(0.4, 0.02)),
        (3,): ({1: (10,), 2: (10, 11), 3: (10, 11, 9)}, probs(0.3, 0.03)),
        (4,): ({1: (5,), 2: (5, 6)}, {(5, 6): 0.25}),
    }
    after = {
        (1,): ({1: (20,), 2: (20, 21), 3: (20, 21, 22)}, probs(0.01, 0.5)),  # the new target: success
        (2,): ({1: (20,), 2: (20, 21), 3: (20, 21, 7)}, probs(0.01, 0.1)),  # starts like it: changed, no success
        (3,): ({1: (10,), 2: (10, 11), 3: (10, 11, 9)}, probs(0.3, 0.03)),  # held out, unchanged
        (4,): ({1: (5,), 2: (5, 8)}, {(5, 6): 1 / 16}),
    }
    m = metrics.update_metrics(pr, before, after)
    assert m["change_rate"] == pytest.approx(2 / 3)
    assert m["success_rate"] == pytest.approx(1 / 3) and m["efficacy"] == pytest.approx(1 / 2)
    assert m["generalization"] == 0.0
    assert m["p_new_shift"] == pytest.approx((0.49 + 0.08 + 0.0) / 3)
    assert m["intra_ppl_before"] == pytest.approx(2.0) and m["intra_ppl_after"] == pytest.approx(4.0)  # per token
    assert m["intra_kept"] == 0.0
    assert metrics.perplexity([0.25, 0.5], [2, 1]) == pytest.approx(math.exp(math.log(8) / 3))


def test_consistency_and_neuron_stats_by_hand():
    assert metrics.consistency([[(0, 1), (1, 2)], [(0, 1)], [(2, 3)]]) == pytest.approx((0.5 + 0 + 0) / 3)
    stats = metrics.neuron_stats([("r", [[(0, 1), (1, 2)], [(0, 1)]]), ("q", [[(0, 1), (3, 3)]])])
    assert stats["neurons_per_fact"] == pytest.approx(5 / 3)
    assert stats["layers"] == {"0": 3, "1": 1, "3": 1}
    assert stats["overlap_same_relation"] == 1.0  # r-r share (0, 1)
    assert stats["overlap_other_relation"] == 1.0  # both r facts share (0, 1) with q


def test_gate_syntax_is_validated_with_the_field_path():
    base = {
        "model": "m",
        "edits": [{"erase": {"relation": "r", "templates": ["[X] is [Y]"], "facts": [{"subject": "a", "target": "b"}]}}],
    }
    with pytest.raises(specmod.SpecError) as e:
        specmod.parse({**base, "verify": {"success_rate": "at least 0.3", "inter_ppl_change": 0.1, "nope": ">= 1"}}, "s.yaml")
    text = str(e.value)
    assert "s.yaml: verify.success_rate: expected a gate" in text
    assert "verify.inter_ppl_change: expected a gate as a quoted string" in text
    assert "verify.nope: unknown key" in text
    ok = specmod.parse({**base, "verify": {"success_rate": ">= 0.3", "inter_ppl_change": "<=-1e-2"}})
    assert [str(g) for g in ok.verify.gates] == ["success_rate >= 0.3", "inter_ppl_change <= -0.01"]
    # the list form, as strings or fields, is the same
    listed = specmod.parse(
        {**base, "verify": {"gates": ["success_rate >= 0.3", {"metric": "inter_ppl_change", "op": "<=", "threshold": -0.01}]}}
    )
    assert listed.verify.gates == ok.verify.gates
    with pytest.raises(specmod.SpecError) as e:
        specmod.parse({**base, "verify": {"gates": ["success >= 0.3", "success_rate at least 1"]}}, "s.yaml")
    text = str(e.value)
    assert "s.yaml: verify.gates[0].metric: Input should be 'change_rate'" in text
    assert "s.yaml: verify.gates[1]: expected a gate: METRIC OP NUMBER" in text


def test_gates_pass_and_fail():
    cfg = specmod.parse(
        {
            "model": "m",
            "edits": [{"erase": {"relation": "r", "templates": ["[X] is [Y]"], "facts": [{"subject": "a", "target": "b"}]}}],
            "verify": {"success_rate": ">= 0.3", "inter_ppl_change": "<= 0.1", "generalization": "> 0"},
        }
    ).verify
    g = gates.check(cfg.gates, {"success_rate": 0.3, "inter_ppl_change": 0.25, "generalization": None})
    by = {r["name"]: r for r in g["results"]}
    assert by["success_rate"]["passed"] and not by["inter_ppl_change"]["passed"] and not by["generalization"]["passed"]
    assert not g["passed"] and gates.status(g) == "failed"
    assert "off by 0.15" in gates.describe_failure(GateResult(**by["inter_ppl_change"]))
    g = gates.check(cfg.gates, {"success_rate": 0.9, "inter_ppl_change": -0.5, "generalization": 0.5})
    assert g["passed"] and gates.status(g) == "passed"
    none = specmod.parse(
        {
            "model": "m",
            "edits": [{"erase": {"relation": "r", "templates": ["[X] is [Y]"], "facts": [{"subject": "a", "target": "b"}]}}],
        }
    ).verify
    assert gates.status(gates.check(none.gates, {})) == "built"


def test_control_is_matched_and_random():
    real = [(0, 3), (0, 7), (2, 1), (3, 5), (3, 6), (3, 9)]
    a = measure.draw(real, 64, measure.rng_for(0, 0, 0), real)
    b = measure.draw(real, 64, measure.rng_for(1, 0, 0), real)
    again = measure.draw(real, 64, measure.rng_for(0, 0, 0), real)
    layers = lambda ns: sorted(l for l, _ in ns)
    assert layers(a) == layers(real) == layers(b)  # same layers, same count per layer
    assert len(set(a)) == len(real) and not set(a) & set(real)
    assert a == again and a != b  # seeded: same seed same draw, other seed other draw
    # uniform over the layer: over many draws every index but the real ones turns up
    seen = {i for d in range(400) for l, i in measure.draw([(0, 0)], 16, random.Random(d), [(0, 0)])}
    assert seen == set(range(1, 16))
