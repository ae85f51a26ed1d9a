"""The research loop: a long-running parent flow that proposes, runs, measures, keeps and stops.

    >>> from cq_prefect import research_loop
    >>> result = research_loop(config=LoopConfig.from_yaml("deployments/loops/pose.yaml"))   # doctest: +SKIP
    >>> result.reason, result.best                                                           # doctest: +SKIP
    ('goal_reached', 17.62)

The loop first runs the base experiment as configured (cycle 0, the baseline). Each cycle then asks the
proposer for up to ``parallel`` hypotheses, submits each as a child run of the experiment deployment on
the config's pool (a subflow of this run, under a task named after the slot), polls them every
``poll_interval`` seconds (backing off to once a second while they run long), prunes running children whose
streamed metric is bad (the worker kills their process trees and frees their GPUs), reads each finished
child's metric, records the outcome in the MLflow ledger (:mod:`cq_prefect.ledger`), and keeps
improvements: kept changes accumulate into the base of every later experiment. It stops with goal_reached | budget_exhausted | too_many_failures |
time_budget | proposer_exhausted | stopped (``cq loop stop``, or Cancel on its flow run in the Prefect UI:
its running children are cancelled and the run ends Cancelled).

**Idempotency and resume.** A child's exp id is a function of its cycle and slot (``<loop>-c<cycle>-s<slot>``,
or the config's ``exp_ids``); its MLflow run (created before its flow run, tagged ``cq.loop.outcome=running``)
is the intent, and its flow run carries the tag ``cq.loop.ledger=<parent run>``. A resumed parent
(``resume=True``, or a Prefect retry of the same flow run) rebuilds the history from the ledger; for each
``running`` record it finds the child's flow run (by the tag on the MLflow run, else by name and ledger
tag in Prefect) and waits for it again, or — when the parent died between creating the MLflow run and
the flow run — resubmits that same hypothesis in the same slot. Proposers are pure functions of the
history, so no hypothesis runs twice.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cq_prefect import tracking
from cq_prefect.errors import BadInput, LoopConfigError, MetricNeverPrinted, OverrideError, UnknownRun
from cq_prefect.ledger import (
    ALIVE_SECONDS,
    PLOT_ARTIFACT,
    TAG_BEST,
    TAG_BEST_EXP,
    TAG_LEDGER,
    TAG_REASON_DETAIL,
    Ledger,
    read_curve,
)
from cq_prefect.loop_config import LoopConfig
from cq_prefect.records import ExperimentRecord, Hypothesis

LOOP_FLOW_NAME = "research-loop"
LOOP_ENTRYPOINT = "cq_prefect.loop:research_loop"
POLL_INTERVAL = 0.25
BASELINE = Hypothesis(title="baseline", rationale="the base experiment as configured", change={})
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
EVENT_GOAL_REACHED = "cq.loop.goal-reached"
EVENT_FINISHED = "cq.loop.finished"


class LoopResult(BaseModel):
    """How a loop ended: its reason, its best experiment, and every experiment's record."""

    name: str
    status: str = Field(description="finished, stopped or failed.")
    reason: str | None = Field(None, description="goal_reached, budget_exhausted, too_many_failures, …")
    best: float | None = None
    best_exp_id: str | None = None
    target: float | None = None
    budget: int = 0
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    experiments: list[ExperimentRecord] = Field(default_factory=list)
    best_branch: str | None = Field(None, description="Code loops: the branch of the best code, cq/<loop>/best.")
    merged: str | None = Field(None, description="Code loops with merge: the start branch's commit after the merge.")


def _checkpoint(point: str, **info: Any) -> None:
    """A named point of the loop (proposed, submitted, child_running, child_finished, recorded, cycle_done).

    Does nothing; tests replace it to kill the parent exactly there and check that a resume runs every
    hypothesis once."""


# -- the flow ---------------------------------------------------------------------------------------


