"""What a research loop is asked to do (:class:`LoopConfig`) and the goal logic that judges its results.

    >>> config = LoopConfig.from_yaml('''
    ... name: pose-mpjpe
    ... goal: improve MPJPE below 18mm
    ... metric: mpjpe
    ... budget: 5
    ... experiment: {workdir: /work/pose, command: python train.py --epochs=10}
    ... proposer:
    ...   kind: scripted
    ...   ideas: [{title: bone-length loss, overrides: {bone_loss: 0.1}}]
    ... ''')
    >>> config.direction, config.target, config.unit, config.reached(17.9)
    ('minimize', 18.0, 'mm', True)
    >>> config.experiment.render({"bone_loss": 0.1})
    'python train.py --epochs=10 --bone_loss=0.1'

The target comes from the goal text when not given ("below 18mm" → 18, minimize); bad input — no target,
a direction that is neither minimize nor maximize, ``budget: 0``, a search space with ``low > high``, an idea
the command cannot take — fails when the config is parsed, as a
:class:`~cq_prefect.errors.LoopConfigError` naming the field, the YAML line and the fix. No Prefect import:
the loop flow wires this to Prefect and MLflow.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from cq_prefect import goal as goals
from cq_prefect.errors import LoopConfigError, OverrideError
from cq_prefect.goal import Direction
from cq_prefect.overrides import merge_overrides, placeholders, render_command
from cq_prefect.proposers.base import Proposer
from cq_prefect.proposers.scripted import Idea, load_ideas
from cq_prefect.proposers.search_space import SearchSpace, load_space
from cq_prefect.pruning import AshaRule, MedianRule, NoPruning, PruningRule
from cq_prefect.records import ExperimentRecord, Outcome, Scalar
from cq_prefect.spec import ExperimentSpec, check_command
from cq_prefect.yaml_source import YamlSource

StopReason = Literal[
    "goal_reached", "budget_exhausted", "too_many_failures", "time_budget", "proposer_exhausted", "stopped"
]
STOP_REASONS: tuple[StopReason, ...] = (
    "goal_reached", "budget_exhausted", "too_many_failures", "time_budget", "proposer_exhausted", "stopped"
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_METRIC = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]{0,249}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(d|h|m|s|ms)?", re.IGNORECASE)
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds from a number or text such as ``"8h"``, ``"30m"``, ``"1h30m"``, ``"90s"``, ``"2d"``, ``"600"``.

        >>> parse_duration("8h"), parse_duration("1h30m"), parse_duration(90), parse_duration("45 s")
        (28800.0, 5400.0, 90.0, 45.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write seconds or text like 8h, 30m, 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        parts = list(_DURATION_PART.finditer(text))
        if not text or "".join(p.group(0) for p in parts) != text:
            raise ValueError(f"{value!r} is not a duration; write seconds or text like 8h, 30m, 1h30m, 90s")
        seconds = sum(float(p.group(1)) * _DURATION_UNITS[(p.group(2) or "").lower() or None] for p in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration {value!r} must be more than 0 seconds")
    return seconds


def _duration_or_none(value: Any) -> Any:
    return None if value is None else parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration_or_none)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseExperiment(_Strict):
    """The experiment every hypothesis starts from: the command and where and how it runs."""

    workdir: str = Field(
        description="Folder the command runs in, on the worker host; relative paths are taken from the loop "
        "YAML's folder (or the current folder)."
    )
    command: str = Field(
        description="Shell command; hypotheses add --key=value flags, or fill {key} placeholders if it has any."
    )
    gpu_count: int = Field(0, description="GPUs each experiment needs (0 for CPU).", ge=0, le=64)
    pool: str | None = Field(None, description="Work pool the experiments run on (default: CQ_POOL, i.e. local).")
    timeout: Duration | None = Field(
        None, description="Kill an experiment after this long: seconds, or text like 30m or 2h."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the command.")
    params: dict[str, Scalar] = Field(
        default_factory=dict,
        description="Starting overrides: defaults of the command's {key} placeholders (or --key=value flags) "
        "that hypotheses change.",
    )
    tags: list[str] = Field(default_factory=list, description="Tags added to every experiment's runs.")

    _command = field_validator("command")(check_command)

    @field_validator("workdir")
    @classmethod
    def _workdir_absolute(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("workdir is empty; give the folder the command runs in")
        return str(Path(value).expanduser().absolute())

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"environment variable name {name!r} is invalid; use [A-Za-z_][A-Za-z0-9_]*")
        return value

    def overrides(self, *changes: Mapping[str, Scalar] | None) -> dict[str, Scalar]:
        """The base params with ``changes`` stacked on, later winning (the kept changes, then the new one)."""
        return merge_overrides(self.params, *changes)

    def render(self, *changes: Mapping[str, Scalar] | None) -> str:
        """The command with the base params and ``changes`` applied; OverrideError when they do not fit."""
        return render_command(self.command, self.overrides(*changes))

    def spec(
        self, *, name: str, exp_id: str | None = None, changes: Sequence[Mapping[str, Scalar]] = (),
        tags: Sequence[str] = (), mlflow_experiment: str = "cq",
    ) -> ExperimentSpec:
        """The :class:`~cq_prefect.spec.ExperimentSpec` of one experiment: the command with ``changes``
        applied, the overrides recorded as its params.

            >>> base = BaseExperiment(workdir="/w", command="python train.py", params={"lr": 0.1})
            >>> spec = base.spec(name="loop/1/0", exp_id="exp-1", changes=[{"lr": 0.05}])
            >>> spec.command, spec.params
            ('python train.py --lr=0.05', {'lr': 0.05})
        """
        overrides = self.overrides(*changes)
        return ExperimentSpec(
            name=name,
            workdir=self.workdir,
            command=render_command(self.command, overrides),
            gpu_count=self.gpu_count,
            exp_id=exp_id,
            env=dict(self.env),
            tags=[*self.tags, *tags],
            timeout=self.timeout,
            params=overrides,
            mlflow_experiment=mlflow_experiment,
        )


class OptunaSettings(_Strict):
    """Search a parameter space with Optuna's TPE sampler (pip install optuna)."""

    kind: Literal["optuna"] = Field(description="optuna")
    space: SearchSpace = Field(
        description="Path of a search-space YAML (name: {type: float|int|categorical, low, high, log, step, "
        "choices}; read when the config is loaded) or the space inline.",
        min_length=1,
    )
    seed: int | None = Field(None, description="Sampler seed; default: derived from the loop name (reproducible).")
    startup_trials: int = Field(5, description="Random points before TPE models the results.", ge=0)
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="tpe (Optuna's TPE, the default) or random (random search over the same space).")

    _read_space = field_validator("space", mode="before")(lambda value: _space_value(value))


