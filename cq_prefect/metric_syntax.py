"""The `@key=value` metric syntax: a pure parser with no Prefect or MLflow import.

A training script needs no SDK; it prints ``@mpjpe=24.3mm`` and the number becomes a metric point.
The rules (../shared/DESIGN.md is the contract):

- a token is ``@KEY=VALUE`` at line start or after whitespace or one of ``([{,;``
  (so ``user@host=5`` and ``a@b.com`` are not metrics);
- KEY is ``[A-Za-z_][A-Za-z0-9_./-]*``, at most 250 characters;
- VALUE is a signed decimal or scientific number, or nan / inf / -inf in any case, optionally followed
  by a unit of letters or ``%`` that is dropped from the value and reported once per key;
- a token ends at end of line, whitespace or one of ``,;)]}``;
- a token that starts like a metric but breaks a rule (``@v=1.2.3``, ``@lr=abc``, ``@=3``) is a *bad
  token*: the line is still logged, the token is counted and reported once per key;
- ``@step=N`` sets the step of the other metrics on its line; otherwise each key counts 0, 1, 2 …;
- a key repeated on one line: the last value wins.

Example:

    >>> parser = MetricParser()
    >>> [(p.key, p.value, p.step) for p in parser.parse("epoch 3 @step=3 @loss=0.25 @mpjpe=24.3mm").points]
    [('loss', 0.25, 3), ('mpjpe', 24.3, 3)]
    >>> parser.units
    {'mpjpe': 'mm'}
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAX_KEY_LENGTH = 250
PARSE_LIMIT_CHARS = 64 * 1024  # parsing reads a line's first 64 KiB
LOG_LINE_LIMIT_BYTES = 1024 * 1024  # a longer line is truncated in the log

_TOKEN_START = frozenset("([{,;")
_TOKEN_END = re.compile(r"[\s,;)\]}]")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*", re.ASCII)
_VALUE = re.compile(
    r"(?P<number>[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf(?:inity)?))(?P<unit>[A-Za-z%]*)",
    re.IGNORECASE | re.ASCII,  # ASCII: no Unicode digits, and no 'ı' matching the i of inf
)
_STEP = re.compile(r"[+-]?\d+", re.ASCII)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One metric value: what a single `@key=value` token becomes."""

    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class BadToken:
    """A token that looks like a metric but breaks a rule; ``key`` is what stood before ``=``."""

    key: str
    text: str


@dataclass(slots=True)
class ParsedLine:
    """What one line yielded: its points, units seen for the first time, bad tokens seen first time."""

    points: list[MetricPoint] = field(default_factory=list)
    new_units: dict[str, str] = field(default_factory=dict)
    new_bad_tokens: list[BadToken] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Token:
    """A well-formed token of one line, before steps are assigned."""

    key: str
    value: float
    unit: str


def scan_tokens(line: str) -> tuple[list[Token], list[BadToken], int | None]:
    """Find the tokens of one line: (good tokens in order, bad tokens, the line's @step or None).

    Stateless; :class:`MetricParser` adds steps and once-per-key reporting.

        >>> scan_tokens("user@host=5 (@acc=95%) @v=1.2.3")[0]
        [Token(key='acc', value=95.0, unit='%')]
    """
    if "@" not in line:
        return [], [], None
    cut = len(line) > PARSE_LIMIT_CHARS
    line = line[:PARSE_LIMIT_CHARS]
    good: list[Token] = []
    bad: list[BadToken] = []
    step: int | None = None
    at = line.find("@")
    while at != -1:
        if at == 0 or line[at - 1].isspace() or line[at - 1] in _TOKEN_START:
            end_match = _TOKEN_END.search(line, at + 1)
            end = end_match.start() if end_match else len(line)
            text = line[at + 1 : end]
            if cut and end_match is None:  # a token cut by the parse limit is not read at all
                break
            if "=" in text:
                key, _, raw_value = text.partition("=")
                if key == "step":
                    if _STEP.fullmatch(raw_value):
                        step = int(raw_value)
                    else:
                        bad.append(BadToken(key, "@" + text))
                else:
                    token = _read_token(key, raw_value)
                    if token is None:
                        bad.append(BadToken(key, "@" + text))
                    else:
                        good.append(token)
            at = line.find("@", end)
        else:
            at = line.find("@", at + 1)
    return good, bad, step


def _read_token(key: str, raw_value: str) -> Token | None:
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        return None
    match = _VALUE.fullmatch(raw_value)
    if match is None:
        return None
    number = match.group("number")
    value = float(number.lower().replace("infinity", "inf"))
    return Token(key, value, match.group("unit"))


