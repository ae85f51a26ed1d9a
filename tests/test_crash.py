"""Crash detection end to end: a run whose processes are SIGKILLed becomes Crashed, its MLflow run FAILED.

The worker, the flow-run process and the command are killed at once (as when a host loses power or the
OOM killer strikes); nothing reports. The crash automation notices the missing heartbeats and sets the
run Crashed; ``reap`` replays the run's metrics journal and ends its MLflow run FAILED; a restarted worker
serves the pool again. The test's own automation (5 s heartbeats, 20 s window) is scoped to its runs by a
tag, beside the session's default one (30 s / 90 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import CQ, PYTHON, pid_alive, stop_process_group, wait_for, write_script

pytestmark = [pytest.mark.e2e, pytest.mark.prefect_db]

HEARTBEAT_SECONDS = 5
CRASH_AFTER_SECONDS = 20
STEPS = 40


def test_default_crash_automation_is_stored_once_with_a_window_of_at_most_90_s(stack, prefect_client, monkeypatch, caplog):
    from prefect.events.actions import ChangeFlowRunState

    from cq_prefect.crash import AUTOMATION_NAME, HEARTBEAT_EVENT, crash_automation, ensure_crash_automation

    monkeypatch.delenv("CQ_HEARTBEAT_SECONDS", raising=False)
    monkeypatch.delenv("CQ_CRASH_AFTER_SECONDS", raising=False)
    stored = prefect_client.read_automations_by_name(AUTOMATION_NAME)  # cq up (the stack fixture) made it
    assert len(stored) == 1 and stored[0].enabled
    for automation in (crash_automation(), stored[0]):
        trigger = automation.trigger
        assert timedelta(seconds=60) <= trigger.within <= timedelta(seconds=90)  # ≥ 2 × the 30 s heartbeat
        assert trigger.posture == "Proactive" and trigger.threshold == 1
        assert trigger.after == {HEARTBEAT_EVENT} and trigger.for_each == {"prefect.resource.id"}
        assert {HEARTBEAT_EVENT, "prefect.flow-run.Completed", "prefect.flow-run.Failed"} <= trigger.expect
        (action,) = automation.actions
        assert isinstance(action, ChangeFlowRunState) and action.state.value == "CRASHED" and not action.force
        assert HEARTBEAT_EVENT in action.message
    with caplog.at_level("INFO", logger="cq.crash"):
        again = ensure_crash_automation()  # idempotent: the same automation, not a second one, left as it is
    assert again.id == stored[0].id and len(prefect_client.read_automations_by_name(AUTOMATION_NAME)) == 1
    assert not [r for r in caplog.records if r.name == "cq.crash"], caplog.text
    changed = ensure_crash_automation(crash_after=120)  # a changed setting updates it in place
    assert changed.id == stored[0].id and changed.trigger.within == timedelta(seconds=120)
    assert ensure_crash_automation().trigger.within == timedelta(seconds=90)


def test_reap_with_nothing_to_do_does_not_import_mlflow(stack):
    code = (
        "import sys; from cq_prefect.reaper import reap; "
        f"assert reap('no-such-pool-{uuid.uuid4().hex[:6]}') == []; "
        "assert 'mlflow' not in sys.modules, 'reap imported mlflow'"
    )
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_points_a_killed_process_had_not_sent_are_replayed(stack, tmp_path, mlflow_client):
    """Points in a sink's memory when its process is SIGKILLed (MLflow slow to answer) are in its journal."""
    from cq_prefect.mlflow_sink import journal_paths, replay_spool

    experiment = mlflow_client.create_experiment(f"journal-{uuid.uuid4().hex[:8]}")
    run_id = mlflow_client.create_run(experiment).info.run_id
    spool = tmp_path / "spool"
    script = write_script(tmp_path, "sink.py", f"""
        import threading
        from cq_prefect.metric_syntax import MetricPoint
        from cq_prefect.mlflow_sink import MlflowSink

        class Stuck:  # MLflow that never answers: every point stays in the sink's queue
            def write(self, run_id, points, tags):
                threading.Event().wait()

        sink = MlflowSink({run_id!r}, writer=Stuck(), spool_dir={str(spool)!r})
        for step in range(300):
            sink.put([MetricPoint("loss", 1.0 / (step + 1), step, 1700000000000 + step)], {{"cq.unit.loss": "nats"}} if step == 0 else None)
        print("put", flush=True)
        threading.Event().wait()
    """)
    process = subprocess.Popen([PYTHON, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert process.stdout.readline().strip() == "put"
    finally:
        process.kill()
        process.wait()
    assert replay_spool(run_id, stack.mlflow_tracking_uri, spool, timeout=30) is True
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, "loss"))
    assert history == [(step, 1.0 / (step + 1)) for step in range(300)]
    assert mlflow_client.get_run(run_id).data.tags["cq.unit.loss"] == "nats"
    assert journal_paths(run_id, spool) == []


# -- the whole path: kill -9, Crashed, reaped, worker back --------------------------------------------


