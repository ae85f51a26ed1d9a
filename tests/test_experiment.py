"""End to end: experiments submitted to the session's stack, run by the real worker, checked in MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from conftest import PYTHON, pid_alive, run_cq, wait_for, write_script

pytestmark = [pytest.mark.e2e, pytest.mark.prefect_db]

TRAIN = """
import sys
print("starting", flush=True)
for epoch in range(4):
    print(f"epoch {epoch} @loss={1.0 / (epoch + 1):.4f} @mpjpe={48 - 2 * epoch}mm", flush=True)
print("@step=10 @val/acc=95% @lr=abc", flush=True)
print("@lr=def user@host=5 a@b.com", flush=True)
for i in range(3):
    sys.stderr.write(f"progress {i}/3 @bar={i}\\r")
    sys.stderr.flush()
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def finished(stack, tmp_path_factory):
    """One successful experiment in a git repository, shared by the checks below."""
    import cq_prefect
    import subprocess as sp

    repo = tmp_path_factory.mktemp("repo")
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "t@e.com"], ["config", "user.name", "t"]):
        sp.run(["git", *args], cwd=repo, check=True)
    write_script(repo, "train.py", TRAIN)
    sp.run(["git", "add", "train.py"], cwd=repo, check=True)
    sp.run(["git", "commit", "-qm", "train"], cwd=repo, check=True)
    commit = sp.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    handle = cq_prefect.submit(
        name="e2e-success",
        workdir=str(repo),
        command=f"{PYTHON} train.py",
        exp_id=f"exp-{uuid.uuid4().hex[:6]}",
        params={"lr": 0.1, "backbone": "mlp"},
        tags=["suite=e2e", "baseline"],
        env={"CQ_TEST_ENV": "yes"},
    )
    result = handle.wait(timeout=120)
    return handle, result, commit


def test_success_metrics_reach_mlflow_with_keys_values_steps_units(finished, mlflow_client):
    handle, result, _ = finished
    assert result.outcome == "success" and result.exit_code == 0
    history = {
        key: [(m.step, m.value) for m in sorted(mlflow_client.get_metric_history(handle.mlflow_run_id, key), key=lambda m: m.step)]
        for key in ("loss", "mpjpe", "val/acc", "bar")
    }
    assert history["loss"] == [(0, 1.0), (1, 0.5), (2, 0.3333), (3, 0.25)]
    assert history["mpjpe"] == [(0, 48.0), (1, 46.0), (2, 44.0), (3, 42.0)]
    assert history["val/acc"] == [(10, 95.0)]
    assert history["bar"] == [(0, 0.0), (1, 1.0), (2, 2.0)]  # \r-separated progress segments are lines
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert "lr" not in run.data.metrics and "host" not in run.data.metrics
    assert run.data.tags["cq.unit.mpjpe"] == "mm"
    assert run.data.tags["cq.unit.val/acc"] == "%"
    assert result.metrics["mpjpe"].final == 42.0 and result.metrics["mpjpe"].min == 42.0
    assert result.metrics["mpjpe"].count == 4 and result.metrics["mpjpe"].unit == "mm"


def test_success_mlflow_run_is_tagged_and_finished(finished, mlflow_client):
    handle, _, commit = finished
    run = mlflow_client.get_run(handle.mlflow_run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "e2e-success"
    assert tags["cq.exp_id"] == handle.exp_id
    assert tags["cq.prefect.flow_run_id"] == handle.flow_run_id
    assert tags["cq.prefect.flow_run_url"].endswith(f"/runs/flow-run/{handle.flow_run_id}")
    assert tags["cq.git.commit"] == commit and tags["cq.git.dirty"] == "false"
    assert tags["cq.host"] and "cq.gpu_ids" in tags
    assert tags["suite"] == "e2e" and tags["baseline"] == "true"
    assert tags["cq.outcome"] == "success" and tags["cq.exit_code"] == "0"
    assert run.data.params == {"lr": "0.1", "backbone": "mlp"}
    artifacts = [a.path for a in mlflow_client.list_artifacts(handle.mlflow_run_id)]
    assert "output.log" in artifacts and "cq_result.json" in artifacts


def test_child_gets_mlflow_and_exp_environment(stack, workdir):
    import cq_prefect

    write_script(workdir, "env.py", """
        import os
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "CQ_EXP_ID", "EXTRA"):
            print(f"{name}={os.environ.get(name)}")
    """)
    handle = cq_prefect.submit(name="env", workdir=str(workdir), command=f"{PYTHON} env.py", env={"EXTRA": "1"})
    handle.wait(timeout=120)
    output = run_cq("watch", handle.flow_run_id)
    assert f"MLFLOW_TRACKING_URI={stack.mlflow_tracking_uri}" in output.stdout
    assert f"MLFLOW_RUN_ID={handle.mlflow_run_id}" in output.stdout
    assert f"CQ_EXP_ID={handle.exp_id}" in output.stdout
    assert "EXTRA=1" in output.stdout


def test_flow_logs_hold_every_line_and_a_bad_token_warning_once(finished, prefect_client):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    handle, _, _ = finished
    logs = prefect_client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(handle.flow_run_id)])), limit=200
    )
    text = "\n".join(log.message for log in logs)
    for line in ("starting", "epoch 3 @loss=0.2500 @mpjpe=42mm", "@lr=def user@host=5 a@b.com", "progress 2/3 @bar=2", "done"):
        assert line in text
    warnings = [log.message for log in logs if log.level == 30 and "Ignored metric token" in log.message]
    assert len(warnings) == 1 and '"@lr=abc"' in warnings[0]


