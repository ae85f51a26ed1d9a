"""Submitting experiments and following them: ``submit``, handles, ``watch`` and ``metrics``.

    >>> handle = submit(name="baseline", workdir="/work/pose", command="python train.py")  # doctest: +SKIP
    >>> handle.wait().metric("mpjpe")                                                     # doctest: +SKIP
    21.43
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from cq_prefect import tracking
from cq_prefect.errors import CqError, SpecError, UnknownRun
from cq_prefect.spec import ExperimentResult, ExperimentSpec
from cq_prefect.stack import Endpoints, StackConfig, connect, prefect_settings

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
PARENT_WAIT_SECONDS = 30.0  # the most a child's submission waits for its parent task run on the server


def make_spec(**fields: Any) -> ExperimentSpec:
    """Build and check a spec; every problem becomes one SpecError naming the field and the fix."""
    if isinstance(fields.get("workdir"), (str, Path)) and fields["workdir"]:
        fields["workdir"] = str(Path(fields["workdir"]).expanduser().absolute())
    try:
        return ExperimentSpec(**fields)
    except ValidationError as exc:
        raise SpecError(_describe(exc)) from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(ExperimentSpec.model_fields)
            problems.append(f"unknown field '{where}'; the spec's fields are: {allowed}")
        elif error["type"] == "missing":
            problems.append(f"'{where}' is required (e.g. --{where.replace('_', '-')} …)")
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
    return "invalid experiment spec: " + "; ".join(problems)


@dataclass
class ExperimentHandle:
    """A submitted experiment: ids to find it again, and ways to wait for it and read its metrics."""

    flow_run_id: str
    flow_run_name: str
    exp_id: str
    mlflow_run_id: str | None
    endpoints: Endpoints = field(repr=False)

    def as_json(self) -> dict[str, str | None]:
        return {
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "exp_id": self.exp_id,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def state(self) -> str:
        """The flow run's state type: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED…"""
        with prefect_settings(self.endpoints):
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(uuid.UUID(self.flow_run_id))
        return flow_run.state.type.value if flow_run.state else "SCHEDULED"

    def wait(self, timeout: float | None = None, poll_interval: float = 1.0) -> ExperimentResult:
        """Block until the run ends (polling every ``poll_interval`` s); returns its result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state() not in TERMINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.exp_id} still running after {timeout} s")
            time.sleep(poll_interval)
        return self.result()

    def result(self) -> ExperimentResult:
        """The result as recorded now (MLflow tags and metrics, Prefect state)."""
        return result_for(self.endpoints, self.flow_run_id, self.mlflow_run_id)

    def metrics(self, history: bool = False) -> dict[str, dict[str, Any]]:
        """``{key: {final, min, max, count, unit[, history]}}`` read from MLflow."""
        if self.mlflow_run_id is None:
            return {}
        return tracking.read_metrics(tracking.client(self.endpoints.mlflow_tracking_uri), self.mlflow_run_id, history)


def submit(
    spec: ExperimentSpec | None = None,
    *,
    pool: str | None = None,
    check_workdir: bool = True,
    endpoints: Endpoints | None = None,
    job_variables: dict[str, Any] | None = None,
    mlflow_tags: dict[str, str] | None = None,
    parent_task_run_id: uuid.UUID | None = None,
    warn: Callable[[str], None] | None = None,
    **fields: Any,
) -> ExperimentHandle:
    """Submit one experiment as a run of the experiment deployment on ``pool`` (default ``CQ_POOL``/local).

    Either pass ``spec`` or the spec's fields (name, workdir, command, gpu_count, exp_id, env, tags,
    timeout, params). Bad input raises :class:`SpecError` before anything is created; if creating the
    flow run fails, the MLflow run made for it is deleted again. ``mlflow_tags`` go on the MLflow run (e.g.
    ``mlflow.parentRunId``); ``parent_task_run_id`` makes the flow run a child of that task's flow run.
    ``warn`` receives each warning about the pool (default: printed to stderr as ``cq: warning: …``).
    """
    if spec is None:
        spec = make_spec(**fields)
    elif fields:
        raise SpecError("pass either spec= or the spec's fields, not both")
    if check_workdir and not Path(spec.workdir).is_dir():
        raise SpecError(
            f"workdir {spec.workdir} does not exist; create it or point --workdir at your project folder "
            "(use --remote-workdir if it only exists on the GPU host)"
        )
    pool = pool or StackConfig.from_env().pool
    endpoints = endpoints or connect()
    exp_id = spec.exp_id or f"exp-{uuid.uuid4().hex[:6]}"
    spec = spec.model_copy(update={"exp_id": exp_id})
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    with prefect_settings(endpoints):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            deployment_id, work_pool = _deployment_and_pool(client, endpoints, pool)
            job_variables = _with_gpu_count(work_pool, spec, job_variables)
            _warn_about_capacity(client, work_pool, spec.gpu_count, warn or _print_warning)
            mlflow_run_id = tracking.create_experiment_run(mlflow, spec, exp_id, mlflow_tags)
            if parent_task_run_id is not None and not _task_run_recorded(client, parent_task_run_id):
                parent_task_run_id = None  # the child runs all the same, only not shown nested in the UI
            try:
                flow_run = client.create_flow_run_from_deployment(
                    deployment_id,
                    parameters={"spec": spec.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id},
                    name=exp_id,
                    tags=["cq", *spec.tags],
                    job_variables=job_variables or None,
                    parent_task_run_id=parent_task_run_id,
                )
            except BaseException:
                mlflow.delete_run(mlflow_run_id)  # nothing half-created
                _DEPLOYMENTS.pop((endpoints.prefect_api_url, pool), None)  # e.g. the deployment was deleted
                raise
    from mlflow.entities import RunTag

    mlflow.log_batch(
        mlflow_run_id,
        tags=[RunTag(tracking.TAG_FLOW_RUN_ID, str(flow_run.id)), RunTag(tracking.TAG_FLOW_RUN_NAME, flow_run.name)],
    )
    return ExperimentHandle(str(flow_run.id), flow_run.name, exp_id, mlflow_run_id, endpoints)


def _task_run_recorded(client, task_run_id: uuid.UUID) -> bool:
    """Whether the server has the task run a child flow run is to hang under, waiting up to
    ``PARENT_WAIT_SECONDS``.

    A task run reaches Prefect's database through its event pipeline (the task run recorder), not with the
    engine's own call: with several API servers and Redis messaging it can land a second or more after the
    task started, and a flow run naming a parent task run the database lacks is refused (409, a foreign
    key). A short wait is cheap: one read when the row is there, as it nearly always is on one server.
    """
    import logging

    from prefect.exceptions import ObjectNotFound

    timeout = PARENT_WAIT_SECONDS
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.read_task_run(task_run_id)
            return True
        except ObjectNotFound:
            if time.monotonic() >= deadline:
                logging.getLogger("cq.submission").warning(
                    "task run %s is not on the server after %g s; submitting its experiment without the "
                    "parent link (it will not show nested under its loop or DAG in the Prefect UI)",
                    task_run_id, timeout)
                return False
            time.sleep(0.1)


_DEPLOYMENTS: dict[tuple[str, str], tuple[float, Any, Any]] = {}
_CAPACITY_CHECKED: dict[tuple[str, int], float] = {}
CACHE_SECONDS = 60.0


def _deployment_and_pool(client, endpoints: Endpoints, pool: str):
    """The pool's experiment deployment id (made or updated once a minute per process) and the pool."""
    key = (endpoints.prefect_api_url, pool)
    cached = _DEPLOYMENTS.get(key)
    if cached and time.monotonic() - cached[0] < CACHE_SECONDS:
        return cached[1], cached[2]
    from cq_prefect.deployment import ensure_experiment_deployment

    deployment_id = ensure_experiment_deployment(pool, client)
    work_pool = client.read_work_pool(pool)
    _DEPLOYMENTS[key] = (time.monotonic(), deployment_id, work_pool)
    return deployment_id, work_pool


