"""The Prefect server goes away for 30 s while an experiment runs, then comes back on the same port and
database: the experiment completes with every output line in its run log and every point in MLflow, and
the worker carries on (same process) and runs the next experiment."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from conftest import PYTHON, pid_alive, wait_for, write_script

pytestmark = [pytest.mark.e2e, pytest.mark.prefect_db]

LINES = 90  # one every 0.5 s: ~45 s
OUTAGE_SECONDS = 30

COUNT = f"""
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
for i in range({LINES}):
    print(f"line {{i:03d}} of {LINES} @x={{i}} @step={{i}}", flush=True)
    time.sleep(0.5)
"""


def _run_log(client, flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs, offset = [], 0
    while True:
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])),
            limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC,
        )
        logs += page
        offset += len(page)
        if len(page) < 200:
            return [line for log in logs for line in log.message.splitlines()]


def test_experiment_and_worker_survive_the_prefect_server_being_away(stack, workdir, tmp_path, mlflow_client):
    import cq_prefect
    from prefect.client.orchestration import get_client

    from cq_prefect.stack import StackConfig, read_pid, start_prefect, stop_service

    config = StackConfig.from_env()
    worker_pid = read_pid(config, "worker")
    assert worker_pid and pid_alive(worker_pid)
    write_script(workdir, "count.py", COUNT)
    started = tmp_path / "started"
    handle = cq_prefect.submit(name="server-away", workdir=str(workdir), command=f"{PYTHON} count.py {started}")
    wait_for(lambda: started.exists() and started.read_text(), timeout=60, what="the script to start")
    time.sleep(2)

    away_from = time.monotonic()
    assert stop_service(config, "prefect-server")
    try:
        time.sleep(OUTAGE_SECONDS)
    finally:  # the rest of the session needs its server back, whatever happens here
        start_prefect(config)
    print(f"Prefect server away for {time.monotonic() - away_from:.1f} s (stop and restart included)")

    wait_for(lambda: handle.state() in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), timeout=120,
             interval=1, what="the experiment to end")
    assert handle.state() == "COMPLETED"
    expected = [f"line {i:03d} of {LINES} @x={i} @step={i}" for i in range(LINES)]
    with get_client(sync_client=True) as client:  # the run is Completed only after its lines were taken
        lines = set(_run_log(client, handle.flow_run_id))
    missing = [i for i, line in enumerate(expected) if line not in lines]
    assert not missing, f"{len(missing)} output lines are not in the run log, e.g. {missing[:10]}"
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(handle.mlflow_run_id, "x"))
    assert history == [(i, float(i)) for i in range(LINES)]
    assert mlflow_client.get_run(handle.mlflow_run_id).info.status == "FINISHED"

    assert read_pid(config, "worker") == worker_pid and pid_alive(worker_pid), "the worker was restarted"
    write_script(workdir, "after.py", 'print("after the outage @y=1")\n')
    after = cq_prefect.submit(name="after-outage", workdir=str(workdir), command=f"{PYTHON} after.py")
    result = after.wait(timeout=90)
    assert result.outcome == "success" and after.state() == "COMPLETED"
    assert pid_alive(worker_pid)
    worker_log = config.log_file("worker").read_text(errors="replace")
    assert after.flow_run_id in worker_log, "the second experiment did not run on the same worker"
