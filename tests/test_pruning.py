"""Pruning rules (cq_prefect.pruning): pure functions of learning curves, no Prefect server."""

from __future__ import annotations

import math
import random

import pytest

from cq_prefect.pruning import AshaRule, MedianRule, NoPruning, PruningRule, normalize_curve, value_at


def curve(values, start=0):
    return [(start + i, v) for i, v in enumerate(values)]


FINISHED = [curve([30, 25, 22, 20]), curve([28, 24, 21, 19]), curve([32, 27, 23, 21])]  # medians 30 25 22 20


def test_curve_helpers():
    assert normalize_curve([[3, 1], [1, 2], [3, 0.5]]) == [(1, 2.0), (3, 0.5)]  # MLflow's [[step, value]] too
    points = [(0, 1.0), (10, 0.5), (20, 0.3)]
    assert value_at(points, 10) == 0.5 and value_at(points, 15) == 0.5 and value_at(points, 20) == 0.3
    assert value_at(points, 25) is None and value_at([], 0) is None  # a run that stopped says nothing later
    assert value_at([(5, 1.0), (10, 0.5)], 3) is None


def test_no_pruning_never_prunes():
    assert not NoPruning().should_prune(curve([math.nan, 1e9]), FINISHED, "minimize")


def test_median_prunes_a_run_worse_than_the_median_at_its_step():
    rule = MedianRule(min_experiments=3, min_step=1)
    assert rule.should_prune(curve([29, 26]), FINISHED, "minimize")  # 26 > median 25 at step 1
    assert not rule.should_prune(curve([29, 24.5]), FINISHED, "minimize")
    assert not rule.should_prune(curve([29, 25]), FINISHED, "minimize")  # equal to the median: goes on
    assert not rule.should_prune(curve([99]), FINISHED, "minimize")  # step 0 < min_step


def test_median_honours_maximize():
    finished = [curve([0.5, 0.7]), curve([0.6, 0.8]), curve([0.4, 0.75])]
    rule = MedianRule(min_experiments=3)
    assert rule.should_prune(curve([0.5, 0.7]), finished, "maximize")
    assert not rule.should_prune(curve([0.5, 0.9]), finished, "maximize")


def test_median_waits_for_enough_finished_runs_at_that_step():
    rule = MedianRule(min_experiments=3)
    assert not rule.should_prune(curve([99, 99]), FINISHED[:2], "minimize")
    short = [curve([30, 25]), curve([28, 24]), curve([32, 27, 23, 21])]
    # Only one finished run reached step 3: too little evidence there.
    assert not rule.should_prune(curve([30, 25, 22, 99]), short, "minimize")
    assert rule.should_prune(curve([30, 99]), short, "minimize")


def test_median_compares_at_the_same_step_with_sparse_reports():
    finished = [[(0, 10.0), (10, 5.0), (20, 3.0)], [(0, 11.0), (10, 6.0), (20, 4.0)], [(0, 9.0), (10, 4.0), (20, 2.0)]]
    rule = MedianRule(min_experiments=3, min_step=5)
    assert rule.should_prune([(0, 10.0), (15, 5.5)], finished, "minimize")  # at 15 the others stand at 4, 5, 6
    assert not rule.should_prune([(0, 10.0), (15, 4.5)], finished, "minimize")


def test_nan_prunes_after_warm_up():
    rule = MedianRule(min_experiments=3, min_step=2)
    assert not rule.should_prune(curve([1.0, math.nan]), [], "minimize")
    assert rule.should_prune(curve([1.0, 1.0, math.nan]), [], "minimize")
    assert not rule.should_prune([], FINISHED, "minimize")


def test_rules_check_their_settings():
    with pytest.raises(ValueError, match="min_experiments"):
        MedianRule(min_experiments=0)
    with pytest.raises(ValueError, match="reduction_factor"):
        AshaRule(reduction_factor=1)
    with pytest.raises(TypeError):
        PruningRule()  # type: ignore[abstract]


def test_asha_keeps_the_top_fraction_at_each_rung():
    rule = AshaRule(min_experiments=3, min_step=1, reduction_factor=2)
    assert [rule.rung_of(s) for s in (0, 1, 2, 3, 4, 7, 8)] == [None, 1, 2, 2, 4, 4, 8]
    finished = [curve([9, 5.0, 4.0]), curve([9, 6.0, 5.0]), curve([9, 7.0, 6.0])]
    # At rung 2, four runs (three finished + this one): the best two go on.
    assert not rule.should_prune(curve([9, 6.5, 4.5]), finished, "minimize")
    assert rule.should_prune(curve([9, 6.5, 5.5]), finished, "minimize")
    assert rule.should_prune(curve([9, 6.5, 5.5, 1.0]), finished, "minimize")  # judged at rung 2 until step 4
    assert not rule.should_prune(curve([9, 6.5, 5.5]), finished[:2], "minimize")  # not enough evidence
    assert not rule.should_prune(curve([9, 6.5, 5.5]), finished, "maximize")  # best when larger is better


def _learning_curves(n=20, steps=30, seed=0):
    """Synthetic runs like bench/pruning.py: each converges to its own final loss along a noisy curve."""
    rng = random.Random(seed)
    runs = []
    for _ in range(n):
        final = rng.uniform(1.0, 3.0)
        runs.append([(s, final + 5.0 * math.exp(-s / 6) + rng.gauss(0, 0.05)) for s in range(steps)])
    return runs


@pytest.mark.parametrize("rule", [MedianRule(min_experiments=3, min_step=5), AshaRule(min_experiments=3, min_step=3)])
def test_pruning_saves_compute_and_keeps_the_best_run(rule):
    runs = _learning_curves()
    best_final = min(r[-1][1] for r in runs)
    finished, spent = [], 0
    for run in runs:  # sequentially, as a loop with parallel: 1 would run them
        for length in range(1, len(run) + 1):
            if rule.should_prune(run[:length], finished, "minimize"):
                break
        spent += length
        if length == len(run):
            finished.append(run)
    assert min(r[-1][1] for r in finished) == best_final
    assert spent <= 0.7 * sum(len(r) for r in runs)