def _with_gpu_count(work_pool, spec: ExperimentSpec, job_variables: dict[str, Any] | None) -> dict[str, Any]:
    """The run's job variables, with ``gpu_count`` from the spec where the pool's template has that variable."""
    job_variables = dict(job_variables or {})
    template = work_pool.base_job_template or {}
    if "gpu_count" in template.get("variables", {}).get("properties", {}):
        job_variables.setdefault("gpu_count", spec.gpu_count)
    return job_variables


def _print_warning(message: str) -> None:
    print(f"cq: warning: {message}", file=sys.stderr)


def _warn_about_capacity(client, work_pool, gpu_count: int, warn: Callable[[str], None] = _print_warning) -> None:
    """Say at once when nothing in the pool can start the run (it stays scheduled until something can)."""
    from cq_prefect.deployment import pool_has_workers
    from cq_prefect.gpu_worker import WORKER_TYPE, largest_online_inventory

    pool = work_pool.name
    last = _CAPACITY_CHECKED.get((pool, gpu_count))
    if last and time.monotonic() - last < 10:  # a burst of submissions checks (and warns) once
        return
    _CAPACITY_CHECKED[(pool, gpu_count)] = time.monotonic()
    if not pool_has_workers(client, pool):
        warn(f"no worker is polling pool '{pool}' yet; the run waits until one starts "
             f"(`cq worker start --pool {pool}`)")
        return
    if gpu_count == 0 or work_pool.type != WORKER_TYPE:
        return
    largest = largest_online_inventory(client, pool)
    if largest is not None and gpu_count > largest:
        warn(
            f"no worker in pool '{pool}' has {gpu_count} GPUs; largest has {largest}. The run stays "
            f"scheduled until such a worker joins (`cq worker start --pool {pool} --gpus ...`) or you cancel it."
        )