class MetricParser:
    """Turns lines into metric points, keeping the per-key step counters of one run.

    Not thread-safe: feed it from one thread (the metric log handler serialises calls).
    """

    def __init__(self, clock=time.time):
        self._clock = clock
        self._next_step: dict[str, int] = {}
        self.units: dict[str, str] = {}
        self.bad_token_counts: dict[str, int] = {}

    def parse(self, line: str, timestamp_ms: int | None = None) -> ParsedLine:
        """Parse one line (no line breaks expected; use :meth:`parse_text` for a block)."""
        result = ParsedLine()
        tokens, bad_tokens, step = scan_tokens(line)
        for token in bad_tokens:
            count = self.bad_token_counts.get(token.key, 0)
            self.bad_token_counts[token.key] = count + 1
            if count == 0:
                result.new_bad_tokens.append(token)
        if not tokens:
            return result
        if timestamp_ms is None:
            timestamp_ms = int(self._clock() * 1000)
        latest: dict[str, Token] = {}
        for token in tokens:  # a key repeated on one line: the last value wins
            latest.pop(token.key, None)
            latest[token.key] = token
        for key, token in latest.items():
            if step is None:
                point_step = self._next_step.get(key, 0)
            else:
                point_step = step
            self._next_step[key] = max(self._next_step.get(key, 0), point_step + 1)
            result.points.append(MetricPoint(key, token.value, point_step, timestamp_ms))
            if token.unit and key not in self.units:
                self.units[key] = token.unit
                result.new_units[key] = token.unit
        return result

    def parse_text(self, text: str, timestamp_ms: int | None = None) -> ParsedLine:
        """Parse a block of text: every ``\\n``, ``\\r\\n`` or ``\\r`` separated segment is a line."""
        merged = ParsedLine()
        for line in split_lines(text):
            parsed = self.parse(line, timestamp_ms)
            merged.points.extend(parsed.points)
            merged.new_units.update(parsed.new_units)
            merged.new_bad_tokens.extend(parsed.new_bad_tokens)
        return merged


def split_lines(text: str) -> list[str]:
    """Split on ``\\n``, ``\\r\\n`` and ``\\r`` (progress-bar segments count as lines)."""
    if "\r" not in text:
        return text.split("\n")
    return _LINE_BREAK.split(text)


@dataclass(frozen=True, slots=True)
class MetricSummary:
    """A metric over a whole run: its final value (at the highest step), min, max and point count."""

    final: float
    min: float
    max: float
    count: int
    unit: str | None = None


class MetricSummarizer:
    """Running summaries per key, in constant memory however many points a run prints.

        >>> summarizer = MetricSummarizer()
        >>> summarizer.add([MetricPoint("loss", 0.5, 0, 0), MetricPoint("loss", 0.25, 1, 0)])
        >>> summarizer.summaries()["loss"].final
        0.25
    """

    def __init__(self) -> None:
        # key -> [final step, final timestamp, final value, min, max, count]
        self._stats: dict[str, list] = {}

    def add(self, points: Iterable[MetricPoint]) -> None:
        for point in points:
            stats = self._stats.get(point.key)
            if stats is None:
                stats = self._stats[point.key] = [point.step, point.timestamp_ms, point.value, math.nan, math.nan, 0]
            elif (point.step, point.timestamp_ms) >= (stats[0], stats[1]):  # later wins a tie
                stats[0], stats[1], stats[2] = point.step, point.timestamp_ms, point.value
            if not math.isnan(point.value):
                stats[3] = point.value if math.isnan(stats[3]) else min(stats[3], point.value)
                stats[4] = point.value if math.isnan(stats[4]) else max(stats[4], point.value)
            stats[5] += 1

    def summaries(self, units: dict[str, str] | None = None) -> dict[str, MetricSummary]:
        units = units or {}
        return {
            key: MetricSummary(final, low, high, count, units.get(key))
            for key, (_, _, final, low, high, count) in self._stats.items()
        }


def summarize(points: Iterable[MetricPoint], units: dict[str, str] | None = None) -> dict[str, MetricSummary]:
    """Summarise points per key; the final value is the one at the highest step (later wins a tie).

        >>> summarize([MetricPoint("loss", 0.5, 0, 0), MetricPoint("loss", 0.25, 1, 0)])["loss"].final
        0.25
    """
    summarizer = MetricSummarizer()
    summarizer.add(points)
    return summarizer.summaries(units)


def iter_points(lines: Iterable[str], parser: MetricParser | None = None) -> Iterator[MetricPoint]:
    """Convenience: every point of an iterable of lines, in order."""
    parser = parser or MetricParser()
    for line in lines:
        yield from parser.parse(line).points