def _space_value(value: Any) -> Any:
    # A file is validated on its own (its errors name its lines); an inline space by pydantic, in place.
    if isinstance(value, (str, Path)):
        try:
            return load_space(_existing_file(value, "search space"))
        except LoopConfigError as exc:
            raise ValueError(str(exc)) from exc
    if isinstance(value, Mapping) and set(value) == {"space"}:
        return value["space"]
    return value


class ScriptedSettings(_Strict):
    """Try a list of ideas in order, then stop (proposer_exhausted) or go on with ``then`` (Optuna)."""

    kind: Literal["scripted"] = Field(description="scripted")
    ideas: list[Idea] = Field(
        description="Path of an ideas YAML (a list of {title, rationale, overrides}; read when the config is "
        "loaded) or the ideas inline.",
        min_length=1,
    )
    then: OptunaSettings | None = Field(
        None, description="When the ideas are used up, go on with this proposer (e.g. {kind: optuna, space: …}).")

    @field_validator("ideas", mode="before")
    @classmethod
    def _read_ideas(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            try:
                return load_ideas(_existing_file(value, "ideas"))
            except LoopConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value


class ClaudeSettings(_Strict):
    """Ask Claude for each cycle's hypotheses: parameter values and code edits (pip install anthropic)."""

    kind: Literal["claude"] = Field(description="claude")
    model: str | None = Field(None, description="Claude model name; default: the proposer's default (a current model).")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        "high", description="How much effort Claude spends per answer: low, medium, high, xhigh or max.")
    instructions: str | None = Field(None, description="Extra guidance for Claude (what to try, what not).")
    credentials: str | None = Field(
        None, description="Name of an AnthropicCredentials block holding the API key; default: ANTHROPIC_API_KEY "
        "where the loop runs, else the block named 'anthropic'.")
    space: SearchSpace | None = Field(
        None, description="Ranges of the parameters Claude may set (a search-space YAML path or inline); "
        "experiment.params and the command's {key} placeholders may be set to any value.")
    fallback: ScriptedSettings | OptunaSettings | None = Field(
        None, description="Proposer used when Claude gives no valid proposal (API down, malformed answer twice); "
        "default: optuna over space when a space is given, else none (the loop stops: proposer_exhausted).")
    max_retries: int = Field(4, description="Retries of an API call on 429, 5xx and 529, with backoff.", ge=0, le=10)

    _read_space = field_validator("space", mode="before")(lambda value: _space_value(value))
