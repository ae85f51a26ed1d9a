"""Starting, following, resuming and stopping research loops: what ``cq loop …`` does.

    >>> run = start_loop(LoopConfig.from_yaml("deployments/loops/pose.yaml"))      # doctest: +SKIP
    >>> follow(run.flow_run_id, endpoints)                                           # doctest: +SKIP

A loop is a flow run of deployment ``research-loop/default`` on a CPU **process** pool (``CQ_LOOP_POOL``,
default ``cq-loops``) — never the GPU pool: a parent holding a slot its children need would deadlock.
When a worker polls that pool (``prefect worker start --pool cq-loops``) it runs the loop; otherwise
``cq loop start`` claims the run (Pending, as a worker would) and runs it here in a detached process
(``python -m prefect.engine``), logging to ``CQ_HOME/logs/loop-<name>.log``, so the loop goes on after
the command returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cq_prefect import tracking
from cq_prefect.errors import BadInput, LoopConfigError
from cq_prefect.ledger import TAG_STATUS, TAG_STOP, Ledger
from cq_prefect.loop_config import LoopConfig
from cq_prefect.stack import Endpoints, connect, prefect_settings

DEFAULT_LOOP_POOL = "cq-loops"
LOOP_POOL_TYPE = "process"
DEFAULT_DEPLOYMENT = "default"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def loop_pool() -> str:
    """The CPU pool parent flows run on: ``CQ_LOOP_POOL`` or ``cq-loops``."""
    return os.environ.get("CQ_LOOP_POOL") or DEFAULT_LOOP_POOL


@dataclass
class LoopRun:
    """A started loop: its parent flow run, and the local process running it (None: a worker runs it)."""

    name: str
    flow_run_id: str
    flow_run_name: str
    pid: int | None
    log_path: str | None


def ensure_loop_deployment(client, *, pool: str | None = None, name: str = DEFAULT_DEPLOYMENT,
                           config: dict[str, Any] | str | None = None, cron: str | None = None,
                           timezone: str | None = None, active: bool = True):
    """Create or update deployment ``research-loop/<name>`` on the loop pool (a ``process`` pool); its id.

    ``config`` (a loop YAML path on the worker host, or a config mapping) becomes the default parameter, so
    ``prefect deployment run research-loop/<name>`` and a ``cron`` schedule need no parameters.
    """
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.utilities.callables import parameter_schema

    from cq_prefect.deployment import cron_schedule, ensure_work_pool
    from cq_prefect.gpu_worker import WORKER_TYPE
    from cq_prefect.loop import LOOP_ENTRYPOINT, LOOP_FLOW_NAME, research_loop

    pool = pool or loop_pool()
    schedule = cron_schedule(cron, timezone)
    if ensure_work_pool(client, pool, LOOP_POOL_TYPE):
        print(f"cq: created work pool '{pool}' (type {LOOP_POOL_TYPE}) for research loops", file=sys.stderr)
    found = client.read_work_pool(pool).type
    if found == WORKER_TYPE:
        raise BadInput(
            f"pool '{pool}' is a GPU pool ({WORKER_TYPE}); research loops run on a CPU process pool so that a loop "
            f"never holds a slot its experiments need. Use CQ_LOOP_POOL=cq-loops (the default)"
        )
    flow_id = client.create_flow_from_name(LOOP_FLOW_NAME)
    return client.create_deployment(
        flow_id=flow_id, name=name, entrypoint=LOOP_ENTRYPOINT, work_pool_name=pool,
        parameters={"config": config} if config is not None else {},
        parameter_openapi_schema=parameter_schema(research_loop.fn).model_dump_for_openapi(),
        enforce_parameter_schema=False, pull_steps=[],
        schedules=[DeploymentScheduleCreate(schedule=schedule, active=active)] if schedule else None,
        description="A cq research loop: propose, run, measure, keep, until the goal or the budget.",
        tags=["cq", "cq-loop"],
    )


def check_can_start(config: LoopConfig, endpoints: Endpoints) -> None:
    """Bad input when a loop of this name is still running or was left unfinished (resume it instead), when
    its code edits cannot work (no git repository, uncommitted editable files), or when its Claude proposer
    has no API key: all before anything is created."""
    from cq_prefect.loop_code import LoopCode

    LoopCode.open(config)
    if getattr(config.proposer, "kind", None) == "claude":
        from cq_prefect.credentials import anthropic_key

        with prefect_settings(endpoints):
            anthropic_key(config.proposer.credentials)
    ledger = Ledger.latest(tracking.client(endpoints.mlflow_tracking_uri), config.name)
    if ledger is None:
        return
    tags = ledger.tags()
    if ledger.parent_alive(tags):
        raise BadInput(f"loop '{config.name}' is running; follow it with `cq loop status {config.name}`, stop it "
                       f"with `cq loop stop {config.name}`, or give another --name")
    if tags.get(TAG_STATUS) == "running":
        raise BadInput(f"loop '{config.name}' did not finish (its process is gone); continue it with "
                       f"`cq loop resume {config.name}` or give another --name")


def start_loop(config: LoopConfig, *, resume: bool = False, budget: int | None = None,
               endpoints: Endpoints | None = None, here: bool | None = None) -> LoopRun:
    """Create the loop's parent flow run on the loop pool and, unless a worker serves that pool (or
    ``here`` is given), run it in a detached process on this host."""
    from prefect.client.orchestration import get_client

    from cq_prefect.deployment import pool_has_workers

    endpoints = endpoints or connect()
    pool = loop_pool()
    with prefect_settings(endpoints), get_client(sync_client=True) as client:
        deployment_id = ensure_loop_deployment(client, pool=pool)
        flow_run = client.create_flow_run_from_deployment(
            deployment_id, name=config.name,
            parameters={"config": config.model_dump(mode="json"), "resume": resume, "budget": budget},
            tags=["cq", "cq-loop", f"cq.loop={config.name}"],
        )
        if here is None:
            here = not pool_has_workers(client, pool)
        pid = log_path = None
        if here:
            pid, log_path = _run_here(client, str(flow_run.id), config.name, endpoints)
    return LoopRun(config.name, str(flow_run.id), flow_run.name, pid, log_path)


def _run_here(client, flow_run_id: str, name: str, endpoints: Endpoints) -> tuple[int | None, str | None]:
    """Claim the run (Pending, as a worker does) and start the engine for it in a detached process."""
    from prefect.states import Pending

    from cq_prefect.paths import cq_home

    result = client.set_flow_run_state(uuid.UUID(flow_run_id), Pending())
    if str(getattr(result.status, "value", result.status)).upper() != "ACCEPT":
        return None, None  # a worker claimed it first: it runs there
    logs = cq_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"loop-{name}.log"
    env = {**os.environ, "PREFECT_API_URL": endpoints.prefect_api_url,
           "MLFLOW_TRACKING_URI": endpoints.mlflow_tracking_uri, "PREFECT__FLOW_RUN_ID": flow_run_id}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect.engine", flow_run_id], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid, str(log_path)


def follow(run: LoopRun, endpoints: Endpoints, out: TextIO = sys.stdout, poll_interval: float = 0.5,
           settle_seconds: float = 2.0) -> str:
    """Print the loop's own log lines (``[loop] Cycle 1 — best: …``) until its flow run ends; its state type.

    Returns ``LOST`` when the local process running the loop died without ending the run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    from cq_prefect.stack import pid_alive

    flow_run_id = uuid.UUID(run.flow_run_id)
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    offset, ended_at, state = 0, None, "SCHEDULED"
    with prefect_settings(endpoints), get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
            logs = client.read_logs(log_filter=log_filter, limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            offset += len(logs)
            for log in logs:
                if log.name == "prefect.flow_runs.loop":
                    out.write(log.message + "\n")
                elif log.level >= 40:
                    out.write(f"[{log.name}] {log.message.splitlines()[0]}\n")
            out.flush()
            if state not in TERMINAL and run.pid is not None and not pid_alive(run.pid):
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > settle_seconds:
                    return "LOST"
            if state in TERMINAL:
                ended_at = ended_at or time.monotonic()
                if not logs and time.monotonic() - ended_at > settle_seconds:
                    return state
            if len(logs) < 200:
                time.sleep(poll_interval)


def resume_loop(name: str, *, budget: int | None = None, endpoints: Endpoints | None = None,
                here: bool | None = None) -> LoopRun:
    """Continue loop ``name`` from its ledger in a new parent flow run (``budget``: a new budget)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    endpoints = endpoints or connect()
    ledger = Ledger.require(tracking.client(endpoints.mlflow_tracking_uri), name)
    tags = ledger.tags()
    if ledger.parent_alive(tags):
        raise BadInput(f"loop '{name}' is running (flow run {tags.get(tracking.TAG_FLOW_RUN_ID)}); nothing to resume. "
                       f"Stop it first with `cq loop stop {name}` if you want to restart it")
    if budget is not None and budget < 1:
        raise LoopConfigError(f"--budget {budget} must be at least 1 (the most experiments to run, in all)")
    config = ledger.load_config()
    old = tags.get(tracking.TAG_FLOW_RUN_ID)
    if old:
        with prefect_settings(endpoints), get_client(sync_client=True) as client:
            try:
                flow_run = client.read_flow_run(uuid.UUID(old))
                if flow_run.state and flow_run.state.type.value not in TERMINAL:
                    client.set_flow_run_state(flow_run.id, Crashed(
                        message=f"its process is gone; continued by `cq loop resume {name}`"), force=True)
            except Exception:
                pass  # the old run is a record; the ledger is what the new run continues
    return start_loop(config, resume=True, budget=budget, endpoints=endpoints, here=here)


def stop_loop(name: str, *, endpoints: Endpoints | None = None, wait: float = 60.0) -> dict[str, Any]:
    """Stop loop ``name``: its running children are cancelled and the loop ends with reason ``stopped``.

    The running parent is asked through the ledger (it looks every poll) and does it itself; when no
    parent is alive, this does it. Returns the loop's status (see :func:`cq_prefect.ledger.status_json`)."""
    from cq_prefect.ledger import status_json

    endpoints = endpoints or connect()
    ledger = Ledger.require(tracking.client(endpoints.mlflow_tracking_uri), name)
    tags = ledger.tags()
    if tags.get(TAG_STATUS) not in ("running", None):
        return status_json(ledger)
    ledger.set_tags(**{TAG_STOP: f"{time.time():.3f}"})
    deadline = time.monotonic() + wait
    while ledger.parent_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    if ledger.tags().get(TAG_STATUS) == "running":
        _stop_without_parent(ledger, endpoints)
    return status_json(ledger)


def _stop_without_parent(ledger: Ledger, endpoints: Endpoints) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    config = ledger.load_config()
    records = ledger.records()
    with prefect_settings(endpoints), get_client(sync_client=True) as client:
        for record in records:
            if record.outcome != "running":
                continue
            if record.flow_run_id:
                try:
                    client.set_flow_run_state(uuid.UUID(record.flow_run_id),
                                              Cancelling(message="its research loop was stopped"), force=True)
                except Exception:
                    pass
            ledger.record(record.model_copy(update={"outcome": "crashed",
                                                    "message": "cancelled: the loop was stopped"}))
        parent = ledger.tags().get(tracking.TAG_FLOW_RUN_ID)
        if parent:
            try:
                flow_run = client.read_flow_run(uuid.UUID(parent))
                if flow_run.state and flow_run.state.type.value not in TERMINAL:
                    client.set_flow_run_state(flow_run.id, Cancelled(message="stopped by cq loop stop"), force=True)
            except Exception:
                pass
    ledger.finish("stopped", "stopped", config.best([r for r in ledger.records()]))


def config_from_file(path: str | Path) -> LoopConfig:
    return LoopConfig.from_yaml(Path(path).expanduser())
