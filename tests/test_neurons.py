"""Refining, against the paper's definitions written out by hand."""

import torch

from kn_edit.locate.neurons import Located, choose_share, coarse, refine, shared_by


def test_coarse_keeps_scores_at_least_threshold_times_max():
    s = torch.tensor([[0.1, 1.0, 0.2], [0.19, 0.5, -3.0]])
    assert coarse(s, 0.2) == [(0, 1), (0, 2), (1, 1)]
    assert coarse(-s.abs(), 0.2) == []  # no positive score: nothing is a knowledge neuron


def test_refine_keeps_neurons_shared_by_share_of_prompts():
    sets = [[(0, 1), (1, 2)], [(0, 1)], [(0, 1), (1, 2), (2, 3)], [(2, 3)]]
    assert refine(sets, 0.7) == [(0, 1)]  # 3 of 4 prompts >= 2.8
    assert refine(sets, 0.5) == [(0, 1), (1, 2), (2, 3)]
    assert refine(sets, 1.0) == []


def fact(sets):
    return Located("s", "t", ["p"] * len(sets), sets)


def test_adaptive_share_moves_until_mean_count_in_range():
    # 10 prompts; neuron k appears in k of them: at share p, the neurons with k >= 10p remain
    sets = [[(0, k) for k in range(1, 11) if j < k] for j in range(10)]
    f = fact(sets)
    assert len(refine(f.coarse, 0.7)) == 4  # already in [2, 5]
    assert choose_share([f], 0.7, 0.05, 2, 5, True) == 0.7
    # ask for 6-8 neurons: the share must go down to 0.5 (6 neurons: k = 5..10)
    assert choose_share([f], 0.7, 0.05, 6, 8, True) == 0.5
    # ask for at most 1: up to 0.95 (k = 10 only)
    assert choose_share([f], 0.7, 0.05, 1, 1, True) == 0.95
    assert choose_share([f], 0.7, 0.05, 6, 8, False) == 0.7


def test_shared_by_counts_facts():
    a, b, c = fact([]), fact([]), fact([])
    a.neurons, b.neurons, c.neurons = [(0, 1), (0, 2)], [(0, 1)], [(0, 1), (0, 2), (3, 3)]
    assert shared_by([a, b, c], 2) == [(0, 1), (0, 2)]
    assert shared_by([a, b, c], 3) == [(0, 1)]
