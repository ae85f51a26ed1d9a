"""Search spaces for the Optuna proposer, as plain validated data (Optuna itself is not imported here).

    >>> space = load_space('''
    ... lr: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
    ... layers: {type: int, low: 2, high: 8, step: 2}
    ... activation: [relu, gelu]          # a bare list: categorical
    ... ''')
    >>> space["layers"].size(), space["activation"].choices, cardinality(space)
    (4, ['relu', 'gelu'], None)

Each parameter is ``float`` or ``int`` (``low``, ``high``, optional ``log`` or ``step``) or ``categorical``
(``choices``). A file may also nest the parameters under ``space:``. Mistakes — ``low > high``, ``log``
with ``low ≤ 0``, ``log`` with ``step`` — fail when the config is loaded, naming the parameter and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from cq_prefect.errors import LoopConfigError
from cq_prefect.records import Scalar
from cq_prefect.yaml_source import dotted, plain_message, read_listing


class _Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatParam(_Param):
    """A real number between ``low`` and ``high`` (inclusive)."""

    type: Literal["float"] = Field(description="float")
    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value (≥ low).")
    log: bool = Field(False, description="Sample on a log scale (for learning rates, weight decay…); low > 0.")
    step: float | None = Field(None, description="Only multiples of step above low (not with log).", gt=0)

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        return self

    def size(self) -> int | None:
        """How many distinct values it has: None when continuous."""
        return None if self.step is None else int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1


class IntParam(_Param):
    """An integer between ``low`` and ``high`` (inclusive)."""

    type: Literal["int"] = Field(description="int")
    low: int = Field(description="Smallest value.")
    high: int = Field(description="Largest value (≥ low).")
    log: bool = Field(False, description="Sample on a log scale (for widths, batch sizes…); low ≥ 1.")
    step: int = Field(1, description="Only low, low+step, …; must stay 1 with log.", ge=1)

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def size(self) -> int:
        """How many distinct values it has."""
        return (self.high - self.low) // self.step + 1


class CategoricalParam(_Param):
    """One of a list of choices."""

    type: Literal["categorical"] = Field(description="categorical")
    choices: list[Scalar] = Field(description="The values to choose from (strings, numbers, booleans).", min_length=1)

    @model_validator(mode="after")
    def _check(self) -> CategoricalParam:
        if len({(type(c), c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices {self.choices} repeat a value; list each once")
        return self

    def size(self) -> int:
        return len(self.choices)


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low {low} > high {high}; swap them (low is the smallest value)")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got low {low}); raise low or drop log")
    if log and step is not None:
        raise ValueError("log and step cannot be combined; drop one of them")


def _shorthand(value: Any) -> Any:
    # Generous where it cannot be wrong: a bare list, or a mapping with choices, can only be categorical.
    if isinstance(value, list):
        return {"type": "categorical", "choices": value}
    if isinstance(value, Mapping) and "type" not in value:
        if "choices" in value:
            return {"type": "categorical", **value}
        raise ValueError("give the parameter's type: float, int or categorical, e.g. {type: float, low: 0, high: 1}")
    return value


ParamSpec = Annotated[
    FloatParam | IntParam | CategoricalParam, Field(discriminator="type"), BeforeValidator(_shorthand)
]
SearchSpace = dict[str, ParamSpec]
"""Parameter name → its range: what an Optuna study samples."""

_SPACE = TypeAdapter(SearchSpace)


def load_space(source: str | Path | Mapping[str, Any]) -> SearchSpace:
    """A search space from a file path, YAML text or a mapping; LoopConfigError naming the line and the fix."""
    doc = None
    if isinstance(source, (str, Path)):
        doc, data, prefix = read_listing(source, "search space", "space")
        name = doc.name
    else:
        data, name, prefix = source, "search space", ()
    if not isinstance(data, Mapping) or not data:
        raise LoopConfigError(
            f"{name}: a search space maps parameter names to ranges, e.g.\n"
            f"lr: {{type: float, low: 1.0e-5, high: 1.0e-1, log: true}}\nactivation: [relu, gelu]"
        )
    try:
        return _SPACE.validate_python(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = doc.line_of((*prefix, *loc)) if doc else None
            where = f"{name} line {line}" if line else name
            message = plain_message(error)
            if error["type"] == "extra_forbidden":
                message = f"unknown key {loc[-1]!r}; float/int take low, high, log, step; categorical takes choices"
            elif error["type"] == "model_attributes_type":
                message = "give a range, e.g. {type: float, low: 0.0, high: 1.0}, or a list of choices"
            elif error["type"] == "union_tag_invalid":
                message = f"type {error['input'].get('type')!r} is not float, int or categorical"
            lines.append(f"{where}: {dotted(loc)}: {message}")
        raise LoopConfigError("\n".join(lines)) from exc


def cardinality(space: Mapping[str, FloatParam | IntParam | CategoricalParam]) -> int | None:
    """How many distinct points the space has, or None when a continuous float makes it unbounded."""
    total = 1
    for param in space.values():
        size = param.size()
        if size is None:
            return None
        total *= size
    return total
