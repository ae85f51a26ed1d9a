"""DAG runs end to end on the session's stack: order, parallel branches, conditions, retries, timeouts,
not-run propagation, MLflow nesting, GPU nodes as child runs on a cq-gpu pool, `cq dag run` on a worker
with --resume, and `cq dag deploy` + `prefect deployment run`."""

from __future__ import annotations

import json
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from conftest import CQ, PYTHON, count_all_runs, run_cq, wait_for
from test_gpu_worker import Worker

pytestmark = pytest.mark.e2e

STAMP = """\
import json, os, sys, time
name, seconds = sys.argv[1], float(sys.argv[2])
start = time.time()
with open(os.path.join(os.environ["STAMPS"], name + ".env"), "w") as fh:
    json.dump({k: v for k, v in os.environ.items() if k.startswith(("CQ_", "CUDA_"))}, fh)
time.sleep(seconds)
with open(os.path.join(os.environ["STAMPS"], "log"), "a") as fh:
    fh.write(f"{name} {start} {time.time()}\\n")
print(f"{name} done @score={len(name) / 10} @step=0")
"""


def _stamps(folder: Path) -> dict[str, list[tuple[float, float]]]:
    runs: dict[str, list[tuple[float, float]]] = {}
    log = folder / "log"
    for line in log.read_text().splitlines() if log.exists() else []:
        name, start, end = line.split()
        runs.setdefault(name, []).append((float(start), float(end)))
    return runs


@pytest.fixture
def project(tmp_path):
    (tmp_path / "stamp.py").write_text(STAMP)
    (tmp_path / "stamps").mkdir()
    return tmp_path


def _nested_runs(mlflow_client, dag_name: str, parent_run_id: str):
    experiment = mlflow_client.get_experiment_by_name(dag_name)
    return mlflow_client.search_runs([experiment.experiment_id],
                                     filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_dag_flow_runs_nodes_in_order_with_conditions_retries_and_failures(stack, project, mlflow_client,
                                                                            prefect_client):
    from cq_prefect import dag_from_yaml

    name = f"dag-{uuid.uuid4().hex[:6]}"
    stamp = f"{PYTHON} stamp.py"
    text = textwrap.dedent(f"""
        name: {name}
        tags: [e2e]
        environment: {{STAMPS: {project / 'stamps'}}}
        nodes:
          - {{name: prep, command: {stamp} prep 0.2}}
          - {{name: left, command: {stamp} left 1.5}}
          - {{name: right, command: {stamp} right 1.5, depends_on: [prep]}}
          - {{name: good, command: {stamp} good 0, depends_on: [right]}}
          - {{name: never, command: {stamp} never 0}}
          - name: flaky
            command: if [ -e flaky.once ]; then {stamp} flaky 0; else touch flaky.once; exit 4; fi
            max_retries: 1
          - {{name: broken, command: 'echo about to fail; exit 3', max_retries: 1}}
          - {{name: after-broken, command: {stamp} after-broken 0, depends_on: [broken]}}
          - {{name: slow, command: 'sleep 30', timeout: 1}}
        dependencies:
          - {{source: prep, target: left, type: data_dependency}}
          - {{source: right, target: good, when: "metrics.score >= 0.5"}}
          - {{source: left, target: never, when: "metrics.score > 10"}}
        """)
    state = dag_from_yaml(text, base_dir=project)(max_parallel=8, return_state=True)
    assert state.is_failed()
    message = state.message
    assert "3 failed" not in message and "2 failed" in message, message  # broken and slow
    assert "failed: broken — exited with code 3 (attempt 2)" in message
    assert "failed: slow — timed out after 1 s" in message
    assert "not run: after-broken — upstream broken failed" in message
    assert "never" not in message.split("\n", 1)[1]  # a false condition skips, it does not fail the DAG

    runs = _stamps(project / "stamps")
    assert set(runs) == {"prep", "left", "right", "good", "flaky"}
    assert runs["prep"][0][1] <= min(runs["left"][0][0], runs["right"][0][0])  # sources first
    (l_start, l_end), (r_start, r_end) = runs["left"][0], runs["right"][0]
    assert l_start < r_end and r_start < l_end  # independent branches overlap
    assert runs["right"][0][1] <= runs["good"][0][0]
    left_env = json.loads((project / "stamps" / "left.env").read_text())
    assert json.loads(left_env["CQ_UPSTREAM_METRICS"]) == {"prep": {"score": 0.4}}
    assert left_env["CQ_DAG_NAME"] == name and left_env["CQ_DAG_NODE"] == "left"
    assert "CQ_UPSTREAM_METRICS" not in json.loads((project / "stamps" / "right.env").read_text())

    flow_run = prefect_client.read_flow_run(state.state_details.flow_run_id)
    assert prefect_client.read_flow(flow_run.flow_id).name == name
    [parent] = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name(name).experiment_id],
        filter_string=f"tags.`cq.prefect.flow_run_id` = '{flow_run.id}' and tags.`cq.kind` = 'dag'")
    assert parent.info.status == "FAILED" and parent.data.tags["cq.dag.status"] == "failed"
    children = _nested_runs(mlflow_client, name, parent.info.run_id)
    attempts = sorted((r.data.tags["cq.dag.node"], r.data.tags["cq.dag.attempt"], r.data.tags["cq.dag.status"])
                      for r in children)
    assert attempts == [
        ("broken", "1", "failed"), ("broken", "2", "failed"), ("flaky", "1", "failed"), ("flaky", "2", "succeeded"),
        ("good", "1", "succeeded"), ("left", "1", "succeeded"), ("prep", "1", "succeeded"),
        ("right", "1", "succeeded"), ("slow", "1", "failed"),
    ]
    by_node = {r.data.tags["cq.dag.node"]: r for r in children if r.data.tags["cq.dag.status"] == "succeeded"}
    assert by_node["left"].data.metrics["score"] == pytest.approx(0.4)
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)  # every record closed


