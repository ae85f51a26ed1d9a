"""End to end: experiments on a ``cq-docker`` pool, run in containers of the locally built image.

Real dockerd (started here when missing and we are root), the image built by docker/build_image.sh
(cached by tag: the first session on a machine debootstraps and pip-installs for a few minutes), a real
``prefect worker start --type cq-docker`` subprocess, the session's Prefect and MLflow servers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import SESSION_DIR, stop_process_group, wait_for, write_script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]  # a cold image build takes minutes; cached: ~1 min

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "docker" / "build_image.sh"
PREFECT = str(Path(sys.executable).with_name("prefect"))

TRAIN = """
import os, sys
print("python", sys.version.split()[0], flush=True)
in_container = os.path.exists("/.dockerenv")
for epoch in range(3):
    print(f"epoch {epoch} @loss={1.0 / (epoch + 1):.4f} @acc={80 + 5 * epoch}%", flush=True)
print(f"@in_container={int(in_container)}", flush=True)
"""


def _docker(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def _docker_answers() -> bool:
    try:
        return _docker("info", check=False, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_daemon():
    """A Docker daemon to talk to: the running one, or one started here (and stopped at the end)."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed (apt-get install docker.io)")
    if _docker_answers():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon answers, and this session cannot start one (needs root and dockerd)")
    log_path = SESSION_DIR / "dockerd.log"
    log = log_path.open("ab")
    daemon = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while not _docker_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            with contextlib.suppress(ProcessLookupError):
                daemon.kill()
            pytest.skip(f"dockerd could not start here; its log ends:\n{tail}")
        time.sleep(0.5)
    yield
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=30)
    except subprocess.TimeoutExpired:
        daemon.kill()


@pytest.fixture(scope="session")
def cq_image(docker_daemon) -> str:
    """The cq-prefect image for this checkout (built once per source hash; a cached build takes ~1 s)."""
    started = time.monotonic()
    build = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1400,
                           stdin=subprocess.DEVNULL)
    assert build.returncode == 0, f"docker/build_image.sh failed:\n{build.stderr[-4000:]}"
    image = build.stdout.strip().splitlines()[-1]
    print(f"\nimage {image} ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return image


@pytest.fixture(scope="module")
def docker_pool(stack, cq_image, tmp_path_factory):
    """A cq-docker pool on the session's stack, served by a real `prefect worker start --type cq-docker`."""
    from prefect.client.orchestration import get_client

    from cq_prefect.deployment import pool_has_workers
    from cq_prefect.docker_worker import ensure_docker_pool

    pool = f"docker-{uuid.uuid4().hex[:6]}"
    ensure_docker_pool(pool, cq_image)
    log_path = tmp_path_factory.mktemp("docker-worker") / "worker.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--type", "cq-docker", "--pool", pool, "--name", f"{pool}-worker"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"},
    )
    log.close()

    def online():
        assert worker.poll() is None, f"the cq-docker worker exited:\n{log_path.read_text()[-3000:]}"
        with get_client(sync_client=True) as client:
            return pool_has_workers(client, pool)

    started = time.monotonic()
    wait_for(online, timeout=90, interval=0.5, what=f"a cq-docker worker online in pool {pool}")
    print(f"cq-docker worker online in {time.monotonic() - started:.1f} s", file=sys.stderr)
    yield pool, log_path
    stop_process_group(worker)
    leftovers = _docker("ps", "-aq", "--filter", f"label=io.prefect.work-pool-name={pool}", check=False).stdout.split()
    if leftovers:
        _docker("rm", "-f", *leftovers, check=False)


def _diagnosis(handle, log_path: Path) -> str:
    """What to read when a run went wrong: its state, the container's output, the worker's log."""
    found = _docker("ps", "-aq", "--filter", f"label=io.prefect.flow-run-id={handle.flow_run_id}", check=False)
    ids = found.stdout.split()
    logs = _docker("logs", "--tail", "60", ids[0], check=False) if ids else None
    output = (logs.stdout + logs.stderr) if logs else "(no container)"
    return f"state {handle.state()}\ncontainer output:\n{output[-4000:]}\nworker log:\n{log_path.read_text()[-3000:]}"


def _container_of(flow_run_id: str) -> dict:
    """`docker inspect` of the container the worker made for a flow run."""
    ids = _docker("ps", "-aq", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}").stdout.split()
    assert len(ids) == 1, f"expected one container for flow run {flow_run_id}, found {ids}"
    return json.loads(_docker("inspect", ids[0]).stdout)[0]


def test_experiment_runs_in_a_container_and_its_metrics_reach_mlflow(docker_pool, cq_image, tmp_path, mlflow_client):
    import cq_prefect

    pool, log_path = docker_pool
    project = tmp_path / "project"
    project.mkdir()
    write_script(project, "train.py", TRAIN)
    handle = cq_prefect.submit(
        name="in-docker", workdir=str(project), command="python train.py", pool=pool, gpu_count=0,
        job_variables={"volumes": [f"{project}:{project}"]},  # the same path inside the container
    )
    try:
        result = handle.wait(timeout=150)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnosis(handle, log_path)}") from exc
    assert result.outcome == "success", f"{result}\n{_diagnosis(handle, log_path)}"

    history = {
        key: sorted((m.step, m.value) for m in mlflow_client.get_metric_history(handle.mlflow_run_id, key))
        for key in ("loss", "acc", "in_container")
    }
    assert history["loss"] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
    assert history["acc"] == [(0, 80.0), (1, 85.0), (2, 90.0)]
    assert history["in_container"] == [(0, 1.0)]  # /.dockerenv: it ran in a container, not on the host
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cq.unit.acc"] == "%"

    container = _container_of(handle.flow_run_id)
    assert container["Config"]["Image"] == cq_image
    assert container["HostConfig"]["NetworkMode"] == "host"
    assert not container["HostConfig"].get("DeviceRequests")  # gpu_count 0: no GPU asked for
    assert container["State"]["ExitCode"] == 0
    assert f"{project}:{project}" in container["HostConfig"]["Binds"]


