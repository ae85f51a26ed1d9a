"""The ``cq-docker`` worker: Prefect's Docker worker, with a ``gpu_count`` job variable.

Each experiment runs in its own container. A run's ``gpu_count`` becomes one Docker device request on
the container, ``DeviceRequest(count=N, capabilities=[["gpu"]])`` (what ``docker run --gpus N`` sends), so
the NVIDIA container runtime hands it N GPUs; 0 requests none. The count comes from, first to last: the
flow run's job variables, the experiment flow's ``spec.gpu_count``, the deployment's job variables, the
pool's default (0) — so ``cq_prefect.submit(..., gpu_count=1, pool="docker")`` needs nothing more.

The container gets the worker's ``MLFLOW_TRACKING_URI`` (as Prefect gives it ``PREFECT_API_URL``). The
pools :func:`ensure_docker_pool` makes use ``network_mode: host``: the container then reaches servers on
the host's 127.0.0.1 (the embedded stack) as the host does. When a container never starts (no GPU runtime,
a missing image) or dies under the flow, the run is marked crashed and its MLflow run closed as FAILED,
so nothing waits for a run that cannot come.

    >>> ensure_docker_pool("docker", image="cq-prefect:src-1a2b3c4d5e6f")   # doctest: +SKIP
    $ prefect worker start --type cq-docker --pool docker

The image: ``docker/build_image.sh`` builds one from this repository with no registry.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Any, Optional

import anyio.abc
import docker.errors
from docker.types import DeviceRequest
from pydantic import Field, field_validator
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration, DockerWorkerResult

from cq_prefect.errors import BadInput, CqError

if TYPE_CHECKING:
    from uuid import UUID

    from docker import DockerClient
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

WORKER_TYPE = "cq-docker"
MAX_GPUS = 64
# The worker host's settings a container needs to record an experiment like a process worker would.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "CQ_KILL_GRACE_SECONDS",
    "CQ_MLFLOW_FLUSH_TIMEOUT",
)


class ContainerStartFailed(CqError):
    """A run's container could not be started (e.g. GPUs requested on a host without a GPU runtime)."""


def _check_gpu_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPUS:
        raise ValueError(
            f"gpu_count must be a whole number from 0 to {MAX_GPUS} (the GPUs the container gets), not {value!r}; "
            "use 0 for a CPU-only run"
        )
    return value


