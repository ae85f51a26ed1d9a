"""The command starts as the warm engine forks (cq_prefect.prestart): nothing lost, nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from conftest import CQ, PYTHON, pid_alive, stop_process_group, wait_for, write_script

from cq_prefect import prestart
from cq_prefect.spec import ExperimentSpec


def test_lines_added_while_attaching_keep_their_order():
    buffer = prestart.LineBuffer()
    seen: list[str] = []
    total = 20_000

    def produce():
        for i in range(total):
            buffer.add("stdout", str(i))

    producer = threading.Thread(target=produce)
    producer.start()
    while not buffer.held():
        pass
    buffer.attach(lambda stream, line: seen.append(line))  # mid-stream
    producer.join()
    assert seen == [str(i) for i in range(total)]


def test_the_command_gets_the_flows_environment_without_the_engines_own_variables():
    spec = ExperimentSpec(name="x", workdir="/tmp", command="true", env={"EXTRA": "1", "HOME": "/elsewhere"})
    base = {"HOME": "/root", "PATH": "/bin", prestart.ENV: "{}", "PREFECT__CONTROL_PORT": "1",
            "PREFECT__CONTROL_TOKEN": "t", "PREFECT__FLOW_RUN_ID": "f"}
    env = prestart.command_environment(spec, tracking_uri="http://m", mlflow_run_id="r", exp_id="e", base=base)
    assert env == {"HOME": "/elsewhere", "PATH": prestart.interpreter_first("/bin"), "PREFECT__FLOW_RUN_ID": "f", "EXTRA": "1",
                   "MLFLOW_TRACKING_URI": "http://m", "MLFLOW_RUN_ID": "r", "CQ_EXP_ID": "e", "PYTHONUNBUFFERED": "1"}


# ---- with the real stack ----------------------------------------------------------------------------


def _forkservers_of(pid: int) -> list[str]:
    """Socket paths of the warm engines (cq_prefect.forkserver) started by process ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"cq_prefect.forkserver" in argv:
            found.append(argv[argv.index(b"cq_prefect.forkserver") + 1].decode())
    return found


@pytest.fixture
def warm_worker(stack, tmp_path):
    """A pool of its own, served by a cq-gpu worker whose warm engine is ready."""
    pool = f"warm-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([CQ, "worker", "start", "--pool", pool, "--gpus", "0"], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "started!" in log.read_text() or proc.poll() is not None, 90, what="worker start")
        assert proc.poll() is None, log.read_text()
        wait_for(lambda: any(os.path.exists(p) for p in _forkservers_of(proc.pid)), 90, what="the warm engine")
        yield pool
    finally:
        stop_process_group(proc, timeout=30)


def _run_logs(prefect_client, flow_run_id: str) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    return prefect_client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])),
        sort=LogSort.TIMESTAMP_ASC, limit=200)


@pytest.mark.e2e
@pytest.mark.prefect_db
def test_lines_printed_before_the_flow_adopts_the_command_all_arrive_in_order(warm_worker, workdir, prefect_client,
                                                                             mlflow_client):
    import cq_prefect
    from cq_prefect.experiment import STARTED_AT_CLAIM

    lines = 3000  # printed at once: all of them before the engine gets to the flow
    write_script(workdir, "burst.py", f"""
        for i in range({lines}):
            print(f"line {{i}} @step={{i}} @x={{i * 0.5}}")
    """)
    handle = cq_prefect.submit(name="burst", workdir=str(workdir), command=f"{PYTHON} burst.py", pool=warm_worker)
    result = handle.wait(timeout=120)
    assert result.outcome == "success"
    logs = _run_logs(prefect_client, handle.flow_run_id)
    assert any(STARTED_AT_CLAIM in log.message for log in logs)  # it did start with the engine
    printed = [line for log in logs for line in log.message.split("\n") if line.startswith("line ")]
    assert printed == [f"line {i} @step={i} @x={i * 0.5}" for i in range(lines)]
    history = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(handle.mlflow_run_id, "x"))
    assert history == [(i, i * 0.5) for i in range(lines)]
    assert result.metrics["x"].count == lines


