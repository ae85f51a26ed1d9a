"""Closing the books of crashed experiments: their MLflow runs end FAILED, with every point printed.

When an experiment's process dies outright, the crash automation (:mod:`cq_prefect.crash`) sets its flow
run Crashed, but nobody is left to end its MLflow run: it would show RUNNING forever, and the points the
dead process had journaled but not yet sent (:mod:`cq_prefect.mlflow_sink`) would sit on its host.
:func:`reap` finds Crashed experiment runs whose MLflow run is still open, replays the run's local journal
(when this host has one), then tags the MLflow run ``cq.outcome=crashed`` and ``cq.crash_reason=<the
Crashed state's message>`` and ends it FAILED at the time of the crash.

Workers call it every few seconds, so it is cheap when there is nothing to do: one Prefect query, and
MLflow is not even imported until a Crashed run is found whose MLflow run this process has not already
seen closed.

    >>> from cq_prefect.reaper import reap
    >>> reap("gpu")                                   # doctest: +SKIP
    [Reaped(flow_run_name='exp-044', mlflow_run_id='5f0c…', replayed=True, reason='No cq.experiment.heartbeat …')]
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cq_prefect import tracking
from cq_prefect.crash import EXPERIMENT_FLOW_NAME

logger = logging.getLogger("cq.reaper")

TAG_CRASH_REASON = "cq.crash_reason"
RECENT = timedelta(days=7)  # Crashed runs older than this are left alone
PAGE_SIZE = 200  # Crashed runs looked at per call, most recently ended first
REPLAY_TIMEOUT = 10.0
OPEN_STATUSES = {"RUNNING", "SCHEDULED"}
MAX_TAG_CHARS = 5000

# Flow runs whose MLflow run this process has seen closed: later calls skip them without asking MLflow.
_settled: collections.OrderedDict[str, None] = collections.OrderedDict()
_settled_lock = threading.Lock()
SETTLED_MAX = 10_000


@dataclass(frozen=True)
class Reaped:
    """One crashed experiment whose MLflow run :func:`reap` ended."""

    flow_run_id: str
    flow_run_name: str
    mlflow_run_id: str
    reason: str
    replayed: bool  # this host held a journal of the run and MLflow now has its points


def reap(
    pool: str | None = None,
    client=None,
    *,
    tracking_uri: str | None = None,
    spool_dir: Path | None = None,
    since: timedelta = RECENT,
    limit: int = PAGE_SIZE,
) -> list[Reaped]:
    """End the MLflow runs of Crashed experiment flow runs (of work pool ``pool``, or all); returns them.

    Idempotent. A run is skipped (and tried again next call) while MLflow does not answer or does not
    take its replayed points, or while a live process on this host still writes its journal (then its
    process is not dead). Errors reaching Prefect propagate; MLflow errors are logged.
    """
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        logger.warning("MLFLOW_TRACKING_URI is not set: crashed experiments' MLflow runs cannot be closed here")
        return []
    if client is None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return reap(pool, client, tracking_uri=tracking_uri, spool_dir=spool_dir, since=since, limit=limit)

    crashed = [run for run in _crashed_runs(client, pool, since, limit) if not _is_settled(str(run.id))]
    if not crashed:
        return []
    mlflow = _MlflowRuns(tracking_uri)
    reaped: list[Reaped] = []
    failures = 0
    for flow_run in crashed:
        flow_run_id = str(flow_run.id)
        try:
            done = _close(flow_run, mlflow, tracking_uri, spool_dir)
        except Exception as exc:  # MLflow away or refusing: try again next call
            logger.warning("Could not close the MLflow run of crashed experiment %s yet: %s", flow_run.name, exc)
            failures += 1
            if failures == 2:  # MLflow does not answer: leave the rest for the next call
                break
            continue
        failures = 0
        if done is None:
            continue
        _settle(flow_run_id)
        if isinstance(done, Reaped):
            reaped.append(done)
            logger.info(
                "Crashed experiment %s (flow run %s): MLflow run %s ended FAILED%s — %s",
                done.flow_run_name, flow_run_id, done.mlflow_run_id,
                " after replaying its journal" if done.replayed else "", done.reason,
            )
    return reaped


def _crashed_runs(client, pool: str | None, since: timedelta, limit: int) -> list[Any]:
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterEndTime, FlowRunFilterState,
        FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[EXPERIMENT_FLOW_NAME])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CRASHED])),
            end_time=FlowRunFilterEndTime(after_=datetime.now(timezone.utc) - since),
        ),
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])) if pool else None,
        sort=FlowRunSort.END_TIME_DESC,
        limit=limit,
    )


def _close(flow_run, mlflow: _MlflowRuns, tracking_uri: str, spool_dir: Path | None) -> Reaped | bool | None:
    """Reaped when this call ended the MLflow run; True when there is nothing (more) to do here; None when
    it must wait (a live process holds the run's journal, or MLflow did not take the replayed points).

    The run's journal is replayed even when another host's reaper closed the MLflow run already: the
    process may have died on this host.
    """
    from cq_prefect.mlflow_sink import journal_paths, replay_spool

    flow_run_id = str(flow_run.id)
    run_id = (flow_run.parameters or {}).get("mlflow_run_id") or mlflow.find(flow_run_id)
    if not run_id:
        return True  # died before it made an MLflow run
    status = mlflow.status(run_id)
    if status is None:
        return True  # the MLflow run was deleted
    had_journal = bool(journal_paths(run_id, spool_dir))
    if had_journal:
        replayed = replay_spool(run_id, tracking_uri, spool_dir, timeout=REPLAY_TIMEOUT)
        if replayed is None:
            logger.warning(
                "Experiment %s is Crashed, but a live process on this host still writes its metrics journal; "
                "leaving its MLflow run as it is", flow_run.name,
            )
            return None
        if replayed is False:
            logger.warning("MLflow did not take the journaled points of crashed experiment %s yet", flow_run.name)
            return None
    if status not in OPEN_STATUSES:
        return True
    state = flow_run.state
    reason = (state.message if state and state.message else f"flow run {flow_run.name} is Crashed")[:MAX_TAG_CHARS]
    ended = state.timestamp if state and state.timestamp else datetime.now(timezone.utc)
    mlflow.end_failed(run_id, {tracking.TAG_OUTCOME: "crashed", TAG_CRASH_REASON: reason}, int(ended.timestamp() * 1000))
    return Reaped(flow_run_id, flow_run.name, run_id, reason, replayed=had_journal)


def _is_settled(flow_run_id: str) -> bool:
    with _settled_lock:
        return flow_run_id in _settled


def _settle(flow_run_id: str) -> None:
    with _settled_lock:
        _settled[flow_run_id] = None
        while len(_settled) > SETTLED_MAX:
            _settled.popitem(last=False)


class _MlflowRuns:
    """The MLflow calls of the reaper, one attempt each with a short timeout: a worker calls reap on a
    timer, and MLflow's client would retry an unreachable server for minutes."""

    def __init__(self, tracking_uri: str, timeout: float = 10.0):
        self._uri = tracking_uri
        self._timeout = timeout
        self._rest = tracking_uri.startswith(("http://", "https://"))
        if self._rest:
            from mlflow.utils.credentials import get_default_host_creds

            self._creds = get_default_host_creds(tracking_uri.rstrip("/"))

    def _call(self, endpoint: str, method: str, **kwargs) -> dict:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        response = http_request(
            self._creds, endpoint, method, max_retries=0, backoff_factor=0, timeout=self._timeout, **kwargs
        )
        verify_rest_response(response, endpoint)
        return response.json()

    def status(self, run_id: str) -> str | None:
        """RUNNING, SCHEDULED, FINISHED, FAILED or KILLED; None for a run that is gone or deleted."""
        from mlflow.exceptions import MlflowException

        try:
            if self._rest:
                info = self._call("/api/2.0/mlflow/runs/get", "GET", params={"run_id": run_id})["run"]["info"]
                status, stage = info.get("status"), info.get("lifecycle_stage")
            else:
                info = tracking.client(self._uri).get_run(run_id).info
                status, stage = info.status, info.lifecycle_stage
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if stage == "deleted" else status

    def end_failed(self, run_id: str, tags: dict[str, str], end_time_ms: int) -> None:
        if not self._rest:
            from mlflow.entities import RunTag

            client = tracking.client(self._uri)
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            client.set_terminated(run_id, status="FAILED", end_time=end_time_ms)
            return
        self._call(
            "/api/2.0/mlflow/runs/log-batch", "POST",
            json={"run_id": run_id, "tags": [{"key": k, "value": v} for k, v in tags.items()]},
        )
        self._call(
            "/api/2.0/mlflow/runs/update", "POST", json={"run_id": run_id, "status": "FAILED", "end_time": end_time_ms}
        )

    def find(self, flow_run_id: str) -> str | None:
        """The MLflow run tagged with the flow run (runs started without ``cq submit``'s run id)."""
        found = tracking.find_run(tracking.client(self._uri), tracking.TAG_FLOW_RUN_ID, flow_run_id)
        return found.info.run_id if found else None