class CqDockerJobConfiguration(DockerWorkerJobConfiguration):
    """Prefect's Docker job configuration plus ``gpu_count``."""

    gpu_count: int = Field(
        default=0,
        title="GPUs",
        description=(
            f"GPUs the container gets (0 to {MAX_GPUS}), as a Docker device request with the 'gpu' capability "
            "(`docker run --gpus N`); needs the NVIDIA Container Toolkit on the worker host. When the flow run "
            "does not set it, the experiment's spec.gpu_count is used."
        ),
        ge=0,
        le=MAX_GPUS,
    )

    @field_validator("gpu_count", mode="before")
    @classmethod
    def _gpu_count_in_range(cls, value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():  # a templated or CLI-given "2"
            value = int(value)
        return _check_gpu_count(value)

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        if "gpu_count" not in (flow_run.job_variables or {}):
            spec = (flow_run.parameters or {}).get("spec")
            if isinstance(spec, dict) and spec.get("gpu_count") is not None:
                self.gpu_count = _check_gpu_count(spec["gpu_count"])
        for name in FORWARDED_ENV:
            if name not in self.env and os.environ.get(name):
                self.env[name] = os.environ[name]
        uri = self.env.get("MLFLOW_TRACKING_URI")
        if uri and self.get_network_mode() != "host":  # on a bridge network, the host is host.docker.internal
            self.env["MLFLOW_TRACKING_URI"] = uri.replace("localhost", "host.docker.internal").replace(
                "127.0.0.1", "host.docker.internal"
            )

    def device_requests(self) -> list[DeviceRequest]:
        """The Docker device requests for ``gpu_count`` (none for 0)."""
        if not self.gpu_count:
            return []
        return [DeviceRequest(count=self.gpu_count, capabilities=[["gpu"]])]


class CqDockerWorker(DockerWorker):
    """Runs each experiment in a Docker container, with ``gpu_count`` GPUs requested from Docker."""

    type = WORKER_TYPE
    job_configuration = CqDockerJobConfiguration
    _description = (
        "Run cq experiments in Docker containers; the job variable gpu_count requests that many GPUs "
        "from Docker (NVIDIA Container Toolkit). Requires a running Docker daemon."
    )
    _display_name = "cq Docker (GPU)"
    _documentation_url = "https://docs.prefect.io/integrations/prefect-docker"

    def _build_container_settings(
        self, docker_client: DockerClient, configuration: CqDockerJobConfiguration
    ) -> dict[str, Any]:
        settings = super()._build_container_settings(docker_client, configuration)
        requests = configuration.device_requests()
        if requests:  # keep device requests given through container_create_kwargs
            settings["device_requests"] = [*(settings.get("device_requests") or []), *requests]
        return settings

    def _create_and_start_container(self, configuration: CqDockerJobConfiguration):
        try:
            return super()._create_and_start_container(configuration)
        except docker.errors.APIError as exc:
            if configuration.gpu_count and "device driver" in str(exc):
                raise ContainerStartFailed(
                    f"container {configuration.name!r} asks for {configuration.gpu_count} GPU(s) but Docker on "
                    f"{socket.gethostname()} cannot provide GPUs ({exc.explanation or exc}); install the NVIDIA "
                    "Container Toolkit there (`nvidia-ctk runtime configure --runtime=docker`, then restart "
                    "dockerd), or run with gpu_count=0"
                ) from exc
            raise

    async def run(
        self,
        flow_run: FlowRun,
        configuration: CqDockerJobConfiguration,
        task_status: Optional[anyio.abc.TaskStatus[str]] = None,
    ) -> DockerWorkerResult:
        try:
            result = await super().run(flow_run, configuration, task_status)
        except Exception as exc:
            await run_sync_in_worker_thread(close_orphaned_mlflow_run, flow_run, f"the container did not start: {exc}")
            raise
        if result.status_code != 0:
            await run_sync_in_worker_thread(
                close_orphaned_mlflow_run, flow_run, f"the container exited with code {result.status_code}"
            )
        return result


def close_orphaned_mlflow_run(flow_run: FlowRun, reason: str) -> bool:
    """Close the run's MLflow run as FAILED (outcome crashed) if the flow left it open; True if it did.

    A flow that ran closes its MLflow run itself; this is for containers that never started or died.
    """
    run_id = (flow_run.parameters or {}).get("mlflow_run_id")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not run_id or not uri:
        return False
    from mlflow.entities import RunTag

    from cq_prefect import tracking

    try:
        mlflow = tracking.client(uri)
        if mlflow.get_run(run_id).info.status not in ("SCHEDULED", "RUNNING"):
            return False
        mlflow.log_batch(run_id, tags=[RunTag(tracking.TAG_OUTCOME, "crashed"), RunTag("cq.error", reason[:5000])])
        mlflow.set_terminated(run_id, status="FAILED")
        return True
    except Exception as exc:  # MLflow away: the Prefect state still says crashed
        print(f"cq: could not close MLflow run {run_id}: {exc}", file=sys.stderr)
        return False


# -- pools ----------------------------------------------------------------------------------------


def docker_pool_template(
    image: str,
    *,
    network_mode: str | None = "host",
    gpu_count: int = 0,
    volumes: list[str] | None = None,
    auto_remove: bool = False,
) -> dict[str, Any]:
    """The cq-docker base job template with cq's defaults: ``image``, host networking, ``gpu_count``.

    ``network_mode="host"`` lets containers reach the Prefect and MLflow servers on the host's 127.0.0.1;
    pass ``None`` (Prefect's inference) or a network name for servers reachable from a bridge network.
    ``volumes`` (``"/host/path:/container/path"``) mount project folders, so a workdir can be the same path
    inside the container as on the host. ``gpu_count`` is the default for flows without an experiment
    spec: an experiment's own ``spec.gpu_count`` (0 unless given) comes first.
    """
    if not isinstance(image, str) or not image.strip():
        raise BadInput("image is empty; build one with docker/build_image.sh and pass the reference it prints")
    try:
        _check_gpu_count(gpu_count)
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    template = CqDockerWorker.get_default_base_job_template()
    properties = template["variables"]["properties"]
    properties["image"]["default"] = image
    properties["gpu_count"]["default"] = gpu_count
    properties["auto_remove"]["default"] = auto_remove
    if network_mode:
        properties["network_mode"]["default"] = network_mode
    if volumes:
        properties["volumes"]["default"] = list(volumes)
    return template


def ensure_docker_pool(pool: str, image: str, *, client=None, **template_options: Any):
    """Create or update cq-docker pool ``pool`` (defaults from :func:`docker_pool_template`) and its
    experiment deployment; returns the deployment id. Start its worker with
    ``prefect worker start --type cq-docker --pool POOL``.

        >>> ensure_docker_pool("docker", "cq-prefect:src-1a2b3c4d5e6f", volumes=["/data:/data"])  # doctest: +SKIP
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    from cq_prefect.deployment import ensure_experiment_deployment

    template = docker_pool_template(image, **template_options)
    if client is None:
        with get_client(sync_client=True) as client:
            return ensure_docker_pool(pool, image, client=client, **template_options)
    try:
        existing = client.read_work_pool(pool)
    except ObjectNotFound:
        existing = None
    if existing is None:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=WORKER_TYPE, base_job_template=template))
            print(f"cq: created work pool '{pool}' (type {WORKER_TYPE}, image {image})", file=sys.stderr)
        except ObjectAlreadyExists:  # created concurrently: check it like an existing one
            existing = client.read_work_pool(pool)
    if existing is not None:
        if existing.type != WORKER_TYPE:
            raise BadInput(
                f"work pool '{pool}' exists with type '{existing.type}', not '{WORKER_TYPE}'; pick another pool "
                f"name or delete it first (`prefect work-pool delete {pool}`)"
            )
        if existing.base_job_template != template:  # e.g. a newer image: new defaults for the next runs
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
    return ensure_experiment_deployment(pool, client)  # the pool exists: only the deployment is made