def _proposer_shorthand(value: Any) -> Any:
    # `proposer: optuna` reads as `proposer: {kind: optuna}` (then says what else optuna needs).
    return {"kind": value} if isinstance(value, str) else value


ProposerSettings = Annotated[
    ScriptedSettings | OptunaSettings | ClaudeSettings,
    Field(discriminator="kind"),
    BeforeValidator(_proposer_shorthand),
]


class CodeSettings(_Strict):
    """Hypotheses that change code: each experiment runs at its own commit on branch cq/<loop>/<exp-id>."""

    editable: list[str] = Field(
        description="Globs of the files hypotheses may edit, relative to the workdir (model.py, losses/*.py, "
        "src/**/*.py); the workdir must be in a git repository.", min_length=1)
    max_file_bytes: int = Field(20_000, description="Most bytes of each editable file shown to Claude.", ge=1000)
    remote: str | None = Field(
        None, description="Git remote name or URL the loop pushes its branches to, for workers on other hosts (they "
        "clone it at each experiment's commit); default: the repository's own path (workers on this host).")
    merge: bool = Field(False, description="When the loop ends, merge cq/<loop>/best into the branch it started from.")
    prune_branches: bool = Field(
        False, description="When the loop ends, delete the branches of experiments that were not kept.")

    @field_validator("editable")
    @classmethod
    def _safe_globs(cls, value: list[str]) -> list[str]:
        for glob in value:
            parts = glob.replace("\\", "/").split("/")
            if not glob.strip() or glob.startswith(("/", "~")) or ".." in parts or ".git" in parts:
                raise ValueError(f"editable glob {glob!r} must be relative to the workdir and stay inside it "
                                 f"(e.g. model.py, losses/*.py)")
        return value


class PruningSettings(_Strict):
    """When to stop a running experiment early from its streamed metric."""

    rule: Literal["none", "median", "asha"] = Field(
        "none",
        description="none; median: stop a run worse than the median of finished runs at the same step; "
        "asha: successive halving, only the best 1/reduction_factor go past each rung.",
    )
    min_experiments: int = Field(
        3, description="Finished experiments needed at a step before anything is pruned there.", ge=1
    )
    min_step: int = Field(0, description="Never prune before this step (warm-up); ASHA's first rung.", ge=0)
    reduction_factor: int = Field(3, description="ASHA only: keep the best 1/N at each rung.", ge=2)

    def create_rule(self) -> PruningRule:
        """The :class:`~cq_prefect.pruning.PruningRule` these settings describe."""
        if self.rule == "median":
            return MedianRule(self.min_experiments, self.min_step)
        if self.rule == "asha":
            return AshaRule(self.min_experiments, self.min_step, self.reduction_factor)
        return NoPruning()


