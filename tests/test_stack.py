"""The embedded stack: status, idempotent up, clear messages for a taken port and a stale pid file."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from conftest import free_port, run_cq


def _isolated_env(tmp_path, **extra) -> dict[str, str]:
    """The environment of a user with no stack: own CQ_HOME and ports, no server URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(CQ_HOME=str(tmp_path / "cqhome"), CQ_PREFECT_PORT=str(free_port()), CQ_MLFLOW_PORT=str(free_port()))
    env.update(extra)
    return env


@pytest.mark.e2e
def test_status_json_reports_urls_and_the_local_worker(stack):
    output = run_cq("status", "--json")
    assert output.returncode == 0, output.stderr
    report = json.loads(output.stdout)
    assert report["prefect_api_url"] == stack.prefect_api_url
    assert report["mlflow_tracking_uri"] == stack.mlflow_tracking_uri
    assert report["prefect_ui_url"] and report["mlflow_ui_url"]
    assert report["prefect_healthy"] and report["mlflow_healthy"]
    assert set(report["processes"]) == {"prefect-server", "mlflow-server", "worker"}
    assert any(w["pool"] == "local" and w["status"] == "ONLINE" for w in report["workers"])


@pytest.mark.e2e
def test_up_again_is_idempotent(stack):
    pids = {name: (os.environ["CQ_HOME"] + f"/run/{name}.pid") for name in ("prefect-server", "mlflow-server", "worker")}
    before = {name: open(path).read() for name, path in pids.items()}
    output = run_cq("up", "--json")
    assert output.returncode == 0, output.stderr
    assert "starting" not in output.stderr
    assert {name: open(path).read() for name, path in pids.items()} == before
    assert json.loads(output.stdout)["prefect_api_url"] == stack.prefect_api_url


def test_taken_port_gives_a_clear_message(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        output = run_cq(
            "up", "--no-worker", "--prefect-port", str(port), "--mlflow-port", str(free_port()),
            env=_isolated_env(tmp_path), timeout=60,
        )
    assert output.returncode == 1
    assert f"port {port} is taken" in output.stderr
    assert "--prefect-port" in output.stderr
    assert not (tmp_path / "cqhome" / "run" / "prefect-server.pid").exists()


def test_stale_pid_file_is_reported_and_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = tmp_path / "cqhome" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "prefect-server.pid").write_text(str(dead.pid))
    output = run_cq("status", env=_isolated_env(tmp_path), timeout=60)
    assert output.returncode == 0
    assert f"removed stale pid file for prefect-server (pid {dead.pid} is not running)" in output.stderr
    assert "DOWN" in output.stdout
    assert not (run_dir / "prefect-server.pid").exists()


def test_down_with_nothing_running(tmp_path):
    output = run_cq("down", env=_isolated_env(tmp_path), timeout=60)
    assert output.returncode == 0
    assert "nothing was running" in output.stderr


def test_external_server_that_does_not_answer_is_named(tmp_path):
    env = _isolated_env(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    output = run_cq("up", "--no-worker", env=env, timeout=60)
    assert output.returncode == 1
    assert "PREFECT_API_URL=" in output.stderr and "does not answer" in output.stderr


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://root@127.0.0.1/cq", ["uses driver 'mysql'", "postgresql+asyncpg", "sqlite+aiosqlite"]),
        ("postgresql://postgres@127.0.0.1:5432/cq", ["(use postgresql+asyncpg://postgres@127.0.0.1:5432/cq)"]),
        ("sqlite+aiosqlite:///relative.db", ["needs an absolute file path"]),
        (f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/cq", ["no PostgreSQL answers at 127.0.0.1:", "start it"]),
    ],
    ids=["other-database", "sync-driver", "relative-sqlite", "unreachable"],
)
def test_bad_prefect_database_url_is_bad_input_and_starts_nothing(tmp_path, url, expected):
    output = run_cq("up", "--no-worker", env=_isolated_env(tmp_path, CQ_PREFECT_DATABASE_URL=url), timeout=60)
    assert output.returncode == 2, output.stderr
    assert "CQ_PREFECT_DATABASE_URL=" in output.stderr and "pw@" not in output.stderr  # the password is masked
    for text in expected:
        assert text in output.stderr
    assert "starting" not in output.stderr
    assert not list((tmp_path / "cqhome" / "run").glob("*.pid"))


@pytest.mark.prefect_db
def test_missing_postgres_database_names_createdb(tmp_path):
    from conftest import PREFECT_DB, POSTGRES_URL

    if PREFECT_DB != "postgres":
        pytest.skip("needs PostgreSQL: runs in the CQ_TEST_PREFECT_DB=postgres pass")
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL).set(drivername="postgresql+asyncpg", database="cq_no_such_db").render_as_string(False)
    output = run_cq("up", "--no-worker", env=_isolated_env(tmp_path, CQ_PREFECT_DATABASE_URL=url), timeout=60)
    assert output.returncode == 2, output.stderr
    assert "database 'cq_no_such_db' does not exist" in output.stderr and "createdb" in output.stderr
    assert not list((tmp_path / "cqhome" / "run").glob("*.pid"))