def test_gpu_node_runs_as_a_child_run_on_its_pool(stack, project, mlflow_client, prefect_client, tmp_path):
    from cq_prefect import dag_from_yaml

    pool = f"gpu-{uuid.uuid4().hex[:6]}"
    worker = Worker(pool, "0,1", tmp_path / "worker.log")
    try:
        name = f"dag-gpu-{uuid.uuid4().hex[:6]}"
        text = textwrap.dedent(f"""
            name: {name}
            pool: {pool}
            environment: {{STAMPS: {project / 'stamps'}}}
            nodes:
              - {{name: prep, command: {PYTHON} stamp.py prep 0}}
              - {{name: train, command: {PYTHON} stamp.py train 0, gpu_count: 1, depends_on: [prep]}}
            """)
        state = dag_from_yaml(text, base_dir=project)(return_state=True)
        assert state.is_completed(), state.message
    finally:
        worker.stop()
    train_env = json.loads((project / "stamps" / "train.env").read_text())
    assert train_env["CUDA_VISIBLE_DEVICES"] in ("0", "1") and train_env["CQ_GPU_IDS"] == train_env["CUDA_VISIBLE_DEVICES"]
    assert json.loads((project / "stamps" / "prep.env").read_text()).get("CQ_GPU_IDS", "") == ""
    result = state.result()
    train = next(n for n in result.nodes if n.node == "train")
    child = prefect_client.read_flow_run(uuid.UUID(train.flow_run_id))
    assert prefect_client.read_deployment(child.deployment_id).work_pool_name == pool
    parent_task = prefect_client.read_task_run(child.parent_task_run_id)
    assert str(parent_task.flow_run_id) == str(state.state_details.flow_run_id)  # a subflow of the DAG run
    run = mlflow_client.get_run(train.mlflow_run_id)
    assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id and run.data.tags["cq.gpu_ids"] in ("0", "1")


