"""What a research loop aims for: a metric, a direction and a target read from plain goal text; no Prefect import.

    >>> parse_goal("improve MPJPE below 18mm, at most 5 experiments")
    GoalTarget(value=18.0, direction='minimize', unit='mm', phrase='below 18mm')
    >>> is_better(19.87, 21.43, "minimize"), improvement(19.87, 21.43, "minimize")
    (True, 1.56)

Everything here compares numbers honouring the direction, so the loop, the pruning rules and the
reports never write ``<`` where ``>`` was meant.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal, NamedTuple

Direction = Literal["minimize", "maximize"]
DIRECTIONS: tuple[Direction, ...] = ("minimize", "maximize")


class GoalTarget(NamedTuple):
    """A number found in goal text, with the direction its words imply (None when they imply none)."""

    value: float
    direction: Direction | None
    unit: str | None
    phrase: str


# Words right before the number. "below 18" means the metric must go under 18: smaller is better.
_BEFORE_MINIMIZE = (
    r"below|under|beneath|less\s+than|lower\s+than|smaller\s+than|fewer\s+than|at\s+most|no\s+more\s+than|"
    r"not\s+more\s+than|no\s+higher\s+than|no\s+greater\s+than|not\s+above|not\s+over|down\s+to|<=|=<|≤|<"
)
_BEFORE_MAXIMIZE = (
    r"above|over|exceeds?|exceeding|beyond|more\s+than|greater\s+than|higher\s+than|larger\s+than|bigger\s+than|"
    r"at\s+least|no\s+less\s+than|not\s+less\s+than|no\s+lower\s+than|no\s+fewer\s+than|not\s+below|not\s+under|"
    r">=|=>|≥|>"
)
# Words right after the number: "0.9 or more", "18mm or less".
_AFTER_MINIMIZE = r"or\s+(?:less|lower|below|fewer|smaller|under)"
_AFTER_MAXIMIZE = r"or\s+(?:more|higher|above|greater|larger|better|over)"

_RE_BEFORE = re.compile(rf"(?:(?P<min>{_BEFORE_MINIMIZE})|(?P<max>{_BEFORE_MAXIMIZE}))\s*$", re.IGNORECASE)
_RE_AFTER = re.compile(rf"^\s*(?:(?P<min>{_AFTER_MINIMIZE})|(?P<max>{_AFTER_MAXIMIZE}))\b", re.IGNORECASE)
# A number that stands alone: not part of a word ("top-5", "f1", "3d" stays "3" with unit "d", see below).
_RE_NUMBER = re.compile(
    r"(?<![\w.+\-])(?P<num>[+-]?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?)(?P<unit>%|[A-Za-zµ°]+)?(?![\w])(?!\.\d)"
)
# Numbers that are not the metric's target: the budget ("at most 5 experiments"), a time, a relative change
# ("by 2%") or the starting point ("from 21.4mm").
_RE_NOT_TARGET_AFTER = re.compile(
    r"^\s*(?:experiments?|runs?|trials?|cycles?|iterations?|attempts?|epochs?|steps?|hours?|hrs?|minutes?|"
    r"mins?|seconds?|secs?|days?|gpus?|times|x)\b",
    re.IGNORECASE,
)
_RE_NOT_TARGET_UNIT = re.compile(
    r"(?:experiments?|runs?|trials?|cycles?|iterations?|epochs?|steps?|hours?|hrs?|minutes?|mins?|seconds?|secs?|"
    r"days?|gpus?|x)",
    re.IGNORECASE,
)
_RE_NOT_TARGET_BEFORE = re.compile(r"\b(?:by|from|of|with)\s*$", re.IGNORECASE)


def parse_goal(text: str) -> GoalTarget | None:
    """The target in goal text, or None when the text names none; ValueError when it names several.

    A number tied to a direction word wins ("below 18mm", "under 0.2", "above 90%", "> 0.9", "at least
    0.95", "0.9 or more"). Without one, a single plain number is the target and its direction is left to
    the caller ("reach 0.9 accuracy" → 0.9, direction None). Budgets, times, "by 2%" and "from 21mm" are
    never targets. Two candidates of the same kind are ambiguous: ValueError, so nothing is guessed.

        >>> parse_goal("accuracy at least 0.95").direction
        'maximize'
        >>> parse_goal("reach 0.9 accuracy")
        GoalTarget(value=0.9, direction=None, unit=None, phrase='0.9')
        >>> parse_goal("make it better") is None
        True
    """
    tied: list[GoalTarget] = []
    plain: list[GoalTarget] = []
    for match in _RE_NUMBER.finditer(text):
        before, after = text[: match.start()], text[match.end() :]
        unit = match.group("unit")
        if _RE_NOT_TARGET_AFTER.match(after) or (unit and _RE_NOT_TARGET_UNIT.fullmatch(unit)):
            continue
        value = float(match.group("num"))
        word_before, word_after = _RE_BEFORE.search(before), _RE_AFTER.match(after)
        if word_before:
            direction: Direction = "minimize" if word_before.group("min") else "maximize"
            phrase = text[word_before.start() : match.end()]
            tied.append(GoalTarget(value, direction, unit, phrase.strip()))
        elif word_after:
            direction = "minimize" if word_after.group("min") else "maximize"
            phrase = text[match.start() : match.end() + word_after.end()]
            tied.append(GoalTarget(value, direction, unit, phrase.strip()))
        elif not _RE_NOT_TARGET_BEFORE.search(before):
            plain.append(GoalTarget(value, None, unit, match.group(0)))
    candidates = tied or plain
    if len(candidates) > 1:
        found = ", ".join(repr(c.phrase) for c in candidates)
        raise ValueError(f"the goal names several targets ({found}); keep one in the goal or give the target")
    return candidates[0] if candidates else None


def parse_number(text: str | float | int) -> tuple[float, str | None]:
    """A target given as a number or as text with a unit: ``"18mm"`` → ``(18.0, "mm")``; ValueError otherwise.

        >>> parse_number("18mm"), parse_number(0.9), parse_number("90 %")
        ((18.0, 'mm'), (0.9, None), (90.0, '%'))
    """
    if isinstance(text, bool):
        raise ValueError(f"target {text!r} is not a number")
    if isinstance(text, (int, float)):
        return float(text), None
    match = re.fullmatch(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(%|[A-Za-zµ°]+)?\s*", str(text))
    if not match:
        raise ValueError(f"target {text!r} is not a number; write it like 18, 0.9, 18mm or 90%")
    return float(match.group(1)), match.group(2)


def is_better(value: float | None, best: float | None, direction: Direction) -> bool:
    """Whether ``value`` beats ``best`` (strictly); a missing or NaN value never does, anything beats no best.

        >>> is_better(0.91, 0.9, "maximize"), is_better(18.0, 18.0, "minimize"), is_better(1.0, None, "minimize")
        (True, False, True)
    """
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if direction == "minimize" else value > best


def improvement(value: float, best: float, direction: Direction) -> float:
    """How much ``value`` improves on ``best``: positive when better, negative when worse, in metric units.

        >>> improvement(19.87, 21.43, "minimize"), improvement(0.8, 0.9, "maximize")
        (1.56, -0.1)
    """
    gain = best - value if direction == "minimize" else value - best
    return round(gain, 12)  # 21.43 - 19.87 prints as 1.56, not 1.5600000000000023


def reaches(value: float | None, target: float, direction: Direction) -> bool:
    """Whether ``value`` meets the target: at or below it when minimizing, at or above it when maximizing.

        >>> reaches(17.9, 18, "minimize"), reaches(0.9, 0.9, "maximize"), reaches(float("nan"), 18, "minimize")
        (True, True, False)
    """
    if value is None or math.isnan(value):
        return False
    return value <= target if direction == "minimize" else value >= target


def best_value(values: Iterable[float | None], direction: Direction) -> float | None:
    """The best of ``values`` (None and NaN skipped), or None when there is none.

        >>> best_value([21.4, None, 19.9, float("nan")], "minimize")
        19.9
    """
    best = None
    for value in values:
        if is_better(value, best, direction):
            best = value
    return best


def format_value(value: float | None, unit: str | None = None) -> str:
    """A metric value as the loop prints it: ``19.87mm``, ``0.912``, ``–`` when missing.

        >>> format_value(19.87, "mm"), format_value(1 / 3), format_value(None)
        ('19.87mm', '0.3333', '–')
    """
    if value is None:
        return "–"
    text = f"{value:.4g}" if math.isfinite(value) else str(value)
    return f"{text}{unit or ''}"