# -- finding runs again ---------------------------------------------------------------------------


def resolve(run: str, endpoints: Endpoints | None = None) -> ExperimentHandle:
    """Find a run by flow-run id, flow-run name or exp id; :class:`UnknownRun` names the fix."""
    endpoints = endpoints or connect()
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    with prefect_settings(endpoints):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        from prefect.client.schemas.sorting import FlowRunSort
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            flow_run = None
            try:
                flow_run = client.read_flow_run(uuid.UUID(run))
            except (ValueError, ObjectNotFound):
                pass
            if flow_run is None:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])),
                    sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                    limit=1,
                )
                flow_run = runs[0] if runs else None
            mlflow_run = None
            if flow_run is None:
                mlflow_run = tracking.find_run(mlflow, tracking.TAG_EXP_ID, run)
                flow_run_id = mlflow_run.data.tags.get(tracking.TAG_FLOW_RUN_ID) if mlflow_run else None
                if flow_run_id:
                    flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
            if flow_run is None:
                raise UnknownRun(
                    f"no run '{run}': it is not a flow-run id, flow-run name or exp id known to "
                    f"{endpoints.prefect_api_url}; list recent runs with `prefect flow-run ls`"
                )
    if mlflow_run is None:
        mlflow_run = tracking.find_run(mlflow, tracking.TAG_FLOW_RUN_ID, str(flow_run.id))
    exp_id = (mlflow_run.data.tags.get(tracking.TAG_EXP_ID) if mlflow_run else None) or flow_run.name
    return ExperimentHandle(
        str(flow_run.id), flow_run.name, exp_id, mlflow_run.info.run_id if mlflow_run else None, endpoints
    )


def result_for(endpoints: Endpoints, flow_run_id: str, mlflow_run_id: str | None) -> ExperimentResult:
    with prefect_settings(endpoints):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
    state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
    stored = _stored_result(endpoints, mlflow_run_id) if state in TERMINAL else None
    if stored is not None:
        if state in ("CANCELLED", "CRASHED"):
            stored = stored.model_copy(update={"outcome": state.lower()})
        return stored.model_copy(update={"message": flow_run.state.message if flow_run.state else stored.message})
    tags: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    if mlflow_run_id:
        mlflow = tracking.client(endpoints.mlflow_tracking_uri)
        tags = mlflow.get_run(mlflow_run_id).data.tags
        metrics = tracking.read_metrics(mlflow, mlflow_run_id)
    outcome = tags.get(tracking.TAG_OUTCOME) or {
        "COMPLETED": "success", "FAILED": "failed", "CANCELLED": "cancelled", "CRASHED": "crashed",
        "RUNNING": "running",
    }.get(state, "scheduled")
    if state == "CANCELLED":
        outcome = "cancelled"
    exit_code = tags.get(tracking.TAG_EXIT_CODE)
    duration = tags.get(tracking.TAG_DURATION)
    return ExperimentResult(
        exp_id=tags.get(tracking.TAG_EXP_ID) or flow_run.name,
        name=tags.get("mlflow.runName") or flow_run.name,
        outcome=outcome,
        exit_code=int(exit_code) if exit_code not in (None, "") else None,
        duration_s=float(duration) if duration else None,
        flow_run_id=flow_run_id,
        mlflow_run_id=mlflow_run_id,
        gpu_ids=[g for g in tags.get(tracking.TAG_GPU_IDS, "").split(",") if g],
        metrics=tracking.metric_stats(metrics),
        message=flow_run.state.message if flow_run.state else None,
    )