class LoopConfig(_Strict):
    """A research loop: a goal on one metric, a budget, a base experiment, a proposer and a pruning rule."""

    name: str = Field(description="Loop name (letters, digits, _ . -): how cq loop status/resume/stop find it.")
    goal: str = Field("", description="The goal in words, e.g. 'improve MPJPE below 18mm'; the target is read "
                      "from it when not given.")
    metric: str = Field(description="The metric the script prints as @KEY=VALUE, e.g. mpjpe.")
    direction: Direction | None = Field(
        None, description="minimize or maximize; read from the goal ('below' → minimize) when not given."
    )
    target: float | None = Field(
        None, description="Stop when the metric reaches this (a number, or text like 18mm); read from the goal "
        "when not given."
    )
    unit: str | None = Field(None, description="Unit printed after values (mm, %); taken from the target.")
    budget: int = Field(description="Most experiments to run (1 or more).", ge=1)
    parallel: int = Field(1, description="Experiments run at the same time.", ge=1)
    max_failures: int = Field(
        3, description="Stop after this many failed experiments (crashed or no metric; pruned ones do not count).",
        ge=1,
    )
    time_budget: Duration | None = Field(
        None, description="Stop starting experiments after this long: seconds, or text like 8h or 30m."
    )
    metric_strategy: Literal["last", "min", "max"] = Field(
        "last", description="Which value of an experiment's metric counts: last (at its highest step), min or max."
    )
    experiment: BaseExperiment = Field(description="The base experiment each hypothesis changes.")
    proposer: ProposerSettings = Field(description="Where hypotheses come from: scripted, optuna or claude.")
    code: CodeSettings | None = Field(
        None, description="Let hypotheses edit code (editable globs; each experiment on its own git branch).")
    pruning: PruningSettings = Field(default_factory=PruningSettings, description="Early stopping of bad runs.")
    exp_ids: str = Field(
        "{loop}-c{cycle}-s{slot}",
        description="How experiments are named, from {loop}, {cycle}, {slot} and {n} (first_n plus the "
        "experiment's place: cycle × parallel + slot), e.g. exp-{n:03d}; the baseline is cycle 0.",
    )
    first_n: int = Field(1, description="{n} of the baseline in exp_ids.", ge=0)

    # --- validation ----------------------------------------------------------------------------------

    @field_validator("exp_ids")
    @classmethod
    def _exp_ids_unique(cls, value: str) -> str:
        if "{n" not in value and not ("{cycle" in value and "{slot" in value):
            raise ValueError(f"exp_ids {value!r} must name each experiment apart: use {{n}} (e.g. exp-{{n:03d}}) "
                             f"or both {{cycle}} and {{slot}}")
        try:
            sample = value.format(loop="loop", cycle=1, slot=0, n=42)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"exp_ids {value!r}: {exc!s}; use only {{loop}}, {{cycle}}, {{slot}} and {{n}}") from None
        if not _NAME.fullmatch(sample):
            raise ValueError(f"exp_ids {value!r} gives {sample!r}: an exp id is letters, digits, '_', '.' or '-'")
        return value

    def exp_id(self, cycle: int, slot: int) -> str:
        """The exp id of the experiment in ``slot`` of ``cycle`` (the same after a resume).

            >>> LoopConfig.parse({"name": "pose", "goal": "mpjpe below 25mm", "metric": "mpjpe", "budget": 5,
            ...     "experiment": {"workdir": "/w", "command": "python train.py"}, "exp_ids": "exp-{n:03d}",
            ...     "first_n": 42, "proposer": {"kind": "scripted", "ideas": [{"title": "a", "overrides": {"x": 1}}]}}
            ... ).exp_id(2, 0)
            'exp-044'
        """
        return self.exp_ids.format(loop=self.name[:80], cycle=cycle, slot=slot,
                                   n=self.first_n + (cycle and (cycle - 1) * self.parallel + slot + 1))

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"name {value!r} must be letters, digits, '_', '.' or '-' (e.g. pose-mpjpe)")
        return value

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().removeprefix("@")
            if not _METRIC.fullmatch(value):
                raise ValueError(
                    f"metric {value!r} is not a metric key; use the KEY of the script's @KEY=VALUE lines (e.g. mpjpe)"
                )
        return value

    @field_validator("direction", mode="before")
    @classmethod
    def _direction_word(cls, value: Any) -> Any:
        if isinstance(value, str):
            word = value.strip().lower()
            if word not in goals.DIRECTIONS:
                raise ValueError(
                    f"direction {value!r} must be minimize or maximize (minimize: smaller is better, e.g. a loss "
                    f"or an error; maximize: larger is better, e.g. accuracy)"
                )
            return word
        return value

    @model_validator(mode="before")
    @classmethod
    def _target_and_unit(cls, data: Any) -> Any:
        # The target may come as text with a unit ("18mm"): the number is the target, the unit is kept.
        if isinstance(data, Mapping) and isinstance(data.get("target"), str):
            try:
                value, unit = goals.parse_number(data["target"])
            except ValueError as exc:
                raise ValueError(f"target: {exc}") from exc
            data = {**data, "target": value}
            if unit and not data.get("unit"):
                data["unit"] = unit
        return data

    @model_validator(mode="after")
    def _goal(self) -> LoopConfig:
        try:
            found = goals.parse_goal(self.goal) if self.goal else None
        except ValueError as exc:
            if self.target is None:
                raise ValueError(f"goal: {exc} (e.g. target: 18)") from exc
            found = None
        implied = found.direction if found else None
        if implied and self.direction and implied != self.direction:
            raise ValueError(
                f"direction: the goal says {found.phrase!r} ({implied}) but direction is {self.direction}; "
                f"fix one of them"
            )
        direction = self.direction or implied
        target, unit = self.target, self.unit
        if target is None and found is not None:
            target, unit = found.value, unit or found.unit
        if target is None:
            raise ValueError(
                f"goal: no target in {self.goal!r}; add one to the goal (e.g. '{self.metric} below 18' or "
                f"'above 0.9') or give target: 18 (--target 18)"
                + ("" if direction else ", and give direction: minimize or maximize (--direction)")
            )
        if direction is None:
            raise ValueError(
                f"direction: the goal {self.goal!r} does not say which way is better; give direction: minimize "
                f"or maximize (--direction)"
            )
        if not math.isfinite(target):
            raise ValueError(f"target: {target} must be a finite number")
        # The model is frozen: fill the derived fields once, here, where they are computed.
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "unit", unit)
        return self

    @model_validator(mode="after")
    def _changes_fit_command(self) -> LoopConfig:
        base = self.experiment
        proposer = self.proposer
        names = placeholders(base.command)
        search = proposer if isinstance(proposer, OptunaSettings) else getattr(proposer, "then", None)
        if search is not None and names:
            uncovered = [key for key in search.space if key not in names]
            if uncovered:
                raise ValueError(
                    f"experiment.command: it has {{key}} placeholders but none for search-space parameter "
                    f"{uncovered[0]!r}; add --{uncovered[0]}={{{uncovered[0]}}} to the command"
                )
            missing = [key for key in names if key not in search.space and key not in base.params]
            if missing and search is proposer:
                raise ValueError(
                    f"experiment.command: placeholder {{{missing[0]}}} has no value; add it to the search space "
                    f"or give a default in experiment.params"
                )
        if search is not None:
            sample = {name: _sample_value(param) for name, param in search.space.items()}
            try:
                base.render(sample)
            except OverrideError as exc:
                raise ValueError(f"proposer.space: its parameters do not fit experiment.command: {exc}") from exc
        if isinstance(proposer, ClaudeSettings) and not (base.params or names or proposer.space or self.code):
            raise ValueError("proposer: Claude has nothing it may change; declare parameters (proposer.space, or "
                             "experiment.params) or editable files (code: {editable: [model.py]}, --editable)")
        if isinstance(proposer, ClaudeSettings) and proposer.space:
            sample = {name: _sample_value(param) for name, param in proposer.space.items()}
            try:
                base.render(sample)
            except OverrideError as exc:
                raise ValueError(f"proposer.space: its parameters do not fit experiment.command: {exc}") from exc
        scripted = proposer if isinstance(proposer, ScriptedSettings) else getattr(proposer, "fallback", None)
        if isinstance(scripted, ScriptedSettings):
            for index, idea in enumerate(scripted.ideas, start=1):
                if idea.edits and self.code is None:
                    raise ValueError(f"proposer.ideas: idea {index} ({idea.title!r}) edits code; add code: {{editable: "
                                     f"[globs of the files it may change]}} (the workdir must be a git repository)")
                for edit in idea.edits:
                    _check_editable(edit.path, self.code.editable, f"idea {index} ({idea.title!r})")
                try:
                    base.render(idea.overrides)
                except OverrideError as exc:
                    raise ValueError(
                        f"proposer.ideas: idea {index} ({idea.title!r}) does not fit experiment.command: {exc}"
                    ) from exc
        if isinstance(proposer, ClaudeSettings) and isinstance(proposer.fallback, OptunaSettings):
            sample = {name: _sample_value(param) for name, param in proposer.fallback.space.items()}
            try:
                base.render(sample)
            except OverrideError as exc:
                raise ValueError(f"proposer.fallback.space: its parameters do not fit experiment.command: {exc}") from exc
        if not isinstance(proposer, (ScriptedSettings, OptunaSettings)):
            missing = [key for key in names if key not in base.params]
            if missing:
                raise ValueError(
                    f"experiment.command: placeholder {{{missing[0]}}} has no value; give a default in "
                    f"experiment.params"
                )
        return self

    # --- loading -------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str = "loop config") -> LoopConfig:
        """Validate a mapping (e.g. from CLI flags or a flow parameter); LoopConfigError listing every
        problem as ``field: what is wrong — how to fix it``."""
        if isinstance(data, LoopConfig):
            return data
        if not isinstance(data, Mapping):
            raise LoopConfigError(f"{source}: a loop config is a mapping of name, goal, metric, budget, … ")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            doc = YamlSource(data, source, {})
            raise LoopConfigError(doc.explain(exc, _describe)) from None

    @classmethod
    def from_yaml(cls, source: str | Path, *, base_dir: str | Path | None = None) -> LoopConfig:
        """A config from a YAML file path or YAML text; LoopConfigError naming the line, field and fix.

        Relative paths in it (experiment.workdir, proposer.ideas, proposer.space) are taken from
        ``base_dir``: by default the YAML file's folder, or the current folder for YAML text.
        """
        try:
            doc = YamlSource.read(source, "loop config")
        except ValueError as exc:
            raise LoopConfigError(str(exc)) from exc
        if not isinstance(doc.data, Mapping):
            raise LoopConfigError(
                f"{doc.name}: a loop config is a mapping of name, goal, metric, budget, experiment, proposer, …; "
                f"see deployments/ for an example"
            )
        folder = Path(base_dir) if base_dir is not None else (doc.path.parent if doc.path else Path.cwd())
        data = _resolve_paths(dict(doc.data), folder)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise LoopConfigError(doc.explain(exc, _describe)) from None

    # --- goal logic ----------------------------------------------------------------------------------

    def reached(self, value: float | None) -> bool:
        """Whether ``value`` meets the target (at or beyond it, in the loop's direction)."""
        return goals.reaches(value, self.target, self.direction)

    def is_better(self, value: float | None, best: float | None) -> bool:
        """Whether ``value`` strictly beats ``best`` in the loop's direction (anything beats no best)."""
        return goals.is_better(value, best, self.direction)

    def improvement(self, value: float, best: float) -> float:
        """How much ``value`` improves on ``best`` in metric units: positive when better."""
        return goals.improvement(value, best, self.direction)

    def format_value(self, value: float | None) -> str:
        """A value with the loop's unit: ``19.87mm``."""
        return goals.format_value(value, self.unit)

    def judge(self, value: float | None, best: float | None, *, crashed: bool = False, pruned: bool = False) -> Outcome:
        """The outcome of a finished experiment: crashed, pruned, no_metric (missing or NaN), kept (better than
        ``best``) or discarded.

            >>> config = LoopConfig.from_yaml(EXAMPLE)
            >>> config.judge(19.9, 21.4), config.judge(22.0, 21.4), config.judge(float("nan"), 21.4)
            ('kept', 'discarded', 'no_metric')
        """
        if crashed:
            return "crashed"
        if pruned:
            return "pruned"
        if value is None or math.isnan(value):
            return "no_metric"
        return "kept" if self.is_better(value, best) else "discarded"

    def best(self, history: Sequence[ExperimentRecord]) -> ExperimentRecord | None:
        """The record with the best value among experiments that finished with one (kept or discarded)."""
        best = None
        for record in history:
            finished_with_value = record.outcome in ("kept", "discarded") and record.has_value
            if finished_with_value and (best is None or self.is_better(record.value, best.value)):
                best = record
        return best

    def kept_changes(self, history: Sequence[ExperimentRecord]) -> list[Mapping[str, Scalar]]:
        """The changes of kept experiments in order: what the next experiment's base accumulates."""
        return [record.change for record in history if record.outcome == "kept"]

    def budget_left(self, history: Sequence[ExperimentRecord]) -> int:
        """Experiments that may still start: the budget less every experiment started (running ones too)."""
        return max(0, self.budget - len(history))

    def failures(self, history: Sequence[ExperimentRecord]) -> int:
        """Experiments counted against max_failures so far."""
        return sum(1 for record in history if record.failed)

    def stop_reason(
        self, history: Sequence[ExperimentRecord], *, elapsed_s: float | None = None, proposer_exhausted: bool = False
    ) -> StopReason | None:
        """Why the loop must stop starting experiments now, or None to go on. In priority order: the goal,
        failures, the budget, the time budget, an exhausted proposer.

            >>> config = LoopConfig.from_yaml(EXAMPLE)
            >>> config.stop_reason([]), config.stop_reason([], elapsed_s=9e9)
            (None, 'time_budget')
            >>> config.stop_reason([], proposer_exhausted=True)
            'proposer_exhausted'
        """
        best = self.best(history)
        if best is not None and self.reached(best.value):
            return "goal_reached"
        if self.failures(history) >= self.max_failures:
            return "too_many_failures"
        if self.budget_left(history) <= 0:
            return "budget_exhausted"
        if self.time_budget is not None and elapsed_s is not None and elapsed_s >= self.time_budget:
            return "time_budget"
        if proposer_exhausted:
            return "proposer_exhausted"
        return None

    # --- strategies ----------------------------------------------------------------------------------

    def create_proposer(self, *, knowledge: Sequence[str] = (), files: Any = None, client: Any = None) -> Proposer:
        """The proposer the settings describe (Optuna and the anthropic SDK imported only when used).

        For claude: ``knowledge`` (lines about related earlier work) and ``files`` (history → the editable
        files at the best commit) go into its prompt; ``client`` replaces the ``anthropic.Anthropic`` it would
        build. Its API key is looked up here (BadInput naming both ways to give one when there is none).
        """
        settings = self.proposer
        if isinstance(settings, ScriptedSettings):
            return self._scripted(settings)
        if isinstance(settings, OptunaSettings):
            return self._optuna(settings)
        from cq_prefect.proposers.claude import Brief, ClaudeProposer

        params: dict[str, Any] = {name: None for name in (*self.experiment.params, *placeholders(self.experiment.command))}
        params.update(settings.space or {})
        brief = Brief(goal=self.goal, metric=self.metric, direction=self.direction, target=self.target, unit=self.unit,
                      params=params, base_params=dict(self.experiment.params),
                      editable=tuple(self.code.editable) if self.code else (), instructions=settings.instructions,
                      knowledge=tuple(knowledge), files=files)
        fallback = settings.fallback
        if fallback is None and settings.space:
            fallback = OptunaSettings(kind="optuna", space=settings.space)
        api_key = None
        if client is None:
            from cq_prefect.credentials import anthropic_key

            api_key = anthropic_key(settings.credentials)
        return ClaudeProposer(
            brief, model=settings.model, effort=settings.effort, api_key=api_key, client=client,
            max_retries=settings.max_retries,
            fallback=None if fallback is None else (
                self._scripted(fallback) if isinstance(fallback, ScriptedSettings) else self._optuna(fallback)))

    def _scripted(self, settings: ScriptedSettings) -> Proposer:
        from cq_prefect.proposers.chain import ChainProposer
        from cq_prefect.proposers.scripted import ScriptedProposer

        scripted = ScriptedProposer(settings.ideas)
        return ChainProposer(scripted, self._optuna(settings.then)) if settings.then else scripted

    def _optuna(self, settings: OptunaSettings) -> Proposer:
        from cq_prefect.proposers.optuna_study import OptunaProposer, import_optuna

        seed = settings.seed if settings.seed is not None else zlib.crc32(self.name.encode())
        sampler = None
        if settings.sampler == "random":
            optuna = import_optuna()
            sampler = lambda seed: optuna.samplers.RandomSampler(seed=seed)  # noqa: E731
        return OptunaProposer(settings.space, self.direction, seed=seed, startup_trials=settings.startup_trials,
                              sampler=sampler)

    def create_pruning_rule(self) -> PruningRule:
        """The pruning rule the settings describe."""
        return self.pruning.create_rule()

    def mlflow_params(self) -> dict[str, str]:
        """The config flattened for ``mlflow.log_params``: dotted keys, values as text (lists as JSON, cut
        to 500 characters; a search space whole, up to MLflow's 6000, for ``cq pi`` to read back)."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping) and prefix not in ("experiment.env", "experiment.params") and not (
                    prefix.endswith("space")):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), item)
            elif isinstance(value, (list, dict)):
                flat[prefix] = json.dumps(value, default=str)[:6000 if prefix.endswith("space") else 500]
            else:
                flat[prefix] = "" if value is None else str(value)

        walk("", self.model_dump(mode="json"))
        return flat


EXAMPLE = """\
name: pose-mpjpe
goal: improve MPJPE below 18mm
metric: mpjpe
budget: 5
time_budget: 8h
experiment: {workdir: /work/pose, command: python train.py}
proposer: {kind: scripted, ideas: [{title: bone-length loss, overrides: {bone_loss: 0.1}}]}
"""
"""A small loop config, for docstrings and tests."""


def _sample_value(param: Any) -> Scalar:
    """A value of a search-space parameter, to check that the command can take it before anything runs."""
    return param.choices[0] if hasattr(param, "choices") else param.low


def _check_editable(path: str, editable: Sequence[str], what: str) -> None:
    from cq_prefect.code_changes import EditRejected, check_edit_path

    try:
        check_edit_path(path, editable)
    except EditRejected as exc:
        raise ValueError(f"proposer.ideas: {what}: {exc}") from None


def _existing_file(value: str | Path, what: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{what} file {str(path.absolute())!r} not found; check the path (a relative path is taken from the "
            f"loop YAML's folder)"
        )
    return path


def _resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value.strip() and not Path(value).expanduser().is_absolute():
            return str(folder / value)
        return value

    experiment = data.get("experiment")
    if isinstance(experiment, Mapping) and "workdir" in experiment:
        data["experiment"] = {**experiment, "workdir": resolve(experiment["workdir"])}
    def resolve_proposer(proposer: Any) -> Any:
        if not isinstance(proposer, Mapping):
            return proposer
        for key in ("ideas", "space"):
            if isinstance(proposer.get(key), str):
                proposer = {**proposer, key: resolve(proposer[key])}
        for key in ("then", "fallback"):
            if key in proposer:
                proposer = {**proposer, key: resolve_proposer(proposer[key])}
        return proposer

    if "proposer" in data:
        data["proposer"] = resolve_proposer(data["proposer"])
    return data


_EXPERIMENT_KEYS = set(BaseExperiment.model_fields)
_MODELS_BY_LOC: dict[tuple, type[BaseModel]] = {
    (): LoopConfig,
    ("experiment",): BaseExperiment,
    ("pruning",): PruningSettings,
    ("proposer", "scripted"): ScriptedSettings,
    ("proposer", "scripted", "then"): OptunaSettings,
    ("proposer", "optuna"): OptunaSettings,
    ("proposer", "claude"): ClaudeSettings,
    ("code",): CodeSettings,
}


def _describe(error: dict) -> str | None:
    """Messages that say what to do for the errors pydantic words for programmers."""
    loc, kind = tuple(error["loc"]), error["type"]
    model = _MODELS_BY_LOC.get(loc[:-1])
    if kind == "extra_forbidden":
        key = loc[-1]
        hint = ""
        if loc[:-1] == () and key in _EXPERIMENT_KEYS:
            hint = f"; put {key} under experiment:"
        elif loc[:-1] == () and key in ("ideas", "space", "seed"):
            hint = f"; put {key} under proposer:"
        allowed = ", ".join(model.model_fields) if model else None
        return f"unknown key {key!r}{hint}" + (f" (allowed: {allowed})" if allowed and not hint else "")
    if kind == "missing" and model is not None:
        field = model.model_fields.get(loc[-1])
        if field is not None:
            return f"is required: {field.description}"
    if kind == "union_tag_invalid":
        ctx = error.get("ctx", {})
        field, expected = str(ctx.get("discriminator", "kind")), str(ctx.get("expected_tags", ""))
        return f"{field.strip(chr(39))} {ctx.get('tag')!r} is not one of {expected.replace(chr(39), '')}"
    if kind == "union_tag_not_found" and loc and loc[-1] == "proposer":
        return "give kind: scripted (with ideas), optuna (with space) or claude"
    if kind == "greater_than_equal" and loc and loc[-1] == "budget":
        return f"budget {error['input']} must be at least 1 (the most experiments to run)"
    return None