def test_watch_replays_a_finished_run(finished):
    handle, _, _ = finished
    output = run_cq("watch", handle.exp_id)
    assert output.returncode == 0, output.stderr
    prefix = f"[job-{handle.flow_run_id.replace('-', '')[:6]}]"
    assert f"{prefix} epoch 0 @loss=1.0000 @mpjpe=48mm" in output.stdout
    assert f"{prefix} done" in output.stdout
    assert f"{prefix} metrics:" in output.stdout and "mpjpe=42mm" in output.stdout
    assert output.stdout.rstrip().endswith(f"{prefix} Completed")


def test_metrics_json_with_history(finished):
    handle, _, _ = finished
    output = run_cq("metrics", handle.flow_run_name, "--json", "--history")
    assert output.returncode == 0, output.stderr
    metrics = json.loads(output.stdout)
    assert metrics["mpjpe"] == {
        "final": 42.0, "min": 42.0, "max": 48.0, "count": 4, "unit": "mm",
        "history": [[0, 48.0], [1, 46.0], [2, 44.0], [3, 42.0]],
    }
    assert metrics["val/acc"]["unit"] == "%"


def test_a_child_whose_parent_task_run_never_reaches_the_server_runs_unnested(stack, workdir, prefect_client,
                                                                             monkeypatch, caplog):
    """submit() waits for a parent task run the server has not recorded yet (several API servers record
    task runs through Redis, a second late); one that never arrives costs only the nesting in the UI."""
    import uuid

    from cq_prefect import submission

    monkeypatch.setattr(submission, "PARENT_WAIT_SECONDS", 0.5)
    missing = uuid.uuid4()
    handle = submission.submit(name="orphan", workdir=str(workdir), command="true", parent_task_run_id=missing)
    assert prefect_client.read_flow_run(uuid.UUID(handle.flow_run_id)).parent_task_run_id is None
    assert f"task run {missing} is not on the server after 0.5 s" in caplog.text
    assert handle.wait(timeout=120).outcome == "success"


def test_failure_reports_exit_code_and_last_20_lines(stack, workdir, mlflow_client):
    import cq_prefect

    write_script(workdir, "fail.py", """
        import sys
        for i in range(30):
            print(f"line {i:02d}")
        print("@loss=0.5")
        sys.exit(3)
    """)
    handle = cq_prefect.submit(name="fails", workdir=str(workdir), command=f"{PYTHON} fail.py")
    result = handle.wait(timeout=120)
    assert handle.state() == "FAILED"
    assert result.outcome == "failed" and result.exit_code == 3
    assert "exited with code 3" in result.message
    assert "line 11" in result.message and "line 29" in result.message and "line 10" not in result.message
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.metrics["loss"] == 0.5
    watched = run_cq("watch", handle.exp_id)
    assert watched.returncode == 1 and "line 29" in watched.stdout


