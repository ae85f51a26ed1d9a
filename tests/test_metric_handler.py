"""MetricLogHandler: records → points in MLflow, bad tokens warned once, and set up from logging config."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from cq_prefect.metric_handler import MetricLogHandler
from cq_prefect.mlflow_sink import MlflowSink

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_id(mlflow_client):
    experiment = mlflow_client.create_experiment(f"handler-{uuid.uuid4().hex[:8]}")
    return mlflow_client.create_run(experiment).info.run_id


@pytest.mark.e2e
def test_multiline_records_become_points_with_units_and_one_warning_per_key(stack, mlflow_client, run_id, tmp_path):
    warnings: list[str] = []
    sink = MlflowSink(run_id, stack.mlflow_tracking_uri, spool_dir=tmp_path)
    handler = MetricLogHandler(sink=sink, on_bad_token=warnings.append)
    logger = logging.getLogger(f"test.handler.{run_id}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("epoch 0 @loss=0.9 @mpjpe=48.5mm\nepoch 1 @loss=0.7 @mpjpe=40mm\r@lr=abc")
    logger.warning("@step=7 @loss=0.5 @lr=xyz @mpjpe=39cm")
    logger.warning("no metrics, user@host=5")
    assert sink.close(timeout=30)
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "loss"))
    assert history == [(0, 0.9), (1, 0.7), (7, 0.5)]
    tags = mlflow_client.get_run(run_id).data.tags
    assert tags["cq.unit.mpjpe"] == "mm"  # the first unit seen is kept
    assert len(warnings) == 1 and '"@lr=abc"' in warnings[0]
    assert handler.parser.bad_token_counts == {"lr": 2}


def test_handler_never_raises_into_the_logging_call(tmp_path):
    class Broken:
        def put(self, points, tags=None):
            raise RuntimeError("sink down")

    handler = MetricLogHandler(sink=Broken())
    handler.handleError = lambda record: setattr(handler, "errored", True)
    logging.getLogger("test.handler.broken").addHandler(handler)
    logging.getLogger("test.handler.broken").error("@x=1")
    assert handler.errored


@pytest.mark.e2e
def test_python_flow_with_log_prints_gets_metrics_from_logging_config(stack, mlflow_client, tmp_path):
    """PREFECT_LOGGING_SETTINGS_PATH=deployments/logging.yml: a plain flow's prints become MLflow metrics."""
    script = tmp_path / "plain_flow.py"
    script.write_text(
        "from prefect import flow\n"
        "@flow(log_prints=True)\n"
        "def plain():\n"
        "    for i in range(5):\n"
        "        print(f'iteration {i} @loss={1 / (i + 1):.3f} @acc={i * 10}%')\n"
        "    return 'ok'\n"
        "if __name__ == '__main__':\n"
        "    state = plain(return_state=True)\n"
        "    print('FLOW_RUN_ID', state.state_details.flow_run_id)\n"
    )
    env = dict(os.environ, PREFECT_LOGGING_SETTINGS_PATH=str(ROOT / "deployments" / "logging.yml"),
               CQ_MLFLOW_EXPERIMENT="plain-flows")
    output = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert output.returncode == 0, output.stderr
    flow_run_id = next(line.split()[1] for line in output.stdout.splitlines() if line.startswith("FLOW_RUN_ID"))
    from cq_prefect.tracking import find_run

    run = find_run(mlflow_client, "cq.prefect.flow_run_id", flow_run_id, ["plain-flows"])
    assert run is not None
    assert sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run.info.run_id, "loss")) == [
        (0, 1.0), (1, 0.5), (2, 0.333), (3, 0.25), (4, 0.2)
    ]
    assert run.data.tags["cq.unit.acc"] == "%"
    assert mlflow_client.get_run(run.info.run_id).info.status == "FINISHED"