def _research_loop(
    config: LoopConfig | dict[str, Any] | str, resume: bool = False, budget: int | None = None,
    poll_interval: float = POLL_INTERVAL,
) -> LoopResult:
    """Run a research loop: propose, run, measure, keep, until the goal, the budget or the failures stop it.

    Args:
        config: the loop config: a mapping (as in a loop YAML), YAML text, or the path of a loop YAML file on
            the host that runs the flow.
        resume: continue the newest loop of this name from its MLflow ledger (finished experiments are not
            run again, running ones are re-attached).
        budget: a new budget (most experiments in all) for this run, e.g. to extend a resumed loop.
        poll_interval: seconds between looks at the running children (at most 1).
    """
    from prefect.context import FlowRunContext

    from cq_prefect.crash import heartbeats

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # results are read every cycle
    config = _config(config, budget)
    if not 0 < poll_interval <= 1:
        raise BadInput(f"poll_interval {poll_interval}: give a number of seconds in (0, 1]")
    flow_run = FlowRunContext.get().flow_run
    endpoints = _endpoints()
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    ledger = None
    if flow_run.run_count > 1:  # a Prefect retry of this very flow run: its ledger stands
        ledger = Ledger.of_flow_run(mlflow, config.name, str(flow_run.id))
    if ledger is None and resume:
        ledger = Ledger.latest(mlflow, config.name)
        if ledger is None:
            raise UnknownRun(f"resume: no loop named '{config.name}' to resume; start it with `cq loop start`")
    resumed = ledger is not None
    # Everything that can refuse the config (no git repository, no API key) runs before a ledger exists.
    from cq_prefect.loop_code import LoopCode

    code = LoopCode.open(config, start=ledger.git_start() if ledger is not None else None)
    proposer = config.create_proposer(knowledge=_knowledge(config, endpoints) if _uses_claude(config) else (),
                                      files=code.files if code else None)
    try:
        if ledger is not None:
            ledger.claim(str(flow_run.id), flow_run.name, config)
            ledger.save_config(config)
        else:
            ledger = Ledger.create(mlflow, config, str(flow_run.id), flow_run.name)
        if code is not None:
            ledger.set_git_start(code.repo.start_branch, code.repo.start_commit, code.repo.best_branch)
    except BaseException:
        proposer.close()
        raise
    loop = _Loop(config, ledger, endpoints, str(flow_run.id), poll_interval, resumed=resumed, proposer=proposer,
                 code=code)
    with heartbeats():
        result = loop.run()
    if loop.cancelled:  # cancelled in Prefect: a cancelling run may only end Cancelled
        from prefect.states import Cancelled

        return Cancelled(message=f"cancelled: the loop stopped after {len(result.experiments)} experiments",
                         data=result)
    return result


def _uses_claude(config: LoopConfig) -> bool:
    return getattr(config.proposer, "kind", None) == "claude"


def _knowledge(config: LoopConfig, endpoints, limit: int = 8) -> list[str]:
    """Lines about earlier experiments and notes related to the goal, for Claude's prompt (none when the
    knowledge cannot be read: it informs, it never stops a loop)."""
    try:
        from cq_prefect.knowledge_cli import related_lines

        return related_lines(f"{config.goal} {config.metric}", endpoints.mlflow_tracking_uri, limit=limit,
                             exclude_loop=config.name)
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).warning("the knowledge could not be read (%s); Claude goes without it", exc)
        return []


def _make_flow():
    from prefect import flow

    return flow(_research_loop, name=LOOP_FLOW_NAME, persist_result=False, log_prints=False)


research_loop = _make_flow()


def _config(config: Any, budget: int | None) -> LoopConfig:
    if isinstance(config, str):
        text = config.strip()
        if "\n" not in text and text.endswith((".yaml", ".yml")):
            config = LoopConfig.from_yaml(Path(text).expanduser())
        else:
            config = LoopConfig.from_yaml(text)
    else:
        config = LoopConfig.parse(config)
    if budget is not None:
        if budget < 1:
            raise LoopConfigError(f"budget {budget} must be at least 1 (the most experiments to run)")
        config = config.model_copy(update={"budget": budget})
    return config


def _endpoints():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from cq_prefect.stack import Endpoints

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise BadInput("MLFLOW_TRACKING_URI is not set; start the loop with `cq loop start` (or export the MLflow URI)")
    return Endpoints(PREFECT_API_URL.value() or "", PREFECT_UI_URL.value() or "", uri, uri)


