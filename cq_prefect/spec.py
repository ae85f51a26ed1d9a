"""What an experiment is (:class:`ExperimentSpec`) and what it yields (:class:`ExperimentResult`)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cq_prefect.metric_syntax import MetricSummary

_EXP_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_command(value: str) -> str:
    """A shell command must not be blank (shared by every model that holds one)."""
    if not value.strip():
        raise ValueError("the command is empty; give the shell command to run, e.g. 'python train.py'")
    return value


def check_env_names(value: dict[str, str]) -> dict[str, str]:
    """Environment variable names must be shell names."""
    for name in value:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"environment variable name {name!r} is invalid; use [A-Za-z_][A-Za-z0-9_]*")
    return value


class GitSource(BaseModel):
    """The code of an experiment as a git commit: what a worker checks out when the workdir is not on its host.

        >>> GitSource(url="https://git.example.com/pose.git", commit="a" * 40, subdir="examples/pose").subdir
        'examples/pose'
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(title="Repository", description="A git URL or path the worker can clone or fetch.", min_length=1)
    commit: str = Field(title="Commit", description="The full commit sha the command runs at.",
                        pattern=r"^[0-9a-f]{40}([0-9a-f]{24})?$")
    subdir: str = Field("", title="Subfolder", description="The workdir inside the repository ('' for its top).")

    def workdir(self, cache_dir: Path) -> Path:
        """This commit's workdir on this host: checked out under ``cache_dir`` (reused when already there)."""
        from cq_prefect.code_changes import checkout_at

        return checkout_at(self.url, self.commit, self.subdir, cache_dir)


class ExperimentSpec(BaseModel):
    """One experiment: a shell command run in a workdir with N GPUs; the parameter of the experiment flow.

        >>> ExperimentSpec(name="baseline", workdir="/tmp", command="python train.py --lr=0.1").gpu_count
        0
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        title="Name", description="Human-readable name; also the MLflow run name.", min_length=1, max_length=250
    )
    workdir: str = Field(
        title="Working directory",
        description="Absolute path on the worker host where the command runs (its git state is recorded).",
    )
    command: str = Field(title="Command", description="Shell command, run by /bin/sh -c in the workdir.")
    gpu_count: int = Field(0, title="GPUs", description="Number of GPUs the command needs (0 for CPU).", ge=0, le=64)
    exp_id: str | None = Field(
        None,
        title="Experiment id",
        description="Stable id such as exp-044 (letters, digits, _ . -); generated at submit when missing.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, title="Environment", description="Extra environment variables for the command."
    )
    tags: list[str] = Field(
        default_factory=list,
        title="Tags",
        description="Tags for the Prefect flow run and the MLflow run ('key=value' or a bare label).",
    )
    timeout: float | None = Field(
        None, title="Timeout (s)", description="Kill the whole process tree after this many seconds.", gt=0
    )
    params: dict[str, str | int | float | bool] = Field(
        default_factory=dict, title="Parameters", description="Recorded as MLflow params (e.g. the overrides)."
    )
    mlflow_experiment: str = Field(
        "cq", title="MLflow experiment", description="MLflow experiment the run is recorded in.", min_length=1
    )
    source: GitSource | None = Field(
        None, title="Code at a commit",
        description="Run at this git commit: in the workdir when it is there at that commit (a worker on the loop's "
        "host), else in a checkout of the repository under the worker's CQ_HOME/checkouts.",
    )

    _command = field_validator("command")(check_command)

    @field_validator("workdir")
    @classmethod
    def _workdir_absolute(cls, value: str) -> str:
        if not value or not Path(value).is_absolute():
            raise ValueError(f"workdir {value!r} is not an absolute path; pass the full path of the folder")
        return value

    @field_validator("exp_id")
    @classmethod
    def _exp_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not _EXP_ID.fullmatch(value):
            raise ValueError(f"exp_id {value!r} must be letters, digits, '_', '.' or '-' (e.g. exp-044)")
        return value

    _env = field_validator("env")(check_env_names)

    @field_validator("params")
    @classmethod
    def _params_keys(cls, value: dict) -> dict:
        for name in value:
            if not name or len(name) > 250:
                raise ValueError(f"param name {name!r} must be 1 to 250 characters")
        return value

    def mlflow_tags(self) -> dict[str, str]:
        """The user's tags as MLflow run tags: ``key=value`` → key: value, a bare label → label: 'true'."""
        tags = {}
        for tag in self.tags:
            key, sep, value = tag.partition("=")
            tags[key.strip()] = value.strip() if sep else "true"
        return tags


class MetricStats(BaseModel):
    """A metric over a run: final value (at the highest step), min, max, point count and unit."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    final: float
    min: float
    max: float
    count: int
    unit: str | None = None

    @classmethod
    def from_summary(cls, summary: MetricSummary) -> MetricStats:
        return cls(final=summary.final, min=summary.min, max=summary.max, count=summary.count, unit=summary.unit)


Outcome = Literal["success", "failed", "timeout", "cancelled", "crashed", "running", "scheduled"]


class ExperimentResult(BaseModel):
    """What an experiment produced: how it ended, how long it took, and its metrics."""

    model_config = ConfigDict(ser_json_inf_nan="strings")

    exp_id: str
    name: str
    outcome: Outcome
    exit_code: int | None = None
    duration_s: float | None = None
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    gpu_ids: list[str] = Field(default_factory=list)
    metrics: dict[str, MetricStats] = Field(default_factory=dict)
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "success"

    def metric(self, key: str, strategy: Literal["last", "min", "max"] = "last") -> float | None:
        """The metric's final (``last``), ``min`` or ``max`` value; None when the run never printed it."""
        stats = self.metrics.get(key)
        if stats is None:
            return None
        value = {"last": stats.final, "min": stats.min, "max": stats.max}[strategy]
        return None if math.isnan(value) else value