def _diagnose(prefect_client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run = prefect_client.read_flow_run(flow_run_id)
    logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return f"{flow_run.state}\n" + "\n".join(log.message for log in logs[-40:])


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_cq_dag_run_on_the_worker_and_resume(stack, project, mlflow_client):
    name = f"dag-resume-{uuid.uuid4().hex[:6]}"
    stamp = f"{PYTHON} stamp.py"
    body = f"""
        name: {name}
        environment: {{STAMPS: {project / 'stamps'}}}
        nodes:
          - {{name: prep, command: {stamp} prep 0}}
          - {{name: train, command: {stamp} train 0, depends_on: [prep]}}
          - {{name: check, command: test -e go.flag && {stamp} check 0, depends_on: [train]}}
          - {{name: report, command: {stamp} report 0, depends_on: [check]}}
        """
    dag_file = _write(project / "pipeline.yaml", body)

    first = run_cq("dag", "run", str(dag_file), "--watch", "--json", timeout=300)
    assert first.returncode == 1, first.stderr
    first_id = json.loads(first.stdout.strip().splitlines()[-1])["flow_run_id"]
    assert "not run: report — upstream check did not run" not in first.stderr
    assert "not run: report — upstream check failed" in first.stderr
    assert set(_stamps(project / "stamps")) == {"prep", "train"}

    (project / "go.flag").touch()
    second = run_cq("dag", "run", str(dag_file), "--resume", first_id, "--watch", "--json", timeout=300)
    assert second.returncode == 0, second.stderr
    second_id = json.loads(second.stdout.strip().splitlines()[-1])["flow_run_id"]
    runs = _stamps(project / "stamps")
    assert {k: len(v) for k, v in runs.items()} == {"prep": 1, "train": 1, "check": 1, "report": 1}
    assert "prep: unchanged and succeeded in" in second.stderr

    # train's command changes: train and everything downstream run again; prep is still reused, and its
    # record points at the run that really ran it (the first)
    _write(dag_file, body.replace(f"train, command: {stamp} train 0", f"train, command: {stamp} train 0.1"))
    third = run_cq("dag", "run", str(dag_file), "--resume", second_id, "--watch", "--json", timeout=300)
    assert third.returncode == 0, third.stderr
    third_id = json.loads(third.stdout.strip().splitlines()[-1])["flow_run_id"]
    runs = _stamps(project / "stamps")
    assert {k: len(v) for k, v in runs.items()} == {"prep": 1, "train": 2, "check": 2, "report": 2}

    experiment = mlflow_client.get_experiment_by_name(name)
    parents = {r.data.tags["cq.prefect.flow_run_id"]: r for r in mlflow_client.search_runs(
        [experiment.experiment_id], filter_string="tags.`cq.kind` = 'dag'")}
    assert set(parents) == {first_id, second_id, third_id}
    assert parents[third_id].data.tags["cq.dag.resumed_from"] == second_id
    first_prep = next(r for r in _nested_runs(mlflow_client, name, parents[first_id].info.run_id)
                      if r.data.tags["cq.dag.node"] == "prep")
    third_nodes = {r.data.tags["cq.dag.node"]: r for r in _nested_runs(mlflow_client, name, parents[third_id].info.run_id)}
    assert third_nodes["prep"].data.tags["cq.dag.status"] == "reused"
    assert third_nodes["prep"].data.tags["cq.dag.reused_from"] == first_prep.info.run_id
    assert third_nodes["prep"].data.tags["cq.dag.reused_from_dag_run"] == first_id
    assert third_nodes["train"].data.tags["cq.dag.status"] == "succeeded"


def test_resume_of_an_unknown_run_exits_2_and_creates_nothing(stack, project):
    dag_file = _write(project / "p.yaml", f"name: dag-x-{uuid.uuid4().hex[:6]}\nnodes: [{{name: a, command: 'true'}}]\n")
    before = count_all_runs(stack)
    result = run_cq("dag", "run", str(dag_file), "--resume", "no-such-run")
    assert result.returncode == 2 and "--resume no-such-run: no run of DAG" in result.stderr, result.stderr
    assert count_all_runs(stack) == before


def test_dag_deploy_with_a_schedule_and_prefect_deployment_run(stack, project, prefect_client):
    name = f"dag-deploy-{uuid.uuid4().hex[:6]}"
    dag_file = _write(project / "nightly.yaml", f"""
        name: {name}
        environment: {{STAMPS: {project / 'stamps'}}}
        nodes:
          - {{name: only, command: {PYTHON} stamp.py only 0}}
        """)
    result = run_cq("dag", "deploy", str(dag_file), "--cron", "0 2 * * *", "--timezone", "Europe/Berlin")
    assert result.returncode == 0, result.stderr
    assert f"prefect deployment run '{name}/default'" in result.stdout
    deployment = prefect_client.read_deployment_by_name(f"{name}/default")
    [schedule] = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"

    prefect = str(Path(CQ).with_name("prefect"))
    started = subprocess.run([prefect, "deployment", "run", f"{name}/default"], capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stderr + started.stdout
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def finished():
        runs = prefect_client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        done = [r for r in runs if r.state and r.state.is_final()]
        return done[0] if done else None

    try:
        flow_run = wait_for(finished, 180, interval=1, what="the deployment's run")
        assert flow_run.state.is_completed(), flow_run.state.message
        assert _stamps(project / "stamps")["only"]
    finally:  # no nightly runs of a test DAG left for the scheduler to make
        prefect_client.delete_deployment(deployment.id)


def test_prefect_yaml_runs_the_seed_pipeline(stack, prefect_client, mlflow_client):
    """The seed's preprocess → train → evaluate, deployed from prefect.yaml and run by the worker."""
    import os

    root = Path(__file__).resolve().parents[1]
    prefect = str(Path(CQ).with_name("prefect"))
    env = dict(os.environ, PWD=str(root))
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--name", "seed-pipeline-nightly"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployment = prefect_client.read_deployment_by_name("cq-dag/seed-pipeline-nightly")
    assert deployment.parameters["dag"] == f"{root}/deployments/dags/seed-pipeline.yaml"
    assert [s.active for s in deployment.schedules] == [False]  # the night starts only when the user says so

    started = subprocess.run([prefect, "deployment", "run", "cq-dag/seed-pipeline-nightly"], env=env,
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stderr + started.stdout
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    def finished():
        runs = prefect_client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
        return next((r for r in runs if r.state and r.state.is_final()), None)

    flow_run = wait_for(finished, 240, interval=1, what="the seed pipeline's run")
    assert flow_run.state.is_completed(), flow_run.state.message
    experiment = mlflow_client.get_experiment_by_name("full-pipeline")
    [parent] = mlflow_client.search_runs([experiment.experiment_id],
                                         filter_string=f"tags.`cq.prefect.flow_run_id` = '{flow_run.id}' and tags.`cq.kind` = 'dag'")
    nodes = {r.data.tags["cq.dag.node"]: r for r in _nested_runs(mlflow_client, "full-pipeline", parent.info.run_id)}
    assert set(nodes) == {"preprocess", "train", "evaluate"}
    assert nodes["train"].data.metrics["train_accuracy"] >= 0.8 and nodes["evaluate"].data.metrics["accuracy"] >= 0.8
    assert nodes["preprocess"].data.metrics["samples"] == 400


SLEEPER = """\
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
print("@started=1", flush=True)
time.sleep(120)
"""


def test_cancelling_a_dag_run_cancels_its_children_and_kills_its_commands(stack, project, prefect_client, tmp_path):
    from prefect.states import Cancelling

    from conftest import pid_alive

    (project / "sleeper.py").write_text(SLEEPER)
    pool = f"gpu-{uuid.uuid4().hex[:6]}"
    worker = Worker(pool, "1", tmp_path / "worker.log")  # one declared GPU
    try:
        dag_file = _write(project / "long.yaml", f"""
            name: dag-cancel-{uuid.uuid4().hex[:6]}
            nodes:
              - {{name: cpu, command: {PYTHON} sleeper.py cpu.pid}}
              - {{name: gpu, command: {PYTHON} sleeper.py gpu.pid, gpu_count: 1, pool: {pool}}}
            """)
        started = run_cq("dag", "run", str(dag_file), "--json")
        assert started.returncode == 0, started.stderr
        dag_run = uuid.UUID(json.loads(started.stdout.strip().splitlines()[-1])["flow_run_id"])
        try:
            wait_for(lambda: (project / "cpu.pid").exists() and (project / "gpu.pid").exists(), 120, what="both nodes")
        except AssertionError:
            raise AssertionError(_diagnose(prefect_client, dag_run) + (tmp_path / "worker.log").read_text()[-3000:])
        cpu_pid, gpu_pid = (int((project / f"{n}.pid").read_text()) for n in ("cpu", "gpu"))
        prefect_client.set_flow_run_state(dag_run, Cancelling(), force=True)
        wait_for(lambda: prefect_client.read_flow_run(dag_run).state.is_final(), 90, what="the DAG run to end")
        assert prefect_client.read_flow_run(dag_run).state.is_cancelled()
        wait_for(lambda: not pid_alive(cpu_pid) and not pid_alive(gpu_pid), 60, what="both command trees to die")
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        children = prefect_client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[dag_run])))
        gpu_child = [c for c in children if c.deployment_id is not None]
        assert gpu_child and wait_for(
            lambda: prefect_client.read_flow_run(gpu_child[0].id).state.is_final(), 60, what="the GPU child to end")
        assert prefect_client.read_flow_run(gpu_child[0].id).state.type.value in ("CANCELLED", "CRASHED")
    finally:
        worker.stop()


def test_max_parallel_bounds_the_nodes_running_at_once(stack, project):
    from cq_prefect import dag_from_yaml

    nodes = "\n".join(f"  - {{name: n{i}, command: {PYTHON} stamp.py n{i} 0.6}}" for i in range(5))
    text = f"name: dag-par-{uuid.uuid4().hex[:6]}\nenvironment: {{STAMPS: {project / 'stamps'}}}\nnodes:\n{nodes}\n"
    state = dag_from_yaml(text, base_dir=project)(max_parallel=2, return_state=True)
    assert state.is_completed(), state.message
    spans = [span for runs in _stamps(project / "stamps").values() for span in runs]
    assert len(spans) == 5
    at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert at_once <= 2
