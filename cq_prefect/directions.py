"""Where to go next (``cq pi``): directions derived from the knowledge, written as an ideas file.

    >>> a = Entry(kind="experiment", run_id="r1", exp_id="pose-c1-s0", loop="pose", hypothesis="bone-length loss",
    ...           change={"bone_loss": 0.1}, outcome="kept", delta=1.5, metric="mpjpe", unit="mm")
    >>> b = Entry(kind="experiment", run_id="r2", exp_id="hand-c2-s0", loop="hand", hypothesis="cosine schedule",
    ...           change={"lr_schedule": "cosine"}, outcome="kept", delta=0.4, metric="mpjpe", unit="mm")
    >>> [(s.title, s.overrides) for s in combinations([a, b], tried=[{"bone_loss": 0.1}, {"lr_schedule": "cosine"}])]
    [('bone-length loss + cosine schedule', {'bone_loss': 0.1, 'lr_schedule': 'cosine'})]

Two kinds of direction come from the knowledge alone:

- **combine**: improvements (experiments kept with a positive delta) related to the goal, whose changes no
  recorded experiment ever ran together (none has all their overrides at once) and that do not contradict
  each other (the same key set to different values) → their union; the most related first, then the union
  of all of them. With a search space, only improvements that set nothing but its parameters are combined
  (the space says what the command takes: another project's ``--zeo`` would crash it);
- **explore** (with a search space, the format of :mod:`cq_prefect.proposers.search_space`): categorical
  choices no related experiment tried, and for numbers the point of the range farthest from every value
  tried (on a log scale for ``log: true``, snapped to ``step``); parameters never tried come first.
  Experiments count as related to the space when they set at least one of its parameters.

A :class:`Brainstorm` strategy (Claude's, when configured) replaces them: :func:`directions` is the seam.
Everything here is pure: the caller reads the knowledge and writes the file (:func:`ideas_yaml`), whose
``ideas:`` list :func:`cq_prefect.proposers.scripted.load_ideas` reads back as is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cq_prefect import goal as goals
from cq_prefect.knowledge import Entry, Hit, same_value
from cq_prefect.records import change_key

MAX_IDEAS = 8
MAX_COMBINED = 6  # improvements considered for combining (the most related)


@dataclass(frozen=True)
class Suggestion:
    """One direction: an idea for the scripted proposer, with where it came from."""

    title: str
    rationale: str
    overrides: Mapping[str, Any]
    kind: str  # combine | explore | brainstorm
    sources: tuple[str, ...] = field(default=())  # exp ids it builds on

    def idea(self) -> dict[str, Any]:
        """The entry of an ideas file: {title, rationale, overrides}."""
        return {"title": self.title, "rationale": self.rationale, "overrides": dict(self.overrides)}


class Brainstorm(Protocol):
    """A strategy that proposes directions from the goal and the related knowledge (e.g. Claude)."""

    name: str

    def __call__(self, goal: str, hits: Sequence[Hit]) -> list[Suggestion]:
        ...


def directions(goal: str, related: Sequence[Entry], tried: Sequence[Mapping[str, Any]],
               space: Mapping[str, Any] | None = None, *, brainstorm: Brainstorm | None = None,
               hits: Sequence[Hit] = (), limit: int = MAX_IDEAS) -> list[Suggestion]:
    """The directions for ``goal``: the brainstorm's when one is given, else derived from the knowledge.

    ``related``: the experiments and notes related to the goal, most related first; ``tried``: the overrides
    of every recorded experiment; ``space``: a parsed search space, or None.
    """
    if brainstorm is not None:
        return _unique(brainstorm(goal, hits))[:limit]
    combined = combinations([e for e in related if not space or set(e.change) <= set(space)], tried)
    explored = unexplored(space, tried) if space else []
    # Evidence first, but leave room for the unexplored when both exist.
    share = limit // 2 if explored else limit
    chosen = combined[:share]
    chosen += explored[: limit - len(chosen)]
    chosen += combined[share: share + limit - len(chosen)]
    return _unique(chosen)[:limit]


# -- combining past improvements ----------------------------------------------------------------------


def combinations(related: Sequence[Entry], tried: Sequence[Mapping[str, Any]]) -> list[Suggestion]:
    """Unions of related improvements that were never run together (see the module docstring)."""
    candidates: list[Entry] = []
    seen: set[str] = set()
    for entry in related:
        if entry.improved and entry.change and change_key(entry.change) not in seen:
            seen.add(change_key(entry.change))
            candidates.append(entry)
        if len(candidates) == MAX_COMBINED:
            break
    pairs = []
    for i, first in enumerate(candidates):
        for j in range(i + 1, len(candidates)):
            union = _union([first, candidates[j]])
            if union is not None and not _tried_together(union, tried):
                pairs.append((i + j, i, j, union))
    pairs.sort(key=lambda p: p[:3])
    suggestions = [_combined([candidates[i], candidates[j]], union) for _, i, j, union in pairs]
    if len(candidates) >= 3:
        compatible: list[Entry] = []
        for entry in candidates:
            if _merge([*compatible, entry]) is not None:
                compatible.append(entry)
        union = _union(compatible)
        if len(compatible) >= 3 and union is not None and not _tried_together(union, tried):
            suggestions.append(_combined(compatible, union))
    return suggestions


def _merge(entries: Sequence[Entry]) -> dict[str, Any] | None:
    """The entries' changes together; None when two set a key differently."""
    union: dict[str, Any] = {}
    for entry in entries:
        for key, value in entry.change.items():
            if key in union and not same_value(union[key], value):
                return None
            union[key] = value
    return union