# -- one loop run -------------------------------------------------------------------------------------


@dataclass
class _Child:
    """A submitted experiment the loop waits for."""

    record: ExperimentRecord  # outcome "running"
    handle: Any  # ExperimentHandle
    best_before: float | None = None
    prune_reason: str | None = None
    seen_running: bool = False


@dataclass
class _Loop:
    config: LoopConfig
    ledger: Ledger
    endpoints: Any
    flow_run_id: str
    poll_interval: float
    resumed: bool = False
    proposer: Any = None  # default: the config's
    code: Any = None  # LoopCode, for loops whose hypotheses edit code
    history: list[ExperimentRecord] = field(default_factory=list)
    stop_reason: str | None = None
    cancelled: bool = False  # its flow run was cancelled from outside (the Prefect UI)
    _alive_at: float = 0.0

    def __post_init__(self) -> None:
        from prefect.logging.loggers import PrefectLogAdapter, get_logger

        self.log = PrefectLogAdapter(get_logger("flow_runs.loop"), extra={
            "flow_run_id": self.flow_run_id, "flow_run_name": "", "flow_name": LOOP_FLOW_NAME})
        self.mlflow = self.ledger.mlflow
        self.rule = self.config.create_pruning_rule()
        self.metric = self.config.metric

    def say(self, message: str, *args: Any, level: int = logging.INFO) -> None:
        self.log.log(level, message, *args)

    # -- the cycle loop ---------------------------------------------------------------------------

    def run(self) -> LoopResult:
        config = self.config
        proposer = self.proposer or config.create_proposer()
        started = self.ledger.started_at()
        try:
            pending = self._rebuild() if self.resumed else []
            if pending:
                self._wait(pending)
            if not self.stop_reason and not self.history:
                self._baseline()
            while not self.stop_reason:
                reason = config.stop_reason(self.history, elapsed_s=time.time() - started)
                if not reason and self._cancel_requested():
                    reason, self.cancelled = "stopped", True
                if not reason and self.ledger.stop_requested():
                    reason = "stopped"
                if reason:
                    self.stop_reason = reason
                    break
                cycle = max((r.cycle for r in self.history), default=0) + 1
                best = config.best(self.history)
                self.say("[loop] Cycle %d — best: %s", cycle, config.format_value(best.value if best else None))
                n = min(config.parallel, config.budget_left(self.history))
                hypotheses = proposer.propose(tuple(self.history), n)[:n]
                _checkpoint("proposed", cycle=cycle, hypotheses=hypotheses)
                if not hypotheses:
                    self.stop_reason = config.stop_reason(self.history, proposer_exhausted=True) or "proposer_exhausted"
                    why = proposer.why_exhausted() if self.stop_reason == "proposer_exhausted" else None
                    if why:
                        self.say("[loop] The proposer has nothing to run: %s", why, level=logging.WARNING)
                        self.ledger.set_tags(**{TAG_REASON_DETAIL: why[:5000]})
                    break
                children = [c for c in (self._submit(cycle, slot, h) for slot, h in enumerate(hypotheses)) if c]
                self._wait(children)
                _checkpoint("cycle_done", cycle=cycle)
        except MetricNeverPrinted as exc:
            self.say("[loop] Stopped: %s", exc, level=logging.ERROR)
            self._finish("failed", None, error=str(exc), error_kind=type(exc).__name__)
            raise
        except BaseException as exc:  # the parent is going away: its children must not run on unobserved
            self._cancel_running(f"its loop ended: {type(exc).__name__}")
            try:
                self.ledger.finish("failed", None, config.best(self.history), error=f"{type(exc).__name__}: {exc}",
                                   error_kind=type(exc).__name__)
            except Exception:
                pass
            raise
        finally:
            proposer.close()
        return self._finish("stopped" if self.stop_reason == "stopped" else "finished", self.stop_reason)

    def _rebuild(self) -> list[_Child]:
        """The history from the ledger; running children re-attached (or resubmitted if never created)."""
        records = self.ledger.records(curves=True, metric=self.metric)
        self.history = [r for r in records if r.outcome != "running"]
        pending = []
        for record in (r for r in records if r.outcome == "running"):
            handle = self._find_child(record)
            if handle is None:  # the parent died between the MLflow run and the flow run: never ran
                self.mlflow.delete_run(record.mlflow_run_id)
                self.say("[loop] Resume: %s was never started; submitting it now", record.exp_id)
                child = self._submit(record.cycle, record.slot, record.hypothesis, overrides=record.overrides)
                if child:
                    pending.append(child)
                continue
            record = record.model_copy(update={"flow_run_id": handle.flow_run_id})
            self.history.append(record)
            pending.append(_Child(record, handle, best_before=self._best_value(exclude=record)))
            self.say("[loop] Resume: re-attached %s (flow run %s)", record.exp_id, handle.flow_run_name)
        self.history.sort(key=lambda r: (r.cycle, r.slot))
        done = sum(1 for r in self.history if r.finished)
        self.say("[loop] Resumed %s: %d experiments recorded, %d running", self.config.name, done, len(pending))
        return pending

    def _find_child(self, record: ExperimentRecord):
        from cq_prefect.submission import ExperimentHandle

        flow_run_id = record.flow_run_id
        name = record.exp_id
        if not flow_run_id:
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, FlowRunFilterTags

            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=[record.exp_id]),
                    tags=FlowRunFilterTags(all_=[f"{TAG_LEDGER}={self.ledger.run_id}"])), limit=1)
            if not runs:
                return None
            flow_run_id, name = str(runs[0].id), runs[0].name
        return ExperimentHandle(flow_run_id, name, record.exp_id, record.mlflow_run_id, self.endpoints)

    def _baseline(self) -> None:
        self.say("[loop] %s: goal %s (%s %s, target %s), budget %d", self.config.name, self.config.goal or "–",
                 self.config.direction, self.metric, self.config.format_value(self.config.target), self.config.budget)
        child = self._submit(0, 0, BASELINE)
        if child:
            self._wait([child])

    # -- submitting ---------------------------------------------------------------------------------

    def _submit(self, cycle: int, slot: int, hypothesis: Hypothesis, overrides=None) -> _Child | None:
        config = self.config
        exp_id = config.exp_id(cycle, slot)
        kept = config.kept_changes(self.history)
        changes = [*kept, hypothesis.change]
        if hypothesis is not BASELINE:
            self.say("Hypothesis: %s%s", hypothesis.title, f" — {hypothesis.rationale}" if hypothesis.rationale else "")
        try:
            if overrides is not None:
                spec = config.experiment.spec(name=exp_id, exp_id=exp_id, changes=[overrides],
                                              tags=[f"{TAG_LEDGER}={self.ledger.run_id}"], mlflow_experiment=config.name)
            else:
                spec = config.experiment.spec(name=exp_id, exp_id=exp_id, changes=changes,
                                              tags=[f"{TAG_LEDGER}={self.ledger.run_id}"], mlflow_experiment=config.name)
        except OverrideError as exc:
            self._crash_unsubmitted(exp_id, cycle, slot, hypothesis, f"the change does not fit the command: {exc}")
            return None
        commit = branch = None
        if self.code is not None:
            from cq_prefect.code_changes import EditFailed, EditRejected
            from cq_prefect.errors import CqError

            try:
                prepared = self.code.prepare(exp_id, hypothesis, self.history)
            except (EditFailed, EditRejected) as exc:
                self._crash_unsubmitted(exp_id, cycle, slot, hypothesis, f"its code edits could not be applied: {exc}")
                return None
            except CqError as exc:  # git itself failed (a full disk, a lock): this experiment, not the loop
                self._crash_unsubmitted(exp_id, cycle, slot, hypothesis, f"its branch could not be made: {exc}")
                return None
            spec = spec.model_copy(update={"workdir": str(prepared.checkout.workdir), "source": prepared.source})
            commit, branch = prepared.commit, prepared.branch
            self.say("Code: %s at %s%s", branch, commit[:12],
                     f" ({', '.join(prepared.checkout.changed)} changed)" if prepared.checkout.changed else "")
        record = ExperimentRecord(exp_id=exp_id, cycle=cycle, slot=slot, hypothesis=hypothesis, outcome="running",
                                  overrides=spec.params, commit=commit, branch=branch)
        handle = _submit_task.with_options(task_run_name=f"c{cycle}-s{slot}: {hypothesis.title}"[:120])(
            self, spec, record)
        record = record.model_copy(update={"flow_run_id": handle.flow_run_id, "mlflow_run_id": handle.mlflow_run_id})
        self.history.append(record)
        _checkpoint("submitted", exp_id=exp_id, flow_run_id=handle.flow_run_id)
        self.say("Execute: submit %s", exp_id)
        return _Child(record, handle, best_before=self._best_value())

    def _crash_unsubmitted(self, exp_id, cycle, slot, hypothesis, message) -> None:
        record = ExperimentRecord(exp_id=exp_id, cycle=cycle, slot=slot, hypothesis=hypothesis, outcome="crashed",
                                  message=message)
        self.history.append(record)
        self.say("Result: %s crashed — %s", exp_id, message, level=logging.WARNING)

    def _best_value(self, exclude: ExperimentRecord | None = None) -> float | None:
        best = self.config.best([r for r in self.history if r is not exclude])
        return best.value if best else None

    # -- waiting, pruning, recording ------------------------------------------------------------------

    def _wait(self, children: list[_Child]) -> None:
        """Poll the children until each has ended and is recorded; prune bad ones; honour a stop request."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        pending = {c.record.exp_id: c for c in children}
        waiting_since = time.monotonic()
        with get_client(sync_client=True) as client:
            while pending:
                self._keep_alive()
                # the children's states and this run's own (Cancelling: cancelled in the Prefect UI) in one read
                ids = [uuid.UUID(c.handle.flow_run_id) for c in pending.values()] + [uuid.UUID(self.flow_run_id)]
                states = {str(r.id): (r.state.type.value if r.state else "SCHEDULED") for r in
                          client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))}
                cancelled = states.get(self.flow_run_id) in ("CANCELLING", "CANCELLED")
                self.cancelled = self.cancelled or cancelled
                if self.stop_reason != "stopped" and (cancelled or self.ledger.stop_requested()):
                    self.stop_reason = "stopped"
                    self.say("[loop] %s: cancelling %d running experiment(s)",
                             "Flow run cancelled" if cancelled else "Stop requested", len(pending))
                    for child in pending.values():
                        child.prune_reason = child.prune_reason or "stopped"
                        _cancel(client, child.handle.flow_run_id, "its research loop was stopped")
                for exp_id, child in list(pending.items()):
                    state = states.get(child.handle.flow_run_id, "SCHEDULED")
                    if state in TERMINAL:
                        _checkpoint("child_finished", exp_id=exp_id)
                        self._record(child)
                        del pending[exp_id]
                        _checkpoint("recorded", exp_id=exp_id)
                    elif state in ("PENDING", "RUNNING"):  # a cq-gpu worker starts the command at claim
                        if state == "RUNNING" and not child.seen_running:
                            child.seen_running = True
                            _checkpoint("child_running", exp_id=exp_id)
                        if child.prune_reason is None and self._should_prune(child):
                            _cancel(client, child.handle.flow_run_id, "pruned by its research loop")
                if pending:  # quick children are seen at once; long ones are looked at up to once a second
                    time.sleep(min(1.0, max(self.poll_interval, (time.monotonic() - waiting_since) / 30)))

    def _cancel_requested(self) -> bool:
        """Whether this loop's flow run was cancelled from outside (the Prefect UI, ``prefect flow-run cancel``).

        A worker that runs the loop kills it then; a loop that ``cq loop start`` runs itself has no worker
        watching, so it looks for itself."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(uuid.UUID(self.flow_run_id)).state
        except Exception:
            return False  # the server is away for a moment: look again next cycle
        return state is not None and state.type.value in ("CANCELLING", "CANCELLED")

    def _should_prune(self, child: _Child) -> bool:
        from cq_prefect.pruning import NoPruning

        if isinstance(self.rule, NoPruning) or not child.record.mlflow_run_id:
            return False
        try:
            curve = read_curve(self.mlflow, child.record.mlflow_run_id, self.metric)
        except Exception:
            return False  # MLflow away for a moment: judge on the next poll
        finished = [r.curve for r in self.history if r.outcome in ("kept", "discarded") and r.curve]
        if curve and self.rule.should_prune(curve, finished, self.config.direction):
            step, value = curve[-1]
            child.prune_reason = (f"@{self.metric}={self.config.format_value(value)} at step {step} is worse than "
                                  f"the finished experiments ({self.rule!r})")
            self.say("Prune: %s — %s", child.record.exp_id, child.prune_reason)
            return True
        return False

    def _record(self, child: _Child) -> None:
        config = self.config
        result = child.handle.result()
        curve: tuple = ()
        if child.record.mlflow_run_id:
            try:
                curve = read_curve(self.mlflow, child.record.mlflow_run_id, self.metric)
            except Exception:
                curve = ()
        value = result.metric(self.metric, config.metric_strategy) if result.outcome == "success" else (
            curve[-1][1] if curve else None)
        best = self._best_value(exclude=child.record)
        message = None
        if child.prune_reason == "stopped":
            outcome, message = "crashed", "cancelled: the loop was stopped"
        elif child.prune_reason:
            outcome, message = "pruned", child.prune_reason
        elif result.outcome != "success":
            outcome = "crashed"
            message = (f"exited with code {result.exit_code}" if result.exit_code not in (None, 0) else result.outcome)
            if result.message:
                message += f": {result.message.splitlines()[0][:300]}"
        else:
            outcome = config.judge(value, best)
            if outcome == "no_metric":
                message = (f"metric {self.metric!r} was never printed" if self.metric not in result.metrics
                           else f"metric {self.metric!r} is NaN")
        record = child.record.model_copy(update={
            "outcome": outcome, "value": value, "curve": curve, "message": message,
            "flow_run_id": child.handle.flow_run_id})
        delta = config.improvement(value, best) if outcome in ("kept", "discarded") and best is not None else None
        self.ledger.record(record, delta)
        self.history = [record if r.exp_id == record.exp_id else r for r in self.history]
        if outcome == "kept":
            self.ledger.set_tags(**{TAG_BEST: value, TAG_BEST_EXP: record.exp_id})
        if self.code is not None:
            try:
                self.code.recorded(record)
            except Exception as exc:  # noqa: BLE001 — the ledger has the outcome; the end sets the best branch again
                self.say("[loop] Code: %s: %s", record.exp_id, exc, level=logging.WARNING)
        self._say_result(record, best, delta)
        self._publish_cycle()
        if record.cycle == 0 and outcome == "no_metric" and self.metric not in result.metrics:
            raise MetricNeverPrinted(self.metric)

    def _say_result(self, record: ExperimentRecord, best: float | None, delta: float | None) -> None:
        fmt = self.config.format_value
        if record.outcome in ("kept", "discarded"):
            if best is None:
                detail = "baseline" if record.cycle == 0 else "first result"
            elif record.outcome == "kept":
                detail = f"improvement: {fmt(delta)}"
            else:
                detail = f"no improvement: {fmt(-delta) if delta is not None else '–'} worse than {fmt(best)}; discarded"
            self.say("Result: @%s=%s (%s)", self.metric, fmt(record.value), detail)
            if self.config.reached(record.value):
                self.say("[loop] %s=%s reaches the target %s — goal reached.", self.metric, fmt(record.value),
                         fmt(self.config.target))
        else:
            self.say("Result: %s %s — %s", record.exp_id, record.outcome, record.message or "", level=logging.WARNING)

    def _keep_alive(self) -> None:
        now = time.time()
        if now - self._alive_at >= ALIVE_SECONDS:
            self._alive_at = now
            try:
                from cq_prefect.ledger import TAG_ALIVE_AT

                self.ledger.set_tags(**{TAG_ALIVE_AT: f"{now:.3f}"})
            except Exception:
                pass  # a missed beat is what the staleness window is for

    def _cancel_running(self, why: str) -> None:
        running = [r for r in self.history if r.outcome == "running" and r.flow_run_id]
        if not running:
            return
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                for record in running:
                    _cancel(client, record.flow_run_id, why)
        except Exception:
            pass  # the server cancels children of a cancelled parent as well

    # -- the end ----------------------------------------------------------------------------------------

    def _finish(self, status: str, reason: str | None, error: str | None = None,
                error_kind: str | None = None) -> LoopResult:
        config = self.config
        best = config.best(self.history)
        git = self._finish_code()
        self.ledger.finish(status, reason, best, error=error, error_kind=error_kind)
        fmt = config.format_value
        if reason:
            self.say("[loop] Finished: %s — best %s%s after %d experiments", reason, fmt(best.value if best else None),
                     f" ({best.exp_id})" if best else "", len(self.history))
        result = LoopResult(
            name=config.name, status=status, reason=reason, best=best.value if best else None,
            best_exp_id=best.exp_id if best else None, target=config.target, budget=config.budget,
            flow_run_id=self.flow_run_id, mlflow_run_id=self.ledger.run_id, experiments=self.history,
            best_branch=git.get("best_branch"), merged=git.get("merged") or None,
        )
        self._publish_cycle(final=True)
        _plot(self.mlflow, self.ledger.run_id, config, self.history)
        _emit(result, self.flow_run_id)
        return result

    def _finish_code(self) -> dict[str, str]:
        """A code loop's branches at the end: the best named (and merged, pruned as configured)."""
        if self.code is None:
            return {}
        try:
            git = self.code.finish(self.history)
        except Exception as exc:  # noqa: BLE001 — git trouble must not lose the loop's results
            self.say("[loop] Code: could not finish the branches: %s", exc, level=logging.WARNING)
            return {}
        self.ledger.set_git_end(git)
        start = self.code.repo.start_branch or self.code.repo.start_commit[:12]
        self.say("[loop] Code: the best code is branch %s (%s)", git["best_branch"], git["best_commit"][:12])
        if git.get("merged"):
            self.say("[loop] Code: merged %s into %s (now %s)", git["best_branch"], start, git["merged"][:12])
        elif "merged" in git:
            self.say("[loop] Code: nothing to merge into %s: no experiment improved on it", start)
        if git.get("merge_error"):
            self.say("[loop] Code: %s was not merged: %s", git["best_branch"], git["merge_error"], level=logging.WARNING)
        if git.get("pruned"):
            self.say("[loop] Code: deleted %s branches of experiments that were not kept", git["pruned"])
        return git

    def _publish_cycle(self, final: bool = False) -> None:
        _publish(self.config, self.history, self.stop_reason if final else None)