def _start_worker(pool: str, name: str, log: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PREFECT_WORKER_QUERY_SECONDS="1",
        CQ_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),  # the flow-run processes inherit the worker's environment
    )
    return subprocess.Popen(
        [CQ, "worker", "start", "--pool", pool, "--name", name, "--gpus", "1"],
        stdin=subprocess.DEVNULL, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def _worker_online(prefect_client, pool: str, name: str, since: datetime) -> bool:
    try:
        workers = prefect_client.read_workers_for_work_pool(pool)
    except Exception:  # the pool is created by the worker as it starts
        return False
    return any(
        w.name == name and str(getattr(w.status, "value", w.status)) == "ONLINE"
        and w.last_heartbeat_time is not None and w.last_heartbeat_time > since
        for w in workers
    )


def _proc_environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _stat(pid: int) -> list[bytes]:
    """Fields after the command name: state, ppid, pgrp, session, …"""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()


def _run_processes(worker_pid: int, mlflow_run_id: str) -> dict[str, set[int]]:
    """The processes of the run and of its worker, by role, found through /proc."""
    marker = f"MLFLOW_RUN_ID={mlflow_run_id}".encode()
    found: dict[str, set[int]] = {"command": set(), "engine": set(), "worker": set()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            fields = _stat(pid)
        except OSError:
            continue
        if int(fields[3]) == worker_pid:  # the worker's session: cq worker, its engine server, launchers
            found["worker"].add(pid)
        if marker in _proc_environ(pid).split(b"\0"):  # the supervisor, the shell, the script
            found["command"].add(pid)
    for pid in list(found["command"]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"supervisor.py" in cmdline:
                found["engine"].add(int(_stat(pid)[1]))  # the flow-run process started the supervisor
        except OSError:
            continue
    return found


@pytest.fixture
def crash_setup(stack, prefect_client, tmp_path):
    """A pool of its own, an automation with a short window for runs tagged for this test, and cleanup."""
    from cq_prefect.crash import ensure_crash_automation

    suffix = uuid.uuid4().hex[:8]
    pool, tag = f"crash-{suffix}", f"crash-test-{suffix}"
    automation = ensure_crash_automation(
        name=f"cq test: crash {suffix}",
        crash_after=CRASH_AFTER_SECONDS,
        heartbeat=HEARTBEAT_SECONDS,
        match_related=[{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}],
    )
    workers: list[subprocess.Popen] = []
    yield pool, tag, workers
    for worker in workers:
        stop_process_group(worker)
    prefect_client.delete_automation(automation.id)


def test_killed_run_is_crashed_reaped_and_its_worker_comes_back(crash_setup, workdir, tmp_path, prefect_client, mlflow_client):
    import cq_prefect
    from cq_prefect.reaper import reap

    pool, tag, workers = crash_setup
    t0 = time.monotonic()
    laps: list[str] = []
    lap = lambda what: laps.append(f"{what} {time.monotonic() - t0:.1f}s")  # noqa: E731
    name = f"{pool}-worker"
    log = tmp_path / "worker.log"
    started = datetime.now(timezone.utc)
    workers.append(_start_worker(pool, name, log))
    wait_for(lambda: _worker_online(prefect_client, pool, name, started), timeout=60, what=f"worker online ({log})")
    lap("worker online")

    marker = tmp_path / "printed"
    write_script(workdir, "train.py", f"""
        import time
        for step in range({STEPS}):
            print(f"epoch {{step}} @step={{step}} @loss={{1.0 / (step + 1):.6f}} @mpjpe={{50 - step * 0.5}}mm", flush=True)
        open({str(marker)!r}, "w").write("done")
        time.sleep(600)
    """)
    handle = cq_prefect.submit(
        name="crash-me", workdir=str(workdir), command=f"{PYTHON} train.py", pool=pool, tags=[tag], gpu_count=1
    )
    wait_for(marker.exists, timeout=60, what=f"the script to print its metrics ({log})")
    lap("printed")
    time.sleep(2)

    processes = _run_processes(workers[0].pid, handle.mlflow_run_id)
    assert processes["command"] and len(processes["engine"]) == 1, processes
    victims = set().union(*processes.values())
    for pid in victims:  # all at once, no signal anyone could catch
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.monotonic()
    workers[0].wait(timeout=10)
    wait_for(lambda: not any(pid_alive(pid) for pid in victims), timeout=10, what="the run's processes to die")
    assert handle.state() == "RUNNING"  # nobody told Prefect

    wait_for(lambda: handle.state() == "CRASHED", timeout=CRASH_AFTER_SECONDS + 40, interval=0.5, what="Crashed")
    detected_after = time.monotonic() - killed_at
    lap("crashed")
    flow_run = prefect_client.read_flow_run(uuid.UUID(handle.flow_run_id))
    assert "cq.experiment.heartbeat" in flow_run.state.message
    assert mlflow_client.get_run(handle.mlflow_run_id).info.status == "RUNNING"  # until reaped

    reaped = reap(pool)
    lap("reaped")
    assert [r.flow_run_id for r in reaped] == [handle.flow_run_id]
    assert reaped[0].replayed  # the dead process left its journal on this host
    assert reap(pool) == []  # idempotent
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["cq.outcome"] == "crashed"
    assert run.data.tags["cq.crash_reason"] == flow_run.state.message
    for key, value in (("loss", lambda s: round(1.0 / (s + 1), 6)), ("mpjpe", lambda s: 50 - s * 0.5)):
        history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(handle.mlflow_run_id, key))
        assert history == [(step, value(step)) for step in range(STEPS)], key  # every point printed before the kill
    assert run.data.tags["cq.unit.mpjpe"] == "mm"

    restarted = datetime.now(timezone.utc)
    workers.append(_start_worker(pool, name, log))
    wait_for(lambda: _worker_online(prefect_client, pool, name, restarted), timeout=60, what=f"worker back ({log})")
    lap("worker back")
    write_script(workdir, "ok.py", 'print("@acc=1.0")\n')
    after = cq_prefect.submit(name="after-crash", workdir=str(workdir), command=f"{PYTHON} ok.py", pool=pool, gpu_count=1)
    assert after.wait(timeout=60).outcome == "success"  # the GPU of the dead run is free again
    lap("second run done")
    print(f"crash detected {detected_after:.1f} s after the kill; " + ", ".join(laps), file=sys.stderr)