def _stored_result(endpoints: Endpoints, mlflow_run_id: str | None) -> ExperimentResult | None:
    """The ExperimentResult the flow stored as an MLflow artifact (None for runs that never finished)."""
    import tempfile

    if not mlflow_run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = tracking.client(endpoints.mlflow_tracking_uri).download_artifacts(
                mlflow_run_id, tracking.RESULT_ARTIFACT, folder
            )
            return ExperimentResult.model_validate_json(Path(path).read_text())
    except Exception:
        return None


# -- watching -------------------------------------------------------------------------------------


def watch(
    handle: ExperimentHandle,
    out: TextIO = sys.stdout,
    poll_interval: float = 0.5,
    metrics_interval: float = 2.0,
    settle_seconds: float = 3.0,
    on_state: Callable[[str], None] | None = None,
) -> int:
    """Print the run's lines as ``[job-xxxxxx] line`` and its metric updates until it ends.

    Replays a finished run. Returns 0 when the run completed, 1 otherwise.
    """
    prefix = f"[job-{handle.flow_run_id.replace('-', '')[:6]}]"
    mlflow = tracking.client(handle.endpoints.mlflow_tracking_uri) if handle.mlflow_run_id else None
    shown_metrics: dict[str, float] = {}
    offset = 0
    last_metrics = 0.0
    ended_at: float | None = None
    state = "SCHEDULED"
    with prefect_settings(handle.endpoints):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
        from prefect.client.schemas.sorting import LogSort

        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(handle.flow_run_id)]))
        with get_client(sync_client=True) as client:
            while True:
                flow_run = client.read_flow_run(uuid.UUID(handle.flow_run_id))
                new_state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
                if new_state != state and on_state:
                    on_state(new_state)
                state = new_state
                logs = client.read_logs(log_filter=log_filter, limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
                offset += len(logs)
                for log in logs:
                    if log.name.startswith("cq.output"):
                        for line in log.message.split("\n"):
                            out.write(f"{prefix} {line}\n")
                    else:
                        out.write(f"{prefix} [{_level(log.level)}] {log.message}\n")
                if mlflow and (time.monotonic() - last_metrics > metrics_interval or state in TERMINAL):
                    last_metrics = time.monotonic()
                    _print_metric_updates(mlflow, handle.mlflow_run_id, shown_metrics, prefix, out)
                out.flush()
                if state in TERMINAL:
                    ended_at = ended_at or time.monotonic()
                    if not logs and time.monotonic() - ended_at > settle_seconds:
                        break
                if len(logs) < 200:
                    time.sleep(poll_interval)
    message = f" — {flow_run.state.message}" if flow_run.state and flow_run.state.message and state != "COMPLETED" else ""
    out.write(f"{prefix} {state.capitalize()}{message}\n")
    out.flush()
    return 0 if state == "COMPLETED" else 1


def _level(level: int) -> str:
    return {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}.get(level, str(level))


def _print_metric_updates(mlflow, run_id: str, shown: dict[str, float], prefix: str, out: TextIO) -> None:
    try:
        run = mlflow.get_run(run_id)
    except Exception:  # MLflow away for a moment: the lines keep coming, metrics catch up later
        return
    changed = {k: v for k, v in run.data.metrics.items() if shown.get(k) != v}
    if not changed:
        return
    shown.update(changed)
    tags = run.data.tags
    parts = [f"{k}={v:.6g}{tags.get(tracking.UNIT_TAG_PREFIX + k, '')}" for k, v in sorted(changed.items())]
    out.write(f"{prefix} metrics: {' '.join(parts)}\n")


def metrics_for(run: str, history: bool = False, endpoints: Endpoints | None = None) -> dict[str, dict[str, Any]]:
    """``cq metrics RUN``: the run's metrics from MLflow."""
    handle = resolve(run, endpoints)
    if handle.mlflow_run_id is None:
        raise CqError(f"run '{run}' has no MLflow run yet (it has not started); try again once it runs")
    return handle.metrics(history=history)