def _submit_experiment(loop: _Loop, spec, record: ExperimentRecord):
    """The body of a slot's task: submit the child run (a subflow of this task) with its ledger tags."""
    from prefect.context import TaskRunContext

    from cq_prefect.submission import submit

    task_run = TaskRunContext.get().task_run
    return submit(spec, pool=loop.config.experiment.pool, endpoints=loop.endpoints,
                  mlflow_tags=loop.ledger.child_tags(record), parent_task_run_id=task_run.id)


def _make_submit_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(_submit_experiment, name="loop-experiment", persist_result=False, log_prints=False, retries=0,
                cache_policy=NO_CACHE)


_submit_task = _make_submit_task()


def _cancel(client, flow_run_id: str, why: str) -> None:
    """Ask the child's worker to stop it (Cancelling): its process tree is killed, its GPUs freed."""
    from prefect.states import Cancelling

    try:
        client.set_flow_run_state(uuid.UUID(flow_run_id), Cancelling(message=why), force=True)
    except Exception:
        pass  # already final, or the server is away: the next poll sees its state


# -- reports ----------------------------------------------------------------------------------------


def results_table(config: LoopConfig, history: list[ExperimentRecord]) -> list[dict[str, str]]:
    """The seed's Results table: Experiment | Change | metric | Outcome | Δ, one row per experiment."""
    rows = []
    for record in history:
        change = ", ".join(f"{k}={v}" for k, v in record.change.items()) or "–"
        rows.append({
            "Experiment": record.exp_id, "Cycle": str(record.cycle),
            "Change": record.hypothesis.title + ("" if record.hypothesis is BASELINE or change == "–" else f" ({change})"),
            config.metric: config.format_value(record.value), "Outcome": record.outcome,
        })
    return rows