def _union(entries: Sequence[Entry]) -> dict[str, Any] | None:
    """What combining the entries' changes would run; None when they contradict, or when one change already
    holds all the others (nothing new to combine)."""
    union = _merge(entries)
    if union is None or any(len(union) == len(entry.change) for entry in entries):
        return None
    return union


def _tried_together(union: Mapping[str, Any], tried: Sequence[Mapping[str, Any]]) -> bool:
    return any(all(key in overrides and same_value(overrides[key], value) for key, value in union.items())
               for overrides in tried)


def _combined(entries: Sequence[Entry], union: dict[str, Any]) -> Suggestion:
    title = " + ".join(_short(e.hypothesis) for e in entries) if len(entries) == 2 else (
        f"all {len(entries)} improvements: " + " + ".join(_short(e.hypothesis, 24) for e in entries))
    parts = [f"{e.hypothesis} improved {e.metric or 'the metric'} by {goals.format_value(e.delta, e.unit)} "
             f"({e.exp_id}{', loop ' + e.loop if e.loop else ''})" for e in entries]
    return Suggestion(title=title, rationale="; ".join(parts) + "; never tried together",
                      overrides=union, kind="combine", sources=tuple(e.exp_id or e.run_id for e in entries))


def _short(text: str, width: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# -- unexplored regions of a search space ---------------------------------------------------------------


def unexplored(space: Mapping[str, Any], tried: Sequence[Mapping[str, Any]]) -> list[Suggestion]:
    """Points of ``space`` far from what related experiments tried (see the module docstring)."""
    related = [overrides for overrides in tried if any(name in overrides for name in space)]
    ranked: list[tuple[int, float, int, Suggestion]] = []
    for order, (name, param) in enumerate(space.items()):
        values = [overrides[name] for overrides in related if name in overrides]
        never = 0 if not values else 1
        if hasattr(param, "choices"):
            shown = _values_text(values)
            for choice in param.choices:
                if not any(same_value(choice, value) for value in values):
                    ranked.append((never, -1.0, order, Suggestion(  # a choice never tried: as far as can be
                        title=f"explore {name}={choice}",
                        rationale=(f"{name}={choice} was never tried"
                                   + (f" (tried: {shown})" if values else f" in {len(related)} related experiments")),
                        overrides={name: choice}, kind="explore")))
            continue
        point = farthest_point(param, values)
        if point is None:
            continue
        value, distance = point
        rationale = (f"{name} tried at {_values_text(values)}; {value} is the point of [{param.low}, {param.high}] "
                     f"farthest from them" if values else
                     f"{name} was never set by a related experiment; {value} is the middle of "
                     f"[{param.low}, {param.high}]")
        ranked.append((never, -distance, order, Suggestion(
            title=f"explore {name}={value}", rationale=rationale, overrides={name: value}, kind="explore")))
    ranked.sort(key=lambda r: r[:3])
    return [suggestion for *_, suggestion in ranked]


def farthest_point(param: Any, values: Sequence[Any]) -> tuple[int | float, float] | None:
    """The value of a numeric parameter farthest from ``values`` (and that distance, as a share of the range,
    on a log scale for ``log``); None when every value of the range was tried.

        >>> from cq_prefect.proposers.search_space import FloatParam
        >>> farthest_point(FloatParam(type="float", low=0.0, high=0.2, step=0.05), [0.0, 0.1])
        (0.2, 0.5)
    """
    low, high, log = float(param.low), float(param.high), bool(param.log)
    step = getattr(param, "step", None)
    integer = param.type == "int"

    def to_unit(x: float) -> float:
        if high == low:
            return 0.0
        if log:
            return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
        return (x - low) / (high - low)

    def from_unit(u: float) -> float:
        return math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if log else low + u * (high - low)

    usable = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers = sorted(min(1.0, max(0.0, to_unit(v))) for v in usable if math.isfinite(v) and (not log or v > 0))
    candidates: list[tuple[float, float]] = []  # (distance, unit point)
    if not numbers:
        candidates.append((0.5, 0.5))
    else:
        candidates += [(numbers[0], 0.0), (1.0 - numbers[-1], 1.0)]
        candidates += [((b - a) / 2, (a + b) / 2) for a, b in zip(numbers, numbers[1:])]
    for _, unit in sorted(candidates, key=lambda c: (-c[0], c[1])):
        value = _snap(from_unit(unit), low, high, step, integer)
        distance = min((abs(to_unit(float(value)) - n) for n in numbers), default=0.5)
        if distance > 1e-9:
            return value, round(distance, 6)
    return None


def _snap(x: float, low: float, high: float, step: float | int | None, integer: bool) -> int | float:
    if integer:
        step = int(step or 1)
        return int(min(high, max(low, low + round((x - low) / step) * step)))
    if step:
        return _round(min(high, max(low, low + round((x - low) / step) * step)), 12)
    return min(high, max(low, _round(x, 3)))


def _round(x: float, digits: int) -> float:
    """``x`` to ``digits`` significant digits (0.0031622 → 0.00316 for 3)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _values_text(values: Sequence[Any], most: int = 6) -> str:
    distinct: list[Any] = []
    for value in values:
        if not any(same_value(value, seen) for seen in distinct):
            distinct.append(value)
    try:
        distinct.sort()
    except TypeError:
        pass
    shown = ", ".join(str(v) for v in distinct[:most])
    return shown + (f" and {len(distinct) - most} more" if len(distinct) > most else "")


def _unique(suggestions: Sequence[Suggestion]) -> list[Suggestion]:
    """Without repeats: an ideas file may not hold the same title twice with the same overrides."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for s in suggestions:
        key = (s.title, change_key(s.overrides))
        if key not in seen and s.overrides:
            seen.add(key)
            unique.append(s)
    return unique


# -- the ideas file ------------------------------------------------------------------------------------


def ideas_yaml(suggestions: Sequence[Suggestion], header: Sequence[str] = ()) -> str:
    """The ideas file: ``header`` lines as comments, then ``ideas:`` with one {title, rationale, overrides}
    per suggestion (what ``cq loop start --proposer scripted --ideas FILE`` runs)."""
    import yaml

    comments = "".join(f"# {line}\n" for text in header for line in text.splitlines())
    body = yaml.safe_dump({"ideas": [s.idea() for s in suggestions]}, sort_keys=False, allow_unicode=True,
                          width=110, default_flow_style=None)
    return comments + body
