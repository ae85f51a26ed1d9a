"""The MLflow sink against a real MLflow server that goes away and comes back: no point is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import PYTHON, free_port, wait_for, write_script

from cq_prefect.metric_syntax import MetricPoint
from cq_prefect.mlflow_sink import MAX_BATCH_ENTITIES, MlflowSink, _batches


class MlflowServer:
    """A private MLflow tracking server (SQLite) that a test can stop and start again on its port."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.process = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.folder / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(self.healthy, timeout=90, what="the MLflow server")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def _new_run(uri: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"sink-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment).info.run_id


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_batches_respect_mlflow_limits_and_keep_order():
    points = [MetricPoint("k", float(i), i, 0) for i in range(2500)]
    items = [(points[i : i + 7], {"cq.unit.k": "mm"} if i == 0 else {}) for i in range(0, 2500, 7)]
    batches = list(_batches(items))
    assert all(len(p) + len(t) <= MAX_BATCH_ENTITIES for p, t in batches)
    assert [p.step for batch, _ in batches for p in batch] == list(range(2500))
    assert batches[0][1] == {"cq.unit.k": "mm"}


def test_points_and_nonfinite_values_arrive(mlflow_server, tmp_path):
    run_id = _new_run(mlflow_server.uri)
    sink = MlflowSink(run_id, mlflow_server.uri, spool_dir=tmp_path / "spool")
    sink.put([MetricPoint("loss", v, i, 1000 + i) for i, v in enumerate([0.5, float("nan"), float("inf"), -float("inf")])])
    sink.put([], {"cq.unit.loss": "nats"})
    assert sink.close(timeout=30)
    values = [v for _, v in _history(mlflow_server.uri, run_id, "loss")]
    assert values[0] == 0.5 and values[1] != values[1] and values[2] > 1e300 and values[3] < -1e300
    from mlflow.tracking import MlflowClient

    assert MlflowClient(mlflow_server.uri).get_run(run_id).data.tags["cq.unit.loss"] == "nats"


def test_mlflow_down_mid_stream_spools_then_replays_every_point(mlflow_server, tmp_path):
    run_id = _new_run(mlflow_server.uri)
    spool_dir = tmp_path / "spool"
    sink = MlflowSink(run_id, mlflow_server.uri, spool_dir=spool_dir, retry_interval=0.3)
    for step in range(500):
        sink.put([MetricPoint("a", float(step), step, 1000 + step)])
    assert sink.flush(timeout=30)
    mlflow_server.stop()
    for step in range(500, 1500):  # the producer never waits while MLflow is away
        sink.put([MetricPoint("a", float(step), step, 1000 + step)])
    wait_for(lambda: sink.spooled, timeout=30, what="points to be spooled")
    assert (spool_dir / f"{run_id}.jsonl").exists()
    mlflow_server.start()
    for step in range(1500, 2000):
        sink.put([MetricPoint("a", float(step), step, 1000 + step)])
    assert sink.close(timeout=60)
    assert _history(mlflow_server.uri, run_id, "a") == [(s, float(s)) for s in range(2000)]
    assert not (spool_dir / f"{run_id}.jsonl").exists()


def test_spool_left_by_a_dead_process_is_replayed_by_the_next_sink(mlflow_server, tmp_path):
    run_id = _new_run(mlflow_server.uri)
    spool_dir = tmp_path / "spool"
    mlflow_server.stop()
    first = MlflowSink(run_id, mlflow_server.uri, spool_dir=spool_dir, retry_interval=0.3)
    first.put([MetricPoint("b", float(i), i, 5000 + i) for i in range(300)])
    assert not first.close(timeout=2)  # MLflow is away: the points stay on disk
    assert (spool_dir / f"{run_id}.jsonl").exists()
    mlflow_server.start()
    second = MlflowSink(run_id, mlflow_server.uri, spool_dir=spool_dir)
    assert second.close(timeout=60)
    assert _history(mlflow_server.uri, run_id, "b") == [(i, float(i)) for i in range(300)]


@pytest.mark.e2e
def test_experiment_survives_mlflow_restart_mid_run(stack, mlflow_server, workdir, monkeypatch):
    """The experiment flow (in this process, on the session's Prefect server) with its own MLflow server,
    which is stopped while the script prints and restarted later: every point is in MLflow afterwards."""
    from cq_prefect.experiment import experiment
    from cq_prefect.spec import ExperimentSpec

    write_script(workdir, "steady.py", """
        import time
        for step in range(80):
            print(f"@step={step} @loss={1.0 / (step + 1):.6f} @acc={step / 80:.4f}", flush=True)
            time.sleep(0.1)
    """)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)

    def outage():
        time.sleep(2.5)
        mlflow_server.stop()
        time.sleep(3)
        mlflow_server.start()

    chaos = threading.Thread(target=outage)
    chaos.start()
    result = experiment(ExperimentSpec(name="outage", workdir=str(workdir), command=f"{PYTHON} steady.py"))
    chaos.join()
    assert result.outcome == "success"
    assert result.metrics["loss"].count == 80
    assert _history(mlflow_server.uri, result.mlflow_run_id, "loss") == [(s, round(1.0 / (s + 1), 6)) for s in range(80)]
    assert len(_history(mlflow_server.uri, result.mlflow_run_id, "acc")) == 80