def test_timeout_kills_the_whole_tree(stack, workdir, tmp_path, mlflow_client):
    import cq_prefect

    pids = tmp_path / "pids"
    write_script(workdir, "hang.py", f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(f"{{child.pid}}\\n")
        print("@step=1 @loss=1.0", flush=True)
        time.sleep(600)
    """)
    started = time.monotonic()
    handle = cq_prefect.submit(name="hangs", workdir=str(workdir), command=f"{PYTHON} hang.py", timeout=3)
    result = handle.wait(timeout=120)
    assert time.monotonic() - started < 60
    assert result.outcome == "timeout"
    assert "timed out after 3 s" in result.message
    grandchild = int(pids.read_text())
    wait_for(lambda: not pid_alive(grandchild), timeout=10, what="the grandchild to die")
    assert mlflow_client.get_run(handle.mlflow_run_id).info.status == "FAILED"


def test_cancellation_kills_the_whole_tree(stack, workdir, tmp_path, prefect_client, mlflow_client):
    import cq_prefect
    from prefect.states import Cancelling

    pids = tmp_path / "pids"
    write_script(workdir, "long.py", f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}\\n")
        for i in range(600):
            print(f"@loss={{i}}", flush=True)
            time.sleep(1)
    """)
    handle = cq_prefect.submit(name="cancel-me", workdir=str(workdir), command=f"{PYTHON} long.py")
    wait_for(lambda: pids.exists() and pids.read_text().strip(), timeout=90, what="the script to start")
    script_pid, grandchild = map(int, pids.read_text().split())
    prefect_client.set_flow_run_state(uuid.UUID(handle.flow_run_id), Cancelling(), force=True)
    wait_for(lambda: handle.state() == "CANCELLED", timeout=90, what="the run to be cancelled")
    wait_for(lambda: not pid_alive(script_pid) and not pid_alive(grandchild), timeout=30, what="the tree to die")
    wait_for(
        lambda: mlflow_client.get_run(handle.mlflow_run_id).info.status == "KILLED", timeout=30,
        what="the MLflow run to be KILLED",
    )


def test_submit_watch_json_exit_code_is_the_outcome(stack, workdir):
    write_script(workdir, "ok.py", 'print("hello @acc=0.9")\n')
    output = run_cq(
        "submit", "--name", "cli", "--workdir", str(workdir), "--command", f"{PYTHON} ok.py",
        "--param", "lr=0.1", "--tag", "cli", "--watch", "--json",
    )
    assert output.returncode == 0, output.stderr
    ids = json.loads(output.stdout.strip().splitlines()[-1])
    assert set(ids) == {"flow_run_id", "flow_run_name", "exp_id", "mlflow_run_id"}
    assert "hello @acc=0.9" in output.stderr  # the watched lines go to stderr when --json owns stdout

    write_script(workdir, "bad.py", "import sys; print('boom'); sys.exit(7)\n")
    failed = run_cq("submit", "--name", "cli-fail", "--workdir", str(workdir), "--command", f"{PYTHON} bad.py", "--watch")
    assert failed.returncode == 1
    assert "boom" in failed.stdout and "Failed" in failed.stdout


def test_prefect_deployment_run_with_a_spec_parameter(stack, workdir, mlflow_client):
    write_script(workdir, "dep.py", 'print("@score=7.5")\n')
    spec = {"name": "from-prefect-cli", "workdir": str(workdir), "command": f"{PYTHON} dep.py", "exp_id": f"exp-{uuid.uuid4().hex[:6]}"}
    prefect = str(__import__("pathlib").Path(sys.executable).with_name("prefect"))
    output = subprocess.run(
        [prefect, "deployment", "run", "experiment/local", "--params", json.dumps({"spec": spec}), "--watch",
         "--watch-interval", "1"],
        capture_output=True, text=True, timeout=180,
    )
    assert output.returncode == 0, output.stdout + output.stderr
    from cq_prefect.tracking import find_run

    run = wait_for(lambda: find_run(mlflow_client, "cq.exp_id", spec["exp_id"]), timeout=30, what="the MLflow run")
    assert run.data.metrics["score"] == 7.5 and run.info.status == "FINISHED"


def test_prefect_yaml_deploys_the_same_deployment(stack, prefect_client):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    prefect = str(__import__("pathlib").Path(sys.executable).with_name("prefect"))
    output = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"], cwd=root, capture_output=True, text=True, timeout=180,
    )
    assert output.returncode == 0, output.stdout + output.stderr
    deployment = prefect_client.read_deployment_by_name("experiment/local")
    assert deployment.entrypoint == "cq_prefect.experiment:experiment"
    assert deployment.pull_steps == [] and deployment.work_pool_name == "local"
    assert deployment.enforce_parameter_schema
    assert "spec" in deployment.parameter_openapi_schema["properties"]


def test_workdir_missing_on_the_worker_host_fails_the_run_and_closes_mlflow(stack, tmp_path, mlflow_client):
    import cq_prefect

    gone = tmp_path / "only-on-the-gpu-host"
    handle = cq_prefect.submit(name="remote", workdir=str(gone), command="true", check_workdir=False)
    result = handle.wait(timeout=120)
    assert handle.state() == "FAILED"
    assert f"workdir {gone} does not exist on host" in result.message
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert run.info.status == "FAILED" and "does not exist" in run.data.tags["cq.error"]
