"""The experiment deployment: one per work pool, entrypoint inside the installed package.

The entrypoint is a module path (``cq_prefect.experiment:experiment``), not a file, so the deployment
runs on any host that has cq-prefect installed, whatever its working directory: no pull steps, no code
storage. ``prefect.yaml`` declares the same deployment for ``prefect deploy`` users.
"""

from __future__ import annotations

import sys

from cq_prefect.errors import SpecError

EXPERIMENT_ENTRYPOINT = "cq_prefect.experiment:experiment"
EXPERIMENT_FLOW_NAME = "experiment"


def deployment_name(pool: str) -> str:
    """The experiment deployment serving ``pool``, as ``prefect deployment run`` names it."""
    return f"{EXPERIMENT_FLOW_NAME}/{pool}"


def default_template(pool_type: str) -> dict:
    """The base job template a new pool of ``pool_type`` gets (generated from its worker's variables)."""
    if pool_type == "cq-gpu":
        from cq_prefect.gpu_worker import CqGpuWorker

        return CqGpuWorker.get_default_base_job_template()
    from prefect.workers.base import BaseWorker

    worker_class = BaseWorker.get_worker_class_from_type(pool_type)
    if worker_class is None:
        raise SpecError(f"unknown work pool type {pool_type!r}; cq pools are 'cq-gpu' (see cq worker start)")
    return worker_class.get_default_base_job_template()


def ensure_work_pool(client, pool: str, pool_type: str = "cq-gpu") -> bool:
    """Create work pool ``pool`` of ``pool_type`` if missing; True if it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_work_pool(pool)
        return False
    except ObjectNotFound:
        pass
    try:
        client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, base_job_template=default_template(pool_type)))
    except ObjectAlreadyExists:
        return False
    return True


def require_pool_type(pool: str, pool_type: str, client=None) -> None:
    """Bad input (exit 2) when ``pool`` exists with another type; creates it when missing."""
    from prefect.client.orchestration import get_client

    if client is None:
        with get_client(sync_client=True) as client:
            return require_pool_type(pool, pool_type, client)
    if ensure_work_pool(client, pool, pool_type):
        print(f"cq: created work pool '{pool}' (type {pool_type})", file=sys.stderr)
        return
    found = client.read_work_pool(pool).type
    if found != pool_type:
        raise SpecError(
            f"work pool '{pool}' has type '{found}', but this worker serves '{pool_type}' pools; use another pool "
            f"name (cq worker start --pool {pool}-gpu) or delete that pool first (prefect work-pool delete {pool})"
        )


def ensure_experiment_deployment(pool: str, client=None):
    """Create or update the experiment deployment for ``pool`` (and the pool); returns its id."""
    from prefect.client.orchestration import get_client
    from prefect.utilities.callables import parameter_schema

    from cq_prefect.experiment import experiment

    if client is None:
        with get_client(sync_client=True) as client:
            return ensure_experiment_deployment(pool, client)
    if ensure_work_pool(client, pool):
        print(f"cq: created work pool '{pool}'", file=sys.stderr)
    flow_id = client.create_flow_from_name(EXPERIMENT_FLOW_NAME)
    return client.create_deployment(
        flow_id=flow_id,
        name=pool,
        entrypoint=EXPERIMENT_ENTRYPOINT,
        work_pool_name=pool,
        parameter_openapi_schema=parameter_schema(experiment.fn).model_dump_for_openapi(),
        enforce_parameter_schema=True,
        pull_steps=[],
        description="Run one shell command as a cq experiment: lines to the run log, @key=value to MLflow.",
        tags=["cq"],
    )


def pool_has_workers(client, pool: str) -> bool:
    """Whether any worker has polled ``pool`` recently (online)."""
    workers = client.read_workers_for_work_pool(pool)
    return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)


def ensure_dag_deployment(
    dag, content: str, base_dir: str, *, pool: str, name: str = "default", cron: str | None = None,
    timezone: str | None = None, max_parallel: int | None = None, client=None,
):
    """Create or update deployment ``<dag name>/<name>`` that runs this DAG on ``pool``; returns its id.

    The DAG's YAML travels in the deployment's parameters (entrypoint ``cq_prefect.dag:dag_pipeline``, no
    pull steps), so ``prefect deployment run '<dag>/<name>'`` and schedules work on any host with cq-prefect
    installed and the DAG's working directories.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.utilities.callables import parameter_schema

    from cq_prefect.dag import DAG_ENTRYPOINT, DEFAULT_PARALLEL, dag_pipeline

    schedule = cron_schedule(cron, timezone)
    schedules = [DeploymentScheduleCreate(schedule=schedule, active=True)] if schedule else None
    if client is None:
        with get_client(sync_client=True) as client:
            return ensure_dag_deployment(dag, content, base_dir, pool=pool, name=name, cron=cron, timezone=timezone,
                                         max_parallel=max_parallel, client=client)
    if ensure_work_pool(client, pool):
        print(f"cq: created work pool '{pool}'", file=sys.stderr)
    flow_id = client.create_flow_from_name(dag.name)
    return client.create_deployment(
        flow_id=flow_id,
        name=name,
        entrypoint=DAG_ENTRYPOINT,
        work_pool_name=pool,
        parameters={"dag": content, "base_dir": base_dir, "max_parallel": max_parallel or DEFAULT_PARALLEL,
                    "pool": pool},
        parameter_openapi_schema=parameter_schema(dag_pipeline.fn).model_dump_for_openapi(),
        enforce_parameter_schema=True,
        pull_steps=[],
        schedules=schedules,
        description=dag.description or f"The DAG {dag.name} ({len(dag.nodes)} nodes), run by cq.",
        tags=["cq", "cq-dag", *dag.tags],
    )


def cron_schedule(cron: str | None, timezone: str | None = None):
    """A Prefect cron schedule (None without ``cron``); bad input names the fix."""
    from prefect.client.schemas.schedules import CronSchedule

    if not cron:
        return None
    try:
        return CronSchedule(cron=cron, timezone=timezone or "UTC")
    except ValueError as exc:
        errors = getattr(exc, "errors", None)
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in errors()) if errors else str(exc)
        raise SpecError(
            f"--cron {cron!r} / --timezone {timezone or 'UTC'!r} is not a cron schedule "
            f"({why}); e.g. --cron '0 2 * * *' (02:00 every night) --timezone Europe/Berlin"
        ) from None
