"""The frozen records a research loop keeps and its strategies read: hypotheses and experiment outcomes.

    >>> h = Hypothesis(title="bone loss", rationale="limbs drift", change={"bone_loss": 0.1})
    >>> r = ExperimentRecord(exp_id="exp-044", cycle=1, hypothesis=h, outcome="kept", value=19.87)
    >>> r.change["bone_loss"], r.failed
    (0.1, False)

Records are immutable (their ``change`` mappings too): proposers and pruning rules read them and never
write; only the loop creates them. They round-trip through JSON (``model_dump(mode="json")`` /
``model_validate``), which is how the ledger stores them and how a resumed loop gets them back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

Scalar = str | int | float | bool
"""A parameter value: what ``--key=value`` and ``{key}`` placeholders take."""

Outcome = Literal["running", "kept", "discarded", "crashed", "pruned", "no_metric"]
"""How an experiment ended for the loop. ``running``: submitted but not yet recorded (a pending record that a
resumed loop re-attaches; proposers count it as tried). ``crashed``: non-zero exit, timeout or killed.
``no_metric``: it ended without printing the metric, or printed NaN."""

OUTCOMES: tuple[Outcome, ...] = ("running", "kept", "discarded", "crashed", "pruned", "no_metric")
FAILED_OUTCOMES: frozenset[str] = frozenset({"crashed", "no_metric"})
"""Outcomes counted against ``max_failures``; a pruned run was stopped on purpose and is not a failure."""

Curve = tuple[tuple[int, float], ...]
"""A learning curve: ``(step, value)`` points of the loop's metric, in the order they were printed."""


class FrozenChange(dict):
    """A dict that cannot change after it is made: a record's change or overrides.

    A ``dict`` subclass rather than ``MappingProxyType`` so records pickle (Prefect persists task results
    with cloudpickle) and serialize as plain JSON objects.

        >>> change = FrozenChange({"lr": 0.1})
        >>> change["lr"] = 0.2
        Traceback (most recent call last):
        TypeError: a recorded change is read-only; build a new dict, e.g. {**change, 'lr': …}
    """

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a recorded change is read-only; build a new dict, e.g. {**change, 'lr': …}")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(change_key(self))

    def __reduce__(self) -> tuple:
        # Unpickling a dict subclass sets items one by one, which this class forbids: rebuild from a dict.
        return (FrozenChange, (dict(self),))

    def __copy__(self) -> FrozenChange:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenChange:
        return self


def _frozen_change(value: Mapping[str, Any]) -> Mapping[str, Scalar]:
    return value if isinstance(value, FrozenChange) else FrozenChange(value)


def change_key(change: Mapping[str, Any]) -> str:
    """A canonical text of a change, equal for equal changes whatever their key order (for matching and dedup).

        >>> change_key({"b": 1, "a": 0.5}) == change_key({"a": 0.5, "b": 1})
        True
    """
    return json.dumps(dict(change), sort_keys=True, default=str, separators=(",", ":"))


class Edit(BaseModel):
    """One code change: replace the text ``old`` by ``new`` in the file ``path`` (relative to the workdir).

        >>> Edit(path="model.py", old="dropout=0.1", new="dropout=0.2").path
        'model.py'

    ``old`` must occur exactly once in the file; an empty ``old`` creates ``path`` (which must not exist).
    Where an edit may write (the editable globs, inside the repository, no symlinks) is checked when it is
    applied, by :mod:`cq_prefect.code_changes`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="File to change, relative to the experiment's workdir, e.g. model.py.",
                      min_length=1, max_length=500)
    old: str = Field(description="Exact text to replace (must occur once); empty to create a new file.")
    new: str = Field(description="The replacement text.")


class Hypothesis(BaseModel):
    """One idea to try: a title, why it might help, the parameter overrides and code edits that implement it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(description="Short name of the idea, e.g. 'bone-length loss'.", min_length=1)
    rationale: str = Field("", description="Why it might improve the metric.")
    change: Mapping[str, Scalar] = Field(
        default_factory=dict,
        description="Parameter overrides applied to the command as --key=value or {key} placeholders.",
        validate_default=True,  # the default {} must be frozen too
    )
    edits: tuple[Edit, ...] = Field(
        (), description="Code edits, applied on the loop's git branch for this experiment (needs code.editable)."
    )

    @field_validator("change", mode="after")
    @classmethod
    def _freeze(cls, value: Mapping[str, Scalar]) -> Mapping[str, Scalar]:
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"change {key}={item} is not a finite number")
        return _frozen_change(value)

    @field_serializer("change")
    def _dump_change(self, value: Mapping[str, Scalar]) -> dict[str, Scalar]:
        return dict(value)

    def __repr_args__(self):
        # Most hypotheses change parameters only: their repr stays as short as before edits existed.
        return [(k, v) for k, v in super().__repr_args__() if k != "edits" or v]

    @property
    def key(self) -> tuple[str, str]:
        """What identifies an idea when a resumed loop checks whether it was tried: title and change (the
        ledger keeps which files an experiment edited, not the edits, so they are not part of it)."""
        return (self.title, change_key(self.change))

    def __hash__(self) -> int:
        return hash(self.key)


class ExperimentRecord(BaseModel):
    """One experiment of a loop as the ledger holds it: which hypothesis, how it ended, the metric it reached."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")

    exp_id: str = Field(description="The experiment's id, e.g. exp-044.", min_length=1)
    cycle: int = Field(description="The loop cycle that proposed it (1-based; 0 for the baseline).", ge=0)
    hypothesis: Hypothesis = Field(description="The idea it tested.")
    outcome: Outcome = Field(description="kept | discarded | crashed | pruned | no_metric, or running if pending.")
    value: float | None = Field(None, description="The metric's value (per the loop's metric_strategy), if any.")
    overrides: Mapping[str, Scalar] = Field(
        default_factory=dict,
        description="All overrides the command ran with: the kept changes so far plus this hypothesis's change.",
        validate_default=True,
    )
    curve: Curve = Field((), description="The metric's (step, value) points, for pruning and plots.")
    slot: int = Field(0, description="Position within its cycle (0 … parallel-1).", ge=0)
    flow_run_id: str | None = Field(None, description="The child Prefect flow run.")
    mlflow_run_id: str | None = Field(None, description="The nested MLflow run.")
    message: str | None = Field(None, description="Why it crashed or was pruned, in a line.")
    commit: str | None = Field(None, description="The git commit it ran at (loops with code.editable).")
    branch: str | None = Field(None, description="Its git branch, cq/<loop>/<exp-id> (loops with code.editable).")

    @field_validator("overrides", mode="after")
    @classmethod
    def _freeze(cls, value: Mapping[str, Scalar]) -> Mapping[str, Scalar]:
        return _frozen_change(value)

    @field_serializer("overrides")
    def _dump_overrides(self, value: Mapping[str, Scalar]) -> dict[str, Scalar]:
        return dict(value)

    @property
    def change(self) -> Mapping[str, Scalar]:
        """The hypothesis's own change (not the accumulated overrides)."""
        return self.hypothesis.change

    @property
    def finished(self) -> bool:
        """Whether the experiment has an outcome (anything but ``running``)."""
        return self.outcome != "running"

    @property
    def failed(self) -> bool:
        """Whether it counts against ``max_failures`` (crashed or no metric)."""
        return self.outcome in FAILED_OUTCOMES

    @property
    def has_value(self) -> bool:
        """Whether it produced a usable (finite) metric value."""
        return self.value is not None and math.isfinite(self.value)
