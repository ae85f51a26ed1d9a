"""One real embedded stack per test session: Prefect server (SQLite), MLflow server (SQLite), a worker.

The environment is set here, at import, before any test module imports Prefect: Prefect reads its
settings once. PREFECT_API_URL / MLFLOW_TRACKING_URI point at this session's own stack, which cq treats
as its local stack (not as external servers) because they match CQ_PREFECT_PORT / CQ_MLFLOW_PORT.

``CQ_TEST_PREFECT_DB=postgres`` puts the session's Prefect server on PostgreSQL instead: a fresh database
(``cq_test_PID_HEX``) is created on the server of ``CQ_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``, a database the user may connect to) and dropped at the end,
also when the session fails. ``make test`` runs the ``prefect_db`` tests a second time this way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
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
    CQ_MLFLOW_ALLOWED_HOSTS="169.254.*",  # the link-local address test_outbound_only's worker uses
)
for name in ("PREFECT_PROFILE", "PREFECT_UI_URL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "CQ_PREFECT_DATABASE_URL",
             # the session's stack runs without auth (tests/test_auth.py starts one with it)
             "CQ_PREFECT_AUTH", "CQ_MLFLOW_AUTH", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
    os.environ.pop(name, None)

PREFECT_DBS = ("sqlite", "postgres")
PREFECT_DB = os.environ.get("CQ_TEST_PREFECT_DB", "sqlite").strip().lower() or "sqlite"
POSTGRES_URL = os.environ.get("CQ_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

CQ = str(Path(sys.executable).with_name("cq"))
PYTHON = sys.executable


def pytest_configure(config):
    if PREFECT_DB not in PREFECT_DBS:
        raise pytest.UsageError(f"CQ_TEST_PREFECT_DB={PREFECT_DB!r}: use one of {', '.join(PREFECT_DBS)}")


def _postgres(statement: str, *args) -> list:
    """Run one statement on the CQ_TEST_POSTGRES_URL server (outside a transaction); returns its rows."""
    import asyncio

    import asyncpg

    async def run() -> list:
        connection = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            return await connection.fetch(statement, *args)
        finally:
            await connection.close()

    try:
        return asyncio.run(run())
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"CQ_TEST_PREFECT_DB=postgres needs PostgreSQL at CQ_TEST_POSTGRES_URL={POSTGRES_URL} ({exc}); "
            "start it, point CQ_TEST_POSTGRES_URL at one, or run without CQ_TEST_PREFECT_DB"
        ) from exc


@contextlib.contextmanager
def prefect_database():
    """Point the session's Prefect server at its database: SQLite under CQ_HOME, or a fresh PostgreSQL one."""
    if PREFECT_DB != "postgres":
        yield
        return
    from sqlalchemy.engine import make_url

    for (name,) in _postgres("SELECT datname FROM pg_database WHERE datname LIKE 'cq\\_test\\_%'"):
        owner = name.split("_")[2]
        if owner.isdigit() and not pid_alive(int(owner)):  # left by a session that was killed
            _postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    name = f"cq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _postgres(f'CREATE DATABASE "{name}"')
    try:
        url = make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", database=name)
        os.environ["CQ_PREFECT_DATABASE_URL"] = url.render_as_string(hide_password=False)
        yield
    finally:
        os.environ.pop("CQ_PREFECT_DATABASE_URL", None)
        _postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def stack():
    """The session's embedded stack (started once, stopped at the end); yields its Endpoints."""
    from cq_prefect.stack import StackConfig, down, up

    with prefect_database():
        config = StackConfig.from_env()
        try:
            yield up(config)
        finally:
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


def stop_process_group(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM the process group ``proc`` leads (started with start_new_session), SIGKILL after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


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
