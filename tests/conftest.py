"""One real embedded stack per test session: Prefect server (SQLite), MLflow server (SQLite), a worker.

The environment is set here, at import, before any test module imports Prefect: Prefect reads its
settings once. PREFECT_API_URL / MLFLOW_TRACKING_URI point at this session's own stack, which cq treats
as its local stack (not as external servers) because they match CQ_PREFECT_PORT / CQ_MLFLOW_PORT.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SESSION_DIR = Path(tempfile.mkdtemp(prefix="cq-tests-"))
PREFECT_PORT = free_port()
MLFLOW_PORT = free_port()
os.environ.update(
    CQ_HOME=str(SESSION_DIR / "home"),
    CQ_PREFECT_PORT=str(PREFECT_PORT),
    CQ_MLFLOW_PORT=str(MLFLOW_PORT),
    CQ_POOL="local",
    CQ_KILL_GRACE_SECONDS="3",
    PREFECT_API_URL=f"http://127.0.0.1:{PREFECT_PORT}/api",
    MLFLOW_TRACKING_URI=f"http://127.0.0.1:{MLFLOW_PORT}",
    PREFECT_HOME=str(SESSION_DIR / "prefect-client"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
    PREFECT_WORKER_QUERY_SECONDS="1",
    PYTHONUNBUFFERED="1",
)
for name in ("PREFECT_PROFILE", "PREFECT_UI_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
    os.environ.pop(name, None)

CQ = str(Path(sys.executable).with_name("cq"))
PYTHON = sys.executable


@pytest.fixture(scope="session")
def stack():
    """The session's embedded stack (started once, stopped at the end); yields its Endpoints."""
    from cq_prefect.stack import StackConfig, down, up

    config = StackConfig.from_env()
    endpoints = up(config)
    yield endpoints
    down(config, quiet=True)
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A real git repository with one commit, for experiments to run in."""
    repo = tmp_path / "project"
    repo.mkdir()
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (repo / "README").write_text("test project\n")
    git("add", "README")
    git("commit", "-qm", "init")
    return repo


def write_script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def run_cq(*args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CQ, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def mlflow_client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.mlflow_tracking_uri)


@pytest.fixture
def prefect_client(stack):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def count_all_runs(stack) -> tuple[int, int]:
    """(Prefect flow runs, MLflow runs) on the session's stack."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_runs = client.count_flow_runs()
    mlflow = MlflowClient(stack.mlflow_tracking_uri)
    ids = [e.experiment_id for e in mlflow.search_experiments(view_type=ViewType.ALL)]
    mlflow_runs = len(mlflow.search_runs(ids, run_view_type=ViewType.ALL, max_results=5000)) if ids else 0
    return flow_runs, mlflow_runs