@pytest.mark.e2e
@pytest.mark.prefect_db
def test_a_command_whose_flow_never_starts_is_killed_and_its_run_closed(stack, workdir, tmp_path, prefect_client,
                                                                      mlflow_client):
    """The run is cancelled between the claim and the flow: the engine refuses to run it, and the command it
    had already started (with a grandchild) must not outlive it."""
    import cq_prefect
    from prefect.states import Cancelling, Pending

    from cq_prefect.deployment import EXPERIMENT_ENTRYPOINT
    from cq_prefect.gpu_worker import CqGpuWorker

    pids = tmp_path / "pids"
    # Plain shell, so it has printed and recorded its pids within milliseconds; the engine needs far longer
    # (settings, the flow run read, the Running proposal) before it refuses the run.
    command = f'echo early line; sleep 600 & echo "$$ $!" > {pids}; wait'
    # A run nobody serves (its pool has no worker), cancelled as if right after a claim: the server refuses
    # Running to a Cancelling run (a Cancelled one it would run again).
    handle = cq_prefect.submit(name="never", workdir=str(workdir), command=command,
                               pool=f"nobody-{uuid.uuid4().hex[:6]}")
    flow_run = prefect_client.read_flow_run(uuid.UUID(handle.flow_run_id))
    assert prefect_client.set_flow_run_state(flow_run.id, Pending()).status.value == "ACCEPT"  # the claim
    prefect_client.set_flow_run_state(flow_run.id, Cancelling(), force=True)

    sock = tmp_path / "engine.sock"
    server = subprocess.Popen([PYTHON, "-m", "cq_prefect.forkserver", str(sock), str(os.getpid())],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        env = dict(os.environ, PREFECT__FLOW_RUN_ID=handle.flow_run_id, PREFECT__FLOW_ENTRYPOINT=EXPERIMENT_ENTRYPOINT,
                   CQ_FORKSERVER=str(sock))
        env[prestart.ENV] = CqGpuWorker._prestart_payload(flow_run, env)
        assert json.loads(env[prestart.ENV])["mlflow_run_id"] == handle.mlflow_run_id
        launcher = subprocess.run([PYTHON, "-S", str(Path(prestart.__file__).with_name("launch.py"))], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert pids.exists(), launcher.stderr  # the command did start before the engine refused the run
        script, grandchild = map(int, pids.read_text().split())
        wait_for(lambda: not pid_alive(script) and not pid_alive(grandchild), timeout=30, what="the tree to die")
        run = mlflow_client.get_run(handle.mlflow_run_id)
        assert run.info.status == "KILLED" and run.data.tags["cq.outcome"] == "cancelled"
        assert any("early line" in log.message for log in _run_logs(prefect_client, handle.flow_run_id))
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.e2e
@pytest.mark.prefect_db
def test_a_run_cancelled_before_its_flow_takes_the_command_over_kills_it(stack, workdir, tmp_path, prefect_client,
                                                                       mlflow_client):
    """SIGTERM (the worker cancelling) while the engine is still loading the flow: the command's tree dies,
    its MLflow run ends KILLED, and the engine process dies of the signal as it would without a prestart."""
    import cq_prefect
    from prefect.states import Cancelling, Pending

    from cq_prefect.gpu_worker import CqGpuWorker

    pids = tmp_path / "pids"
    slow = write_script(tmp_path, "slow_flow.py", """
        import time
        time.sleep(120)  # the engine is stuck loading the flow: the command is not adopted yet
        from cq_prefect.experiment import experiment
    """)
    handle = cq_prefect.submit(name="term", workdir=str(workdir), pool=f"nobody-{uuid.uuid4().hex[:6]}",
                               command=f'sleep 600 & echo "$$ $!" > {pids}; wait')
    flow_run = prefect_client.read_flow_run(uuid.UUID(handle.flow_run_id))
    assert prefect_client.set_flow_run_state(flow_run.id, Pending()).status.value == "ACCEPT"  # the claim
    sock = tmp_path / "engine.sock"
    server = subprocess.Popen([PYTHON, "-m", "cq_prefect.forkserver", str(sock), str(os.getpid())],
                              stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    launcher = None
    try:
        assert server.stdout.readline().strip() == "ready"
        env = dict(os.environ, PREFECT__FLOW_RUN_ID=handle.flow_run_id, CQ_FORKSERVER=str(sock),
                   PREFECT__FLOW_ENTRYPOINT="cq_prefect.experiment:experiment")
        env[prestart.ENV] = CqGpuWorker._prestart_payload(flow_run, env)
        env["PREFECT__FLOW_ENTRYPOINT"] = f"{slow}:experiment"
        launcher = subprocess.Popen([PYTHON, "-S", str(Path(prestart.__file__).with_name("launch.py"))], env=env,
                                    cwd=tmp_path, stdin=subprocess.DEVNULL)
        wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=60, what="the command to start")
        script, grandchild = map(int, pids.read_text().split())
        prefect_client.set_flow_run_state(flow_run.id, Cancelling(), force=True)  # what the worker acts on
        launcher.send_signal(15)
        assert launcher.wait(timeout=60) == -15
        wait_for(lambda: not pid_alive(script) and not pid_alive(grandchild), timeout=30, what="the tree to die")
        run = mlflow_client.get_run(handle.mlflow_run_id)
        assert run.info.status == "KILLED" and run.data.tags["cq.outcome"] == "cancelled"
    finally:
        if launcher is not None and launcher.poll() is None:
            launcher.kill()
        server.terminate()
        server.wait(timeout=30)
