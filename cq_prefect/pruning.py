"""Pruning rules: whether a running experiment's learning curve is bad enough to stop it now; no Prefect import.

A rule is one method, :meth:`PruningRule.should_prune`, over plain ``(step, value)`` curves — the points
of the loop's metric as the child printed them. The loop asks it on every new point of a running child and
cancels the child (its process tree, its GPUs) when it says yes.

    >>> finished = [[(1, 30.0), (2, 25.0)], [(1, 28.0), (2, 22.0)], [(1, 29.0), (2, 24.0)]]
    >>> rule = MedianRule(min_experiments=3, min_step=1)
    >>> rule.should_prune([(1, 27.0), (2, 26.0)], finished, "minimize")  # 26 is worse than the median 24
    True
    >>> rule.should_prune([(1, 27.0), (2, 23.0)], finished, "minimize")
    False
"""

from __future__ import annotations

import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence

from cq_prefect.goal import Direction, is_better

Point = tuple[int, float]
CurveLike = Iterable[Sequence[float]]
"""A curve as any iterable of ``(step, value)`` pairs (tuples, lists, or MLflow's ``[[step, value], …]``)."""


def normalize_curve(curve: CurveLike) -> list[Point]:
    """The points sorted by step, one per step (the last printed wins, as for MLflow's final value).

        >>> normalize_curve([[2, 0.5], [1, 0.9], [2, 0.4]])
        [(1, 0.9), (2, 0.4)]
    """
    by_step: dict[int, float] = {}
    for step, value in curve:
        by_step[int(step)] = float(value)
    return sorted(by_step.items())


def value_at(curve: Sequence[Point], step: int) -> float | None:
    """A normalized curve's value at ``step``: its latest point at or before ``step``, provided the curve
    reaches ``step`` (a run that stopped earlier says nothing about later steps). None otherwise.

        >>> value_at([(0, 1.0), (10, 0.5), (20, 0.3)], 15), value_at([(0, 1.0), (10, 0.5)], 15)
        (0.5, None)
    """
    if not curve or curve[-1][0] < step:
        return None
    found = None
    for point_step, value in curve:
        if point_step > step:
            break
        found = value
    return found


class PruningRule(ABC):
    """Decides whether to stop a running experiment from its curve and the curves of finished ones.

    Subclasses implement :meth:`should_prune` only; rules are pure and keep no state between calls, so a
    resumed loop prunes exactly as the original would have.
    """

    @abstractmethod
    def should_prune(self, curve: CurveLike, finished: Sequence[CurveLike], direction: Direction) -> bool:
        """Whether the running experiment with ``curve`` should be stopped now.

        Args:
            curve: the running experiment's points so far; its last step is "now".
            finished: the curves of the loop's finished experiments (kept or discarded: runs that went
                the distance), to compare against.
            direction: whether smaller (minimize) or larger (maximize) values are better.
        """


class NoPruning(PruningRule):
    """Never prunes: every experiment runs to its end.

        >>> NoPruning().should_prune([(5, float("nan"))], [], "minimize")
        False
    """

    def should_prune(self, curve: CurveLike, finished: Sequence[CurveLike], direction: Direction) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoPruning()"


class MedianRule(PruningRule):
    """Prunes a run whose value at its current step is worse than the median of finished runs at that step.

    Args:
        min_experiments: finished runs that must have reached the step before the rule judges anything,
            so one lucky early run does not stop everything after it.
        min_step: steps before which a run is never pruned (warm-up: early curves are noisy).

    A NaN value (a diverged run) is pruned once ``min_step`` is reached, whatever the others did.
    """

    def __init__(self, min_experiments: int = 3, min_step: int = 0):
        if min_experiments < 1:
            raise ValueError(f"min_experiments={min_experiments}: give at least 1")
        if min_step < 0:
            raise ValueError(f"min_step={min_step}: give 0 or more")
        self.min_experiments = min_experiments
        self.min_step = min_step

    def should_prune(self, curve: CurveLike, finished: Sequence[CurveLike], direction: Direction) -> bool:
        points = normalize_curve(curve)
        if not points:
            return False
        step, value = points[-1]
        if step < self.min_step:
            return False
        if math.isnan(value):
            return True
        others = [v for v in (value_at(normalize_curve(c), step) for c in finished) if v is not None]
        others = [v for v in others if not math.isnan(v)]
        if len(others) < self.min_experiments:
            return False
        return is_better(statistics.median(others), value, direction)

    def __repr__(self) -> str:
        return f"MedianRule(min_experiments={self.min_experiments}, min_step={self.min_step})"


class AshaRule(PruningRule):
    """Asynchronous successive halving: at rungs ``min_step × reduction_factor**k`` only the best
    ``1/reduction_factor`` of the runs that reached the rung go on.

    A run is judged at the highest rung it has passed, against every finished run's value at that rung
    (itself included in the count, as in ASHA). With fewer than ``min_experiments`` others at the rung it
    goes on: there is not enough evidence yet.

        >>> rule = AshaRule(min_experiments=2, min_step=1, reduction_factor=2)
        >>> finished = [[(1, 5.0), (2, 4.0)], [(1, 6.0), (2, 5.0)], [(1, 7.0), (2, 6.0)]]
        >>> rule.should_prune([(1, 5.5), (2, 4.5)], finished, "minimize")  # rung 2: 2nd of 4, top 2 go on
        False
        >>> rule.should_prune([(1, 5.5), (2, 5.5)], finished, "minimize")  # 3rd of 4
        True
    """

    def __init__(self, min_experiments: int = 3, min_step: int = 1, reduction_factor: int = 3):
        if min_experiments < 1:
            raise ValueError(f"min_experiments={min_experiments}: give at least 1")
        if reduction_factor < 2:
            raise ValueError(f"reduction_factor={reduction_factor}: give 2 or more (3 keeps the best third)")
        self.min_experiments = min_experiments
        self.min_step = max(1, min_step)  # rungs multiply: a first rung at step 0 would never grow
        self.reduction_factor = reduction_factor

    def rung_of(self, step: int) -> int | None:
        """The highest rung step at or below ``step``, or None before the first rung.

            >>> AshaRule(min_step=2, reduction_factor=3).rung_of(19)
            18
        """
        if step < self.min_step:
            return None
        rung = self.min_step
        while rung * self.reduction_factor <= step:
            rung *= self.reduction_factor
        return rung

    def should_prune(self, curve: CurveLike, finished: Sequence[CurveLike], direction: Direction) -> bool:
        points = normalize_curve(curve)
        if not points:
            return False
        rung = self.rung_of(points[-1][0])
        if rung is None:
            return False
        value = value_at(points, rung)
        if value is None or math.isnan(value):
            return value is not None
        others = [v for v in (value_at(normalize_curve(c), rung) for c in finished) if v is not None]
        others = [v for v in others if not math.isnan(v)]
        if len(others) < self.min_experiments:
            return False
        promoted = max(1, (len(others) + 1) // self.reduction_factor)
        better = sum(1 for other in others if is_better(other, value, direction))
        return better >= promoted

    def __repr__(self) -> str:
        return (
            f"AshaRule(min_experiments={self.min_experiments}, min_step={self.min_step}, "
            f"reduction_factor={self.reduction_factor})"
        )
