"""The Optuna proposer: TPE over a search space, through Optuna's ask/tell, rebuilt from the history.

    >>> proposer = OptunaProposer({"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
    ...                           "minimize", seed=7)
    >>> [sorted(h.change) for h in proposer.propose([], 2)]
    [['lr'], ['lr']]

Every :meth:`~OptunaProposer.propose` builds a fresh in-memory study from the history — finished runs
told as complete, crashed or metric-less runs as failed, pruned runs as pruned (with their curve), running
ones as running so TPE's constant liar steers away from them — and asks it for ``n`` new points. The
sampler's seed is derived from the proposer's seed and the history's length, so proposals are a pure
function of (config, history): a resumed loop proposes exactly what the original would have. Points
already tried are never proposed again; a finite space whose every point was tried is exhausted.

Optuna is optional: without it, constructing the proposer raises
:class:`~cq_prefect.errors.MissingDependency` naming ``pip install optuna``.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cq_prefect.errors import MissingDependency
from cq_prefect.goal import Direction, format_value
from cq_prefect.proposers.base import Proposer
from cq_prefect.proposers.search_space import CategoricalParam, FloatParam, IntParam, cardinality, load_space
from cq_prefect.records import ExperimentRecord, Hypothesis, change_key

# Beyond this many points, a finite space is not enumerated to find the untried ones: TPE's own draws
# are left to find them.
_ENUMERATION_LIMIT = 10_000
_ASKS_PER_HYPOTHESIS = 20


def import_optuna() -> Any:
    """The ``optuna`` module, or MissingDependency with the command that installs it."""
    try:
        import optuna
    except ImportError as exc:
        raise MissingDependency(
            "the optuna proposer needs Optuna, which is not installed; run: pip install 'optuna>=4,<5' "
            "(or choose proposer: scripted)"
        ) from exc
    # A study is built per proposal: without this, every cycle logs "A new study created in memory".
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class OptunaProposer(Proposer):
    """Proposes points of a search space with Optuna's TPE sampler.

    Args:
        space: the search space (see :mod:`cq_prefect.proposers.search_space`): parsed, a mapping, or
            YAML text / a file path.
        direction: the loop's direction.
        seed: makes proposals reproducible; the same seed and history give the same hypotheses.
        startup_trials: random points before TPE models the results (Optuna's default is 10; loops run
            few, costly experiments, so 5).
        sampler: ``factory(seed) -> optuna.samplers.BaseSampler`` to use instead of TPE (e.g. in tests).
    """

    def __init__(
        self,
        space: Mapping[str, Any] | str,
        direction: Direction,
        *,
        seed: int = 0,
        startup_trials: int = 5,
        sampler: Callable[[int], Any] | None = None,
    ):
        self._optuna = import_optuna()
        self.space = load_space(space)
        self.direction = direction
        self.seed = seed
        self.startup_trials = startup_trials
        self._sampler_factory = sampler
        self._distributions = {name: _distribution(self._optuna, param) for name, param in self.space.items()}
        self._size = cardinality(self.space)

    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        optuna = self._optuna
        study = self._study(history)
        tried: dict[str, float | None] = {}
        for record in history:
            params = self._params_of(record)
            if params:
                tried.setdefault(change_key(params), record.value if record.has_value else None)
        evaluated = sum(1 for t in study.trials if t.state.is_finished())
        proposals: list[Hypothesis] = []
        while len(proposals) < n and (self._size is None or len(tried) < self._size):
            params = None
            for _ in range(_ASKS_PER_HYPOTHESIS):
                trial = study.ask(self._distributions)
                candidate = self._clean(trial.params)
                key = change_key(candidate)
                if key not in tried:
                    params = candidate
                    break
                # Tell TPE what it re-proposed, so its next draw moves on (and its RNG advances).
                known = tried[key]
                if known is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, known)
            if params is None:
                params = self._untried_point(tried, len(history) + len(proposals))
                if params is None:
                    break
            tried[change_key(params)] = None
            proposals.append(self._hypothesis(params, evaluated))
        return proposals

    def state(self) -> Mapping[str, Any]:
        return {"sampler": "tpe", "seed": self.seed, "startup_trials": self.startup_trials, "points": self._size}

    # --- the study, rebuilt from the records --------------------------------------------------------

    def _study(self, history: Sequence[ExperimentRecord]) -> Any:
        optuna = self._optuna
        # The seed moves with the history's length: the same history gives the same draws (resume), and
        # a longer one does not replay the first random startup points.
        seed = random.Random(f"{self.seed}:{len(history)}").randrange(2**31)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self._sampler_factory is not None:
                sampler = self._sampler_factory(seed)
            else:
                sampler = optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=self.startup_trials, constant_liar=True
                )
            study = optuna.create_study(direction=self.direction, sampler=sampler)
        for record in history:
            trial = self._frozen_trial(record)
            if trial is not None:
                study.add_trial(trial)
        return study

    def _frozen_trial(self, record: ExperimentRecord) -> Any:
        optuna = self._optuna
        params = self._params_of(record)
        if not params:
            return None  # the baseline, or an idea from another proposer: nothing TPE can place
        distributions = {name: self._distributions[name] for name in params}
        state = optuna.trial.TrialState
        curve = {int(step): float(value) for step, value in record.curve}
        if record.outcome == "running":
            kwargs: dict[str, Any] = {"state": state.RUNNING}
        elif record.outcome == "pruned":
            kwargs = {"state": state.PRUNED, "intermediate_values": curve}
        elif record.outcome in ("kept", "discarded") and record.has_value:
            kwargs = {"state": state.COMPLETE, "value": record.value}
        else:  # crashed, no_metric, or a value that is missing or NaN: failed, and the study goes on
            kwargs = {"state": state.FAIL}
        return optuna.trial.create_trial(params=params, distributions=distributions, **kwargs)

    def _params_of(self, record: ExperimentRecord) -> dict[str, Any]:
        """The record's values of this space's parameters that still fit it (the space may have changed)."""
        params = {}
        for name, value in record.hypothesis.change.items():
            distribution = self._distributions.get(name)
            if distribution is None:
                continue
            try:
                if distribution._contains(distribution.to_internal_repr(value)):
                    params[name] = value
            except (ValueError, TypeError):
                continue
        return params

    # --- proposals ------------------------------------------------------------------------------------

    def _clean(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Sampled values as a command line should carry them: floats rounded (6 significant digits, or
        onto their step's grid) and kept inside their range; in the space's order."""
        clean = {}
        for name, param in self.space.items():
            value = params[name]
            if isinstance(param, FloatParam):
                if param.step is not None:
                    k = round((value - param.low) / param.step)
                    value = float(f"{param.low + k * param.step:.12g}")
                else:
                    value = float(f"{value:.6g}")
                value = min(max(value, param.low), param.high)
            elif isinstance(param, IntParam):
                value = int(value)
            clean[name] = value
        return clean

    def _untried_point(self, tried: Mapping[str, Any], salt: int) -> dict[str, Any] | None:
        """An untried point of a small finite space, drawn reproducibly; None when every point was tried
        or the space is too large (or continuous) to enumerate."""
        if self._size is None or self._size > _ENUMERATION_LIMIT:
            return None
        names = list(self.space)
        axes = [_values(self.space[name]) for name in names]
        points = (dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes))
        untried = [point for point in points if change_key(point) not in tried]
        if not untried:
            return None
        return random.Random(f"{self.seed}:{salt}:untried").choice(untried)

    def _hypothesis(self, params: Mapping[str, Any], evaluated: int) -> Hypothesis:
        title = ", ".join(f"{name}={_short(value)}" for name, value in params.items())
        if len(title) > 120:
            title = title[:119] + "…"
        if evaluated < self.startup_trials:
            rationale = f"random exploration ({evaluated} of {self.startup_trials} startup points evaluated)"
        else:
            rationale = f"TPE: likely to improve given {evaluated} evaluated experiments"
        return Hypothesis(title=title, rationale=rationale, change=dict(params))

    def __repr__(self) -> str:
        return f"OptunaProposer({list(self.space)}, {self.direction}, seed={self.seed})"


def _distribution(optuna: Any, param: FloatParam | IntParam | CategoricalParam) -> Any:
    distributions = optuna.distributions
    if isinstance(param, FloatParam):
        return distributions.FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    if isinstance(param, IntParam):
        return distributions.IntDistribution(param.low, param.high, log=param.log, step=param.step)
    return distributions.CategoricalDistribution(list(param.choices))


def _values(param: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step))
    assert param.step is not None  # a continuous float makes the space infinite: never enumerated
    return [float(f"{param.low + k * param.step:.12g}") for k in range(param.size() or 0)]


def _short(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return format_value(value)
    return str(value).lower() if isinstance(value, bool) else str(value)
