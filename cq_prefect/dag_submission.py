"""Submitting DAG runs and deploying DAGs: what ``cq dag run`` and ``cq dag deploy`` do.

    >>> dag, content = load_dag("pipeline.yaml"), open("pipeline.yaml").read()            # doctest: +SKIP
    >>> handle = submit_dag(dag, content, "/work/project")                                  # doctest: +SKIP
    >>> handle.wait().outcome                                                               # doctest: +SKIP
    'success'

A DAG run is a flow run of deployment ``<dag name>/cq-run`` (made or updated on each submit) on the pool:
a worker runs it like any flow, so the DAG goes on when the submitting laptop sleeps.
"""

from __future__ import annotations

import uuid

from cq_prefect.dag_spec import Dag
from cq_prefect.errors import UnknownRun
from cq_prefect.stack import Endpoints, StackConfig, connect, prefect_settings
from cq_prefect.submission import ExperimentHandle

RUN_DEPLOYMENT = "cq-run"


def deploy_dag(dag: Dag, content: str, base_dir: str, *, name: str = "default", pool: str | None = None,
               cron: str | None = None, timezone: str | None = None, max_parallel: int | None = None,
               endpoints: Endpoints | None = None):
    """Create or update deployment ``<dag>/<name>`` (optionally on a cron schedule); returns its id."""
    from cq_prefect.deployment import cron_schedule, ensure_dag_deployment

    cron_schedule(cron, timezone)  # bad input before anything starts
    pool = pool or StackConfig.from_env().pool
    endpoints = endpoints or connect()
    with prefect_settings(endpoints):
        return ensure_dag_deployment(dag, content, base_dir, pool=pool, name=name, cron=cron, timezone=timezone,
                                     max_parallel=max_parallel)


def submit_dag(dag: Dag, content: str, base_dir: str, *, pool: str | None = None, resume: str | None = None,
               max_parallel: int | None = None, endpoints: Endpoints | None = None) -> ExperimentHandle:
    """Start a run of ``dag`` on ``pool``; ``resume`` names an earlier run of it (flow-run id or name)."""
    from prefect.client.orchestration import get_client

    from cq_prefect.dag import DEFAULT_PARALLEL
    from cq_prefect.deployment import ensure_dag_deployment

    pool = pool or StackConfig.from_env().pool
    endpoints = endpoints or connect()
    with prefect_settings(endpoints), get_client(sync_client=True) as client:
        if resume:
            resume = _check_resume(client, dag, resume)
        deployment_id = ensure_dag_deployment(dag, content, base_dir, pool=pool, name=RUN_DEPLOYMENT,
                                              max_parallel=max_parallel, client=client)
        flow_run = client.create_flow_run_from_deployment(
            deployment_id,
            parameters={"dag": content, "base_dir": base_dir, "resume": resume,
                        "max_parallel": max_parallel or DEFAULT_PARALLEL, "pool": pool},
            tags=["cq", "cq-dag", *dag.tags],
        )
    return ExperimentHandle(str(flow_run.id), flow_run.name, dag.name, None, endpoints)


def _check_resume(client, dag: Dag, run: str) -> str:
    """The flow-run id of ``run``, which must be a run of this DAG (bad input otherwise, before anything is made)."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName
    from prefect.exceptions import ObjectNotFound

    flow_run = None
    try:
        flow_run = client.read_flow_run(uuid.UUID(run))
    except (ValueError, ObjectNotFound):
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])),
                                     flow_filter=FlowFilter(name=FlowFilterName(any_=[dag.name])), limit=1)
        flow_run = runs[0] if runs else None
    if flow_run is not None and client.read_flow(flow_run.flow_id).name == dag.name:
        return str(flow_run.id)
    raise UnknownRun(
        f"--resume {run}: no run of DAG '{dag.name}' has that flow-run id or name; list them with "
        f"`prefect flow-run ls --flow-name {dag.name}`"
    )