def test_gpu_count_becomes_a_device_request_and_a_host_without_gpus_fails_fast(docker_pool, mlflow_client):
    import cq_prefect

    pool, log_path = docker_pool
    started = time.monotonic()
    # The spec's gpu_count reaches the container on its own; /workspace exists only in the image.
    handle = cq_prefect.submit(
        name="needs-gpu", workdir="/workspace", command="python -c 'print(1)'", pool=pool, gpu_count=1,
        check_workdir=False,
    )
    result = handle.wait(timeout=90)
    assert result.outcome in ("crashed", "failed"), f"{result}\n{_diagnosis(handle, log_path)}"
    assert time.monotonic() - started < 90
    assert "GPU" in (result.message or "") and "gpu_count=0" in result.message, result.message

    container = _container_of(handle.flow_run_id)
    requests = container["HostConfig"]["DeviceRequests"]
    assert len(requests) == 1
    assert requests[0]["Count"] == 1 and requests[0]["Capabilities"] == [["gpu"]]
    assert container["State"]["Status"] == "created"  # Docker refused to start it

    run = mlflow_client.get_run(handle.mlflow_run_id)  # closed by the worker: nothing waits for it
    assert run.info.status == "FAILED"
    assert run.data.tags["cq.outcome"] == "crashed" and "GPU" in run.data.tags["cq.error"]


def test_flow_run_job_variable_overrides_the_spec_gpu_count_in_the_create_arguments(stack, docker_daemon):
    import asyncio

    import docker
    from prefect.client.schemas.objects import FlowRun

    from cq_prefect.docker_worker import CqDockerJobConfiguration, CqDockerWorker, docker_pool_template

    template = docker_pool_template("cq-prefect:any")

    def settings(job_variables: dict, spec_gpus: int) -> dict:
        config = asyncio.run(CqDockerJobConfiguration.from_template_and_values(template, job_variables))
        flow_run = FlowRun(flow_id=uuid.uuid4(), name="probe", job_variables=job_variables,
                           parameters={"spec": {"gpu_count": spec_gpus}})
        config.prepare_for_flow_run(flow_run)
        client = docker.from_env()  # asked for its version only (extra_hosts); nothing is created
        try:
            return CqDockerWorker(work_pool_name="unused")._build_container_settings(client, config)
        finally:
            client.close()

    assert "device_requests" not in settings({}, 0)
    assert settings({}, 3)["device_requests"] == [docker.types.DeviceRequest(count=3, capabilities=[["gpu"]])]
    assert settings({"gpu_count": 2}, 3)["device_requests"][0]["Count"] == 2
    assert "device_requests" not in settings({"gpu_count": 0}, 3)
    env = settings({}, 0)["environment"]
    assert env["MLFLOW_TRACKING_URI"] == stack.mlflow_tracking_uri  # forwarded from the worker's host


def test_bad_gpu_count_is_refused_with_the_fix(stack):
    from pydantic import ValidationError

    from cq_prefect.docker_worker import CqDockerJobConfiguration, docker_pool_template, ensure_docker_pool
    from cq_prefect.errors import BadInput

    with pytest.raises(BadInput, match=r"gpu_count must be a whole number from 0 to 64.*use 0 for a CPU-only run"):
        docker_pool_template("cq-prefect:any", gpu_count=-1)
    with pytest.raises(BadInput, match="image is empty; build one with docker/build_image.sh"):
        docker_pool_template("")
    for bad in (-1, 65, 1.5, "two"):
        with pytest.raises(ValidationError, match="gpu_count must be a whole number"):
            CqDockerJobConfiguration(image="x", gpu_count=bad)
    assert CqDockerJobConfiguration(image="x", gpu_count="2").gpu_count == 2
    with pytest.raises(BadInput, match=r"work pool 'local' exists with type .*prefect work-pool delete local"):
        ensure_docker_pool("local", "cq-prefect:any")  # the stack's own pool is not a Docker pool


def test_bad_gpu_count_job_variable_is_rejected_by_the_server(docker_pool, mlflow_client):
    import cq_prefect

    pool, _ = docker_pool
    with pytest.raises(Exception, match=r"gpu_count.*-1 is less than the minimum of 0"):
        cq_prefect.submit(name="bad", workdir="/workspace", command="true", pool=pool, check_workdir=False,
                          job_variables={"gpu_count": -1})


def test_worker_type_is_found_by_prefect_and_import_stays_cheap():
    # What `prefect worker start --type cq-docker` does: Prefect first, then its collections (this package).
    lookup = (
        "from prefect.workers.base import BaseWorker; "
        "print(BaseWorker.get_worker_class_from_type('cq-docker').__name__)"
    )
    found = subprocess.run([sys.executable, "-c", lookup], capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["CqDockerWorker"], found.stderr
    cheap = "import sys, cq_prefect; print('prefect' in sys.modules, 'docker' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", cheap], capture_output=True, text=True, timeout=60)
    assert output.stdout.split() == ["False", "False"], output.stderr