def summary_markdown(config: LoopConfig, history: list[ExperimentRecord], reason: str | None) -> str:
    best = config.best(history)
    rows = results_table(config, history)
    header = ["Experiment", "Change", config.metric, "Outcome"]
    lines = [
        f"# Research loop {config.name}", "",
        f"Goal: {config.goal or '–'} — {config.direction} `{config.metric}`, target {config.format_value(config.target)}",
        f"Best: **{config.format_value(best.value if best else None)}**" + (f" ({best.exp_id})" if best else ""),
        f"Experiments: {len(history)} of {config.budget}; failures {config.failures(history)} of {config.max_failures}",
        f"Status: {'finished: ' + reason if reason else 'running'}",
        *([f"Code: every experiment on its branch cq/{config.name}/<exp>; the best code is "
           f"`cq/{config.name}/best`" + (f" ({best.exp_id}, {best.commit[:12]})" if best and best.commit else "")]
          if any(r.branch for r in history) else []), "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row[h].replace("|", "\\|") for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _artifact_key(name: str) -> str:
    return ("loop-" + "".join(c if c.isalnum() else "-" for c in name.lower()))[:90]


def _publish(config: LoopConfig, history: list[ExperimentRecord], reason: str | None) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = _artifact_key(config.name)
    try:
        create_table_artifact(results_table(config, history), key=key, description=f"Research loop {config.name}: results")
        create_markdown_artifact(summary_markdown(config, history, reason), key=f"{key}-summary",
                                 description=f"Research loop {config.name}: summary")
    except Exception:
        pass  # the UI report must never stop the loop


def _plot(mlflow, run_id: str, config: LoopConfig, history: list[ExperimentRecord]) -> None:
    """An MLflow PNG on the parent run: the metric per experiment, the best so far, the target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return
    points = [(i, r) for i, r in enumerate(history) if r.value is not None and math.isfinite(r.value)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        colors = {"kept": "tab:green", "discarded": "tab:gray", "pruned": "tab:orange"}
        for outcome, color in colors.items():
            chosen = [(i, r.value) for i, r in points if r.outcome == outcome]
            if chosen:
                ax.scatter([i for i, _ in chosen], [v for _, v in chosen], color=color, label=outcome, zorder=3)
        best, line = None, []
        for i, record in enumerate(history):
            if record.outcome in ("kept", "discarded") and config.is_better(record.value, best):
                best = record.value
            line.append(best)
        xs = [i for i, v in enumerate(line) if v is not None]
        ax.step(xs, [line[i] for i in xs], where="post", color="tab:blue", label="best so far")
        ax.axhline(config.target, color="tab:red", linestyle="--", label=f"target {config.format_value(config.target)}")
        ax.set_xticks(range(len(history)))
        ax.set_xticklabels([r.exp_id.removeprefix(config.name + "-") for r in history], rotation=45, fontsize=7)
        ax.set_ylabel(config.metric + (f" ({config.unit})" if config.unit else ""))
        ax.set_title(f"{config.name}: {config.goal or config.metric}")
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        mlflow.log_figure(run_id, fig, PLOT_ARTIFACT)
    except Exception:
        pass  # a plot is a report, never a reason to fail the loop
    finally:
        plt.close(fig)


def _emit(result: LoopResult, flow_run_id: str) -> None:
    """Prefect events with the loop as resource: cq.loop.goal-reached (when it was) and cq.loop.finished."""
    from prefect.events import emit_event

    resource = {"prefect.resource.id": f"cq.loop.{result.name}", "prefect.resource.name": result.name,
                "cq.loop.reason": result.reason or "", "cq.loop.status": result.status}
    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
    payload = {"reason": result.reason, "best": result.best, "best_exp_id": result.best_exp_id,
               "target": result.target, "experiments": len(result.experiments), "mlflow_run_id": result.mlflow_run_id}
    payload = tracking.json_safe(payload)
    try:
        if result.reason == "goal_reached":
            emit_event(EVENT_GOAL_REACHED, resource=resource, related=related, payload=payload)
        emit_event(EVENT_FINISHED, resource=resource, related=related, payload=payload)
    except Exception:
        pass  # events are notifications; the ledger holds the result
