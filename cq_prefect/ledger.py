"""A research loop's ledger in MLflow: one parent run per loop, one nested run per experiment.

    >>> ledger = Ledger.latest(mlflow, "pose-mpjpe")                 # doctest: +SKIP
    >>> [(r.exp_id, r.outcome, r.value) for r in ledger.records()]   # doctest: +SKIP
    [('pose-mpjpe-c0-s0', 'kept', 21.43), ('pose-mpjpe-c1-s0', 'kept', 19.87)]

The parent run (in the MLflow experiment named after the loop) holds the config as params and as the
artifact ``loop_config.json`` (what ``cq loop resume`` runs again), and the loop's state as tags:
``cq.loop.status`` (running | finished | failed | stopped), ``cq.loop.reason``, ``cq.loop.best``,
``cq.loop.best_exp_id``, ``cq.loop.target``, ``cq.loop.budget``, the parent flow run
(``cq.prefect.flow_run_id``) and where its process lives (``cq.loop.host``, ``cq.loop.pid``,
``cq.loop.alive_at``). Each experiment's own MLflow run is nested under it (``mlflow.parentRunId``) and
tagged with its cycle, slot, hypothesis, rationale, change, overrides, outcome, value and delta against
the best before it. ``cq.loop.outcome=running`` marks an experiment submitted but not yet recorded: a
resumed loop re-attaches it. The ledger is the loop's only state: a loop rebuilt from it behaves as the
original would have.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from cq_prefect import tracking
from cq_prefect.errors import UnknownRun
from cq_prefect.records import ExperimentRecord, Hypothesis

TAG_KIND = "cq.kind"
TAG_LOOP = "cq.loop.name"
TAG_LEDGER = "cq.loop.ledger"  # on nested runs: the parent run id (also a Prefect flow-run tag `cq.loop.ledger=…`)
TAG_STATUS = "cq.loop.status"
TAG_REASON = "cq.loop.reason"
TAG_ERROR = "cq.loop.error"
TAG_REASON_DETAIL = "cq.loop.reason_detail"  # why the proposer had nothing (e.g. Claude failed, no fallback)
TAG_ERROR_KIND = "cq.loop.error_kind"  # the exception class that ended the loop (MetricNeverPrinted → exit 2)
TAG_BEST = "cq.loop.best"
TAG_BEST_EXP = "cq.loop.best_exp_id"
TAG_TARGET = "cq.loop.target"
TAG_BUDGET = "cq.loop.budget"
TAG_STARTED_AT = "cq.loop.started_at"
TAG_HOST = "cq.loop.host"
TAG_PID = "cq.loop.pid"
TAG_ALIVE_AT = "cq.loop.alive_at"
TAG_STOP = "cq.loop.stop_requested"
TAG_CYCLE = "cq.loop.cycle"
TAG_SLOT = "cq.loop.slot"
TAG_HYPOTHESIS = "cq.loop.hypothesis"
TAG_RATIONALE = "cq.loop.rationale"
TAG_CHANGE = "cq.loop.change"
TAG_OVERRIDES = "cq.loop.overrides"
TAG_OUTCOME = "cq.loop.outcome"
TAG_VALUE = "cq.loop.value"
TAG_DELTA = "cq.loop.delta"
TAG_MESSAGE = "cq.loop.message"
TAG_COMMIT = "cq.loop.commit"  # code loops: the commit an experiment ran at, its branch and its edits
TAG_BRANCH = "cq.loop.branch"
TAG_EDITS = "cq.loop.edits"  # JSON [{path, old, new}] when it fits a tag; else the paths only
TAG_GIT_START_BRANCH = "cq.loop.git.start_branch"  # on the parent: where the loop started, its best branch
TAG_GIT_START_COMMIT = "cq.loop.git.start_commit"
TAG_GIT_BEST_BRANCH = "cq.loop.git.best_branch"
TAG_GIT_MERGED = "cq.loop.git.merged"
_TAG_LIMIT = 5000
CONFIG_ARTIFACT = "loop_config.json"
PLOT_ARTIFACT = "loop_progress.png"
ALIVE_SECONDS = 5.0  # how often a running parent refreshes cq.loop.alive_at
STALE_SECONDS = 30.0  # a parent on another host that has not refreshed it for this long is gone


def edits_tag(hypothesis: Hypothesis) -> str:
    """The ``cq.loop.edits`` tag: the edits as JSON when they fit an MLflow tag, else their paths (the full
    edits are in the commit of the experiment's branch)."""
    full = json.dumps([e.model_dump() for e in hypothesis.edits])
    if len(full) <= _TAG_LIMIT:
        return full
    return json.dumps([{"path": e.path} for e in hypothesis.edits])[:_TAG_LIMIT]


def edits_from_tag(text: str | None) -> tuple:
    """The edits back from ``cq.loop.edits``: whole ones; a path-only entry keeps the path, with old/new
    unknown (empty) — enough to show which files an experiment changed."""
    from cq_prefect.records import Edit

    if not text:
        return ()
    try:
        items = json.loads(text)
        return tuple(Edit(path=i["path"], old=i.get("old", ""), new=i.get("new", "")) for i in items)
    except (ValueError, KeyError, TypeError):
        return ()


@dataclass
class Ledger:
    """One loop's parent MLflow run, and reading and writing its records."""

    mlflow: Any
    run_id: str
    experiment_id: str
    name: str

    # -- finding and creating ---------------------------------------------------------------------

    @classmethod
    def create(cls, mlflow, config, flow_run_id: str, flow_run_name: str) -> Ledger:
        """A new ledger for ``config`` (params, config artifact, running status)."""
        from mlflow.entities import Param

        experiment_id = tracking.experiment_id(mlflow, config.name)
        tags = {
            TAG_KIND: "loop", TAG_LOOP: config.name, tracking.TAG_FLOW_RUN_ID: flow_run_id,
            tracking.TAG_FLOW_RUN_NAME: flow_run_name, TAG_STARTED_AT: f"{time.time():.3f}",
        }
        if config.goal:
            tags["mlflow.note.content"] = config.goal
        run = mlflow.create_run(experiment_id, run_name=f"{config.name} (loop)", tags=tags)
        ledger = cls(mlflow, run.info.run_id, experiment_id, config.name)
        params = [Param(k, v[:6000]) for k, v in config.mlflow_params().items()]
        for start in range(0, len(params), 100):
            mlflow.log_batch(ledger.run_id, params=params[start:start + 100])
        ledger.save_config(config)
        ledger.claim(flow_run_id, flow_run_name, config)
        return ledger

    @classmethod
    def latest(cls, mlflow, name: str) -> Ledger | None:
        """The newest ledger of loop ``name``, or None."""
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            return None
        runs = mlflow.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                                  filter_string=f"tags.`{TAG_KIND}` = 'loop' and tags.`{TAG_LOOP}` = '{_q(name)}'")
        return cls(mlflow, runs[0].info.run_id, experiment.experiment_id, name) if runs else None

    @classmethod
    def require(cls, mlflow, name: str) -> Ledger:
        ledger = cls.latest(mlflow, name)
        if ledger is None:
            raise UnknownRun(f"no loop named '{name}'; list loops with `cq loop status`, start one with `cq loop start`")
        return ledger

    @classmethod
    def of_flow_run(cls, mlflow, name: str, flow_run_id: str) -> Ledger | None:
        """The ledger whose parent flow run is ``flow_run_id`` (a Prefect retry of that flow run)."""
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            return None
        runs = mlflow.search_runs([experiment.experiment_id], max_results=1, filter_string=(
            f"tags.`{TAG_KIND}` = 'loop' and tags.`{tracking.TAG_FLOW_RUN_ID}` = '{flow_run_id}'"))
        return cls(mlflow, runs[0].info.run_id, experiment.experiment_id, name) if runs else None

    @classmethod
    def all(cls, mlflow) -> list[Any]:
        """Every loop's newest parent run (MLflow Run objects), newest first."""
        from mlflow.entities import ViewType

        ids = [e.experiment_id for e in mlflow.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        if not ids:
            return []
        runs = mlflow.search_runs(ids, filter_string=f"tags.`{TAG_KIND}` = 'loop'", max_results=1000,
                                  order_by=["attributes.start_time DESC"])
        seen, newest = set(), []
        for run in runs:
            name = run.data.tags.get(TAG_LOOP)
            if name not in seen:
                seen.add(name)
                newest.append(run)
        return newest

    # -- the parent run ---------------------------------------------------------------------------

    def tags(self) -> dict[str, str]:
        return dict(self.mlflow.get_run(self.run_id).data.tags)

    def set_tags(self, **tags: Any) -> None:
        from mlflow.entities import RunTag

        self.mlflow.log_batch(self.run_id, tags=[RunTag(k, "" if v is None else str(v)) for k, v in tags.items()])

    def claim(self, flow_run_id: str, flow_run_name: str, config) -> None:
        """Mark the ledger as run by this process (a new or resumed parent)."""
        self.set_tags(**{
            tracking.TAG_FLOW_RUN_ID: flow_run_id, tracking.TAG_FLOW_RUN_NAME: flow_run_name, TAG_STATUS: "running",
            TAG_REASON: "", TAG_REASON_DETAIL: "", TAG_ERROR: "", TAG_TARGET: config.target, TAG_BUDGET: config.budget,
            TAG_HOST: socket.gethostname(), TAG_PID: os.getpid(), TAG_ALIVE_AT: f"{time.time():.3f}", TAG_ERROR_KIND: "",
        })
        try:
            self.mlflow.delete_tag(self.run_id, TAG_STOP)
        except Exception:
            pass  # no stop was requested
        self.mlflow.update_run(self.run_id, status="RUNNING")

    def save_config(self, config) -> None:
        self.mlflow.log_text(self.run_id, config.model_dump_json(indent=2), CONFIG_ARTIFACT)

    def load_config(self):
        """The config the loop runs (``loop_config.json``), as a LoopConfig."""
        import tempfile
        from pathlib import Path

        from cq_prefect.loop_config import LoopConfig

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar in cq's output
        with tempfile.TemporaryDirectory() as folder:
            path = self.mlflow.download_artifacts(self.run_id, CONFIG_ARTIFACT, folder)
            return LoopConfig.parse(json.loads(Path(path).read_text()), source=f"loop {self.name}")

    def started_at(self, tags: dict[str, str] | None = None) -> float:
        tags = tags if tags is not None else self.tags()
        try:
            return float(tags.get(TAG_STARTED_AT) or 0) or time.time()
        except ValueError:
            return time.time()

    def stop_requested(self) -> bool:
        return bool(self.tags().get(TAG_STOP))

    def finish(self, status: str, reason: str | None, best: ExperimentRecord | None, error: str | None = None,
               error_kind: str | None = None) -> None:
        mlflow_status = {"finished": "FINISHED", "stopped": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        tags: dict[str, Any] = {TAG_STATUS: status, TAG_REASON: reason or ""}
        if error:
            tags[TAG_ERROR] = error[:5000]
            tags[TAG_ERROR_KIND] = error_kind or ""
        if best is not None:
            tags.update({TAG_BEST: best.value, TAG_BEST_EXP: best.exp_id})
        self.set_tags(**tags)
        self.mlflow.set_terminated(self.run_id, status=mlflow_status)

    def parent_alive(self, tags: dict[str, str] | None = None) -> bool:
        """Whether the process that runs this loop is alive: by its pid on this host, else by how recently
        it refreshed ``cq.loop.alive_at``."""
        from cq_prefect.stack import pid_alive

        tags = tags if tags is not None else self.tags()
        if tags.get(TAG_STATUS) != "running":
            return False
        if tags.get(TAG_HOST) == socket.gethostname() and tags.get(TAG_PID, "").isdigit():
            return pid_alive(int(tags[TAG_PID]))
        try:
            return time.time() - float(tags.get(TAG_ALIVE_AT) or 0) < STALE_SECONDS
        except ValueError:
            return False

    # -- experiments --------------------------------------------------------------------------------

    def git_start(self) -> dict[str, str]:
        """Where a code loop started: ``{"branch", "commit"}`` (empty for a loop that edits no code)."""
        tags = self.tags()
        return {"branch": tags.get(TAG_GIT_START_BRANCH, ""), "commit": tags.get(TAG_GIT_START_COMMIT, "")}

    def set_git_start(self, branch: str | None, commit: str, best_branch: str) -> None:
        self.set_tags(**{TAG_GIT_START_BRANCH: branch or "", TAG_GIT_START_COMMIT: commit,
                         TAG_GIT_BEST_BRANCH: best_branch})

    def set_git_end(self, git: dict[str, str]) -> None:
        """The end of a code loop: its best branch and commit, and the merge's result."""
        tags = {TAG_GIT_BEST_BRANCH: git.get("best_branch", ""), "cq.loop.git.best_commit": git.get("best_commit", "")}
        if git.get("merged"):
            tags[TAG_GIT_MERGED] = git["merged"]
        if git.get("merge_error"):
            tags["cq.loop.git.merge_error"] = git["merge_error"][:5000]
        self.set_tags(**tags)

    def child_tags(self, record: ExperimentRecord) -> dict[str, str]:
        """The tags a new experiment run starts with (nested under the parent, outcome ``running``)."""
        h = record.hypothesis
        return {
            "mlflow.parentRunId": self.run_id, TAG_LOOP: self.name, TAG_LEDGER: self.run_id,
            TAG_CYCLE: str(record.cycle), TAG_SLOT: str(record.slot), TAG_HYPOTHESIS: h.title[:5000],
            TAG_RATIONALE: h.rationale[:5000], TAG_CHANGE: json.dumps(dict(h.change), sort_keys=True),
            TAG_OVERRIDES: json.dumps(dict(record.overrides), sort_keys=True), TAG_OUTCOME: "running",
            **({TAG_COMMIT: record.commit} if record.commit else {}),
            **({TAG_BRANCH: record.branch} if record.branch else {}),
            **({TAG_EDITS: edits_tag(h)} if h.edits else {}),
        }

    def record(self, record: ExperimentRecord, delta: float | None = None) -> None:
        """Write an experiment's outcome onto its nested run."""
        if record.mlflow_run_id is None:
            return
        from mlflow.entities import RunTag

        tags = {TAG_OUTCOME: record.outcome, TAG_VALUE: "" if record.value is None else repr(record.value),
                TAG_MESSAGE: (record.message or "")[:5000]}
        if delta is not None:
            tags[TAG_DELTA] = repr(delta)
        if record.flow_run_id:
            tags[tracking.TAG_FLOW_RUN_ID] = record.flow_run_id
        self.mlflow.log_batch(record.mlflow_run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def records(self, *, curves: bool = False, metric: str | None = None) -> list[ExperimentRecord]:
        """The loop's experiments in (cycle, slot) order, ``running`` ones included; ``curves``: with the
        metric's points (for pruning, Optuna's pruned trials and the plot)."""
        runs = self.mlflow.search_runs([self.experiment_id], max_results=5000,
                                       filter_string=f"tags.`{TAG_LEDGER}` = '{self.run_id}'")
        records = []
        for run in runs:
            tags = run.data.tags
            if TAG_CYCLE not in tags:
                continue
            value = tags.get(TAG_VALUE)
            curve: tuple = ()
            if curves and metric and tags.get(TAG_OUTCOME) != "running":
                curve = read_curve(self.mlflow, run.info.run_id, metric)
            records.append(ExperimentRecord(
                exp_id=tags.get(tracking.TAG_EXP_ID) or run.info.run_name or run.info.run_id,
                cycle=int(tags[TAG_CYCLE]), slot=int(tags.get(TAG_SLOT, "0") or 0),
                hypothesis=Hypothesis(title=tags.get(TAG_HYPOTHESIS) or "?", rationale=tags.get(TAG_RATIONALE, ""),
                                      change=json.loads(tags.get(TAG_CHANGE) or "{}"),
                                      edits=edits_from_tag(tags.get(TAG_EDITS))),
                commit=tags.get(TAG_COMMIT) or None, branch=tags.get(TAG_BRANCH) or None,
                outcome=tags.get(TAG_OUTCOME) or "running",
                value=float(value) if value else None,
                overrides=json.loads(tags.get(TAG_OVERRIDES) or "{}"),
                curve=curve,
                flow_run_id=tags.get(tracking.TAG_FLOW_RUN_ID),
                mlflow_run_id=run.info.run_id,
                message=tags.get(TAG_MESSAGE) or None,
            ))
        records.sort(key=lambda r: (r.cycle, r.slot))
        return records


def read_curve(mlflow, run_id: str, metric: str) -> tuple[tuple[int, float], ...]:
    """The metric's ``(step, value)`` points of a run, in step order."""
    points = mlflow.get_metric_history(run_id, metric)
    points.sort(key=lambda m: (m.step, m.timestamp))
    return tuple((int(m.step), float(m.value)) for m in points)


def status_json(ledger: Ledger) -> dict[str, Any]:
    """``cq loop status LOOP --json``: name, status, reason, best, target, budget, experiments (and more)."""
    tags = ledger.tags()
    status = tags.get(TAG_STATUS, "running")
    if status == "running" and not ledger.parent_alive(tags):
        status = "crashed"  # the parent is gone: `cq loop resume` continues it
    records = ledger.records()
    try:
        budget = int(tags.get(TAG_BUDGET) or 0)
    except ValueError:
        budget = 0
    best = tags.get(TAG_BEST)
    best = float(best) if best else None
    target = tags.get(TAG_TARGET)
    return tracking.json_safe({
        "name": ledger.name,
        "status": status,
        "reason": tags.get(TAG_REASON) or None,
        **({"reason_detail": tags[TAG_REASON_DETAIL]} if tags.get(TAG_REASON_DETAIL) else {}),
        "best": best,
        "best_exp_id": tags.get(TAG_BEST_EXP) or None,
        "target": float(target) if target else None,
        "budget": budget,
        "budget_left": max(0, budget - len(records)),
        "cycles": max((r.cycle for r in records), default=0),
        "running": [r.exp_id for r in records if r.outcome == "running"],
        "error": tags.get(TAG_ERROR) or None,
        "flow_run_id": tags.get(tracking.TAG_FLOW_RUN_ID),
        "mlflow_run_id": ledger.run_id,
        "experiments": [
            {"exp_id": r.exp_id, "cycle": r.cycle, "hypothesis": r.hypothesis.title, "outcome": r.outcome,
             "value": r.value, "mlflow_run_id": r.mlflow_run_id, "flow_run_id": r.flow_run_id,
             **({"branch": r.branch, "commit": r.commit} if r.branch else {})}
            for r in records
        ],
        **({"best_branch": tags[TAG_GIT_BEST_BRANCH], "merged": tags.get(TAG_GIT_MERGED) or None}
           if tags.get(TAG_GIT_BEST_BRANCH) else {}),
    })


def _q(text: str) -> str:
    return text.replace("'", "\\'")




def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
