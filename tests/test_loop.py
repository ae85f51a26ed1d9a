"""Research loops end to end on the session's stack: goal, budget, failures, a metric never printed, Optuna,
pruning, resume after the parent is killed at each point, `cq loop status --json`, `cq loop stop`, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import CQ, PYTHON, count_all_runs, run_cq, stop_process_group, wait_for

pytestmark = pytest.mark.e2e

# value = 21.43 minus every --gN=... flag; prints the curve @mpjpe over --steps steps, ending at value.
TRAIN = """\
import os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
value = 21.43 - sum(float(v) for k, v in args.items() if k.startswith("g"))
steps, pause = int(args.get("steps", 2)), float(args.get("sleep", 0.05))
log = os.environ.get("RUNS_LOG")
if log:
    with open(log, "a") as fh:
        fh.write(" ".join(sys.argv[1:]) + "\\n")
for step in range(steps):
    if args.get("silent") != "1":
        print(f"epoch {step} @step={step} @mpjpe={value + float(args.get('slope', 1)) * (steps - 1 - step):.2f}mm", flush=True)
    time.sleep(pause)
if args.get("crash") == "1":
    sys.exit(3)
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    return tmp_path


def _config(project: Path, ideas: list[dict], **extra) -> dict:
    name = extra.pop("name", f"loop-{uuid.uuid4().hex[:6]}")
    experiment = {"workdir": str(project), "command": f"{PYTHON} train.py",
                  "env": {"RUNS_LOG": str(project / "runs.log")}, **extra.pop("experiment", {})}
    return {"name": name, "goal": "improve MPJPE below 18mm", "metric": "mpjpe", "budget": 6,
            "experiment": experiment, "proposer": {"kind": "scripted", "ideas": ideas}, **extra}


def _runs(project: Path) -> list[str]:
    log = project / "runs.log"
    return log.read_text().splitlines() if log.exists() else []


def test_scripted_loop_keeps_improvements_and_reaches_the_goal(stack, project, mlflow_client, prefect_client,
                                                                 tmp_path):
    from cq_prefect import research_loop

    ideas = [
        {"title": "bone-length loss", "rationale": "limbs drift", "overrides": {"g1": 1.56}},
        {"title": "wider", "overrides": {"g2": -1}},
        {"title": "cross-attention", "overrides": {"g3": 2}},
        {"title": "never tried", "overrides": {"g4": 1}},
    ]
    config = _config(project, ideas)
    state = research_loop(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.reason == "goal_reached" and result.status == "finished"
    assert [(r.hypothesis.title, r.outcome) for r in result.experiments] == [
        ("baseline", "kept"), ("bone-length loss", "kept"), ("wider", "discarded"), ("cross-attention", "kept")]
    assert result.best == pytest.approx(17.87) and result.best_exp_id == f"{config['name']}-c3-s0"
    # kept changes accumulate; a discarded one does not
    assert _runs(project) == ["", "--g1=1.56", "--g1=1.56 --g2=-1", "--g1=1.56 --g3=2"]

    parent = mlflow_client.get_run(result.mlflow_run_id)
    tags = parent.data.tags
    assert tags["cq.loop.status"] == "finished" and tags["cq.loop.reason"] == "goal_reached"
    assert float(tags["cq.loop.best"]) == pytest.approx(17.87) and parent.data.params["budget"] == "6"
    artifacts = {a.path for a in mlflow_client.list_artifacts(result.mlflow_run_id)}
    assert {"loop_config.json", "loop_progress.png"} <= artifacts
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{result.mlflow_run_id}'")
    by_title = {c.data.tags["cq.loop.hypothesis"]: c.data.tags for c in children}
    assert by_title["wider"]["cq.loop.outcome"] == "discarded" and float(by_title["wider"]["cq.loop.delta"]) == pytest.approx(-1)
    assert by_title["bone-length loss"]["cq.loop.rationale"] == "limbs drift"
    assert json.loads(by_title["cross-attention"]["cq.loop.change"]) == {"g3": 2}
    assert float(by_title["cross-attention"]["cq.loop.delta"]) == pytest.approx(2)
    # each experiment is a child run of a task of the loop's flow run (a subflow in the UI)
    child = prefect_client.read_flow_run(uuid.UUID(result.experiments[1].flow_run_id))
    task_run = prefect_client.read_task_run(child.parent_task_run_id)
    assert str(task_run.flow_run_id) == result.flow_run_id
    # the seed's lines in the parent's Prefect log
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = [log.message for log in prefect_client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(result.flow_run_id)])))]
    text = "\n".join(logs)
    assert "[loop] Cycle 1 — best: 21.43mm" in text
    assert "Hypothesis: bone-length loss — limbs drift" in text
    assert f"Execute: submit {config['name']}-c1-s0" in text
    assert "Result: @mpjpe=19.87mm (improvement: 1.56mm)" in text
    assert "goal reached." in text
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    artifacts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[f"loop-{config['name']}", f"loop-{config['name']}-summary"])))
    assert {a.key for a in artifacts} == {f"loop-{config['name']}", f"loop-{config['name']}-summary"}
    # the plot on the parent run: the metric per experiment (kept in green), the best so far, the target line
    from matplotlib import image

    pixels = image.imread(mlflow_client.download_artifacts(result.mlflow_run_id, "loop_progress.png", str(tmp_path)))
    assert pixels.shape[:2] == (450, 800)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > 0.75) & (g < 0.3) & (b < 0.3)).sum() > 200  # tab:red, the dashed target line
    assert ((r < 0.25) & (g > 0.5) & (b < 0.25)).sum() > 50  # tab:green, the kept experiments
    assert ((r < 0.2) & (g > 0.4) & (g < 0.55) & (b > 0.6)).sum() > 200  # tab:blue, best so far
    # the events an automation can notify on, with the loop as their resource
    import httpx

    def loop_events():
        answer = httpx.post(f"{stack.prefect_api_url}/events/filter", json={
            "filter": {"resource": {"id": [f"cq.loop.{config['name']}"]}, "order": "ASC"}, "limit": 10})
        answer.raise_for_status()
        events = answer.json()["events"]
        return events if len(events) >= 2 else None

    events = wait_for(loop_events, 30, interval=0.5, what="the loop's events")
    assert [e["event"] for e in events] == ["cq.loop.goal-reached", "cq.loop.finished"]
    assert events[1]["payload"]["reason"] == "goal_reached" and events[1]["payload"]["best"] == pytest.approx(17.87)
    assert events[1]["related"][0]["prefect.resource.id"] == f"prefect.flow-run.{result.flow_run_id}"


def test_budget_exhausted_and_too_many_failures(stack, project):
    from cq_prefect import research_loop

    ideas = [{"title": f"idea {i}", "overrides": {"g1": 0.1 * i}} for i in range(1, 6)]
    result = research_loop(config=_config(project, ideas, budget=3, parallel=2))
    assert result.reason == "budget_exhausted" and len(result.experiments) == 3
    assert [r.cycle for r in result.experiments] == [0, 1, 1]

    crashing = [{"title": f"crash {i}", "overrides": {"crash": 1, "g1": i}} for i in range(1, 5)]
    result = research_loop(config=_config(project, crashing, max_failures=2))
    assert result.reason == "too_many_failures"
    assert [r.outcome for r in result.experiments] == ["kept", "crashed", "crashed"]
    assert "exited with code 3" in result.experiments[1].message


def test_metric_never_printed_stops_the_loop_with_exit_2(stack, project):
    path = project / "loop.yaml"
    config = _config(project, [{"title": "a", "overrides": {"g1": 1}}],
                     experiment={"params": {"silent": 1}})
    path.write_text(json.dumps(config))
    done = run_cq("loop", "start", str(path), "--json", timeout=240)
    assert done.returncode == 2, done.stderr
    assert "metric 'mpjpe' was never printed — does the script print @mpjpe=…?" in done.stderr
    status = json.loads(done.stdout.strip().splitlines()[-1])
    assert status["status"] == "failed" and [e["outcome"] for e in status["experiments"]] == ["no_metric"]


def test_optuna_loop(stack, project):
    from cq_prefect import research_loop

    config = _config(project, [], budget=4)
    config["proposer"] = {"kind": "optuna", "space": {"g1": {"type": "float", "low": 0.0, "high": 2.0}},
                          "seed": 3, "startup_trials": 2}
    result = research_loop(config=config)
    assert result.reason in ("budget_exhausted", "goal_reached")
    assert len(result.experiments) == 4
    values = [r.change.get("g1") for r in result.experiments[1:]]
    assert len(set(values)) == 3 and all(0 <= v <= 2 for v in values)
    assert all(r.value == pytest.approx(21.43 - float(r.overrides.get("g1", 0)), abs=0.006) for r in result.experiments)


@pytest.mark.parametrize("rule", ["median", "asha"])
def test_pruning_cancels_a_bad_child(stack, project, prefect_client, rule):
    from cq_prefect import research_loop

    ideas = [
        {"title": "good 1", "overrides": {"g1": 0.5}},
        {"title": "good 2", "overrides": {"g2": 0.3}},
        {"title": "diverges", "overrides": {"g3": -30, "steps": 60, "sleep": 0.5}},
    ]
    config = _config(project, ideas, budget=4, goal="", target=1, direction="minimize",
                     pruning={"rule": rule, "min_experiments": 3, "min_step": 1},
                     experiment={"params": {"steps": 4}})
    started = time.monotonic()
    result = research_loop(config=config)
    assert [r.outcome for r in result.experiments] == ["kept", "kept", "kept", "pruned"]
    pruned = result.experiments[-1]
    assert "worse than the finished experiments" in pruned.message and pruned.curve
    assert time.monotonic() - started < 28  # it would have run 30 s on its own
    child = prefect_client.read_flow_run(uuid.UUID(pruned.flow_run_id))
    assert child.state.type.value in ("CANCELLED", "CRASHED")
    assert result.reason == "budget_exhausted"


DRIVER = """\
import json, os, signal, sys
import cq_prefect.loop as loop
import cq_prefect.tracking as tracking
point, where, path, resume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

def die(name, **info):
    if name == point and where in f"-c{info.get('cycle', '')}-" + str(info.get("exp_id", "")):
        os.kill(os.getpid(), signal.SIGKILL)

loop._checkpoint = die
create_run = tracking.create_experiment_run

def create_then_die(client, spec, exp_id, *args, **kwargs):  # the MLflow run exists, the flow run does not
    run_id = create_run(client, spec, exp_id, *args, **kwargs)
    die("intent", exp_id=exp_id)
    return run_id

tracking.create_experiment_run = create_then_die
loop.research_loop(config=json.load(open(path)), resume=resume)
"""


def test_resume_after_the_parent_is_killed_runs_every_hypothesis_once(stack, project, mlflow_client):
    ideas = [{"title": f"idea {i}", "overrides": {f"g{i}": 0.1, "sleep": 0.4}} for i in range(1, 8)]
    config = _config(project, ideas, budget=6, goal="", target=1, direction="minimize")
    name = config["name"]
    (project / "loop.json").write_text(json.dumps(config))
    (project / "driver.py").write_text(DRIVER)
    # killed right after a submit, between a child's MLflow run and its flow run, while a child runs, after a
    # child finished but before it was recorded, and while proposing; each time resumed from the ledger
    outputs = ""
    for resume, (point, where) in enumerate([("submitted", "-c1-"), ("intent", "-c2-"), ("child_running", "-c3-"),
                                              ("child_finished", "-c4-"), ("proposed", "-c5-")]):
        done = subprocess.run([PYTHON, "driver.py", point, where, "loop.json", "1" if resume else "0"], cwd=project,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == -signal.SIGKILL, (point, done.stdout[-2000:], done.stderr[-2000:])
        outputs += done.stdout + done.stderr
    status = json.loads(run_cq("loop", "status", name, "--json").stdout)
    assert status["status"] == "crashed"  # the parent is gone, the ledger says running
    # resumed with a larger budget: 8 experiments in all
    resumed = run_cq("loop", "resume", name, "--budget", "8", "--json", timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert status["status"] == "finished" and status["reason"] == "budget_exhausted" and status["budget"] == 8
    runs = _runs(project)
    assert len(runs) == 8 and len(set(runs)) == 8, runs  # the baseline and 7 ideas, each exactly once
    assert [e["outcome"] for e in status["experiments"]] == ["kept"] * 8
    assert [e["exp_id"] for e in status["experiments"]] == [f"{name}-c{c}-s0" for c in range(8)]
    assert outputs.count("Resume: re-attached") == 3  # the children of c1, c3 and c4
    assert outputs.count("was never started; submitting it now") == 1  # c2: its MLflow run only
    assert mlflow_client.get_run(status["mlflow_run_id"]).data.params["budget"] == "6"  # the config as started


def _start_slow_loop(project: Path) -> tuple[str, str]:
    """`cq loop start --detach`: a baseline, then an idea that runs ~40 s, then one more; (name, flow run id)."""
    ideas = project / "ideas.yaml"
    ideas.write_text("- {title: slow, overrides: {g1: 1, steps: 200, sleep: 0.2}}\n- {title: next, overrides: {g2: 1}}\n")
    name = f"loop-{uuid.uuid4().hex[:6]}"
    started = run_cq("loop", "start", "--goal", "mpjpe below 10", "--metric", "mpjpe", "--budget", "3",
                     "--workdir", str(project), "--command", f"{PYTHON} train.py --steps=2", "--ideas", str(ideas),
                     "--name", name, "--detach", "--json")
    assert started.returncode == 0, started.stderr
    answer = json.loads(started.stdout)
    assert answer["name"] == name
    return name, answer["flow_run_id"]


def test_cq_loop_status_and_stop(stack, project, prefect_client):
    name, _ = _start_slow_loop(project)

    def running():
        done = run_cq("loop", "status", name, "--json")
        if done.returncode == 2 and "no loop named" in done.stderr:
            return None  # its ledger is not written yet
        status = json.loads(done.stdout)
        return status if status["running"] and status["cycles"] == 1 else None

    status = wait_for(running, 120, interval=1, what="the slow experiment to run")
    assert set(status) >= {"name", "status", "reason", "best", "target", "budget", "experiments"}
    assert status["status"] == "running" and status["target"] == 10 and status["budget"] == 3
    assert set(status["experiments"][0]) == {"exp_id", "cycle", "hypothesis", "outcome", "value", "mlflow_run_id",
                                             "flow_run_id"}
    assert status["experiments"][0]["outcome"] == "kept" and status["experiments"][1]["hypothesis"] == "slow"
    listing = json.loads(run_cq("loop", "status", "--json").stdout)
    assert any(loop["name"] == name for loop in listing)

    stopped = run_cq("loop", "stop", name, "--json")
    assert stopped.returncode == 0, stopped.stderr
    status = json.loads(stopped.stdout)
    assert status["status"] == "stopped" and status["reason"] == "stopped" and not status["running"]
    slow = status["experiments"][1]
    assert slow["outcome"] == "crashed"
    wait_for(lambda: prefect_client.read_flow_run(uuid.UUID(slow["flow_run_id"])).state.is_final(), 60,
             what="the slow child to end")
    assert len(status["experiments"]) == 2  # nothing started after the stop


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "budget 0 must be at least 1"),
    (["--direction", "sideways"], "must be minimize or maximize"),
    (["--goal", "make it better"], "no target in 'make it better'"),
    (["--space", "SPACE", "--proposer", "optuna"], "low"),
    (["--effort", "low"], "--effort is for --proposer claude; leave it out with --proposer scripted"),
])
def test_bad_input_exits_2_and_creates_nothing(stack, project, args, message):
    ideas = project / "ideas.yaml"
    ideas.write_text("- {title: a, overrides: {g1: 1}}\n")
    (project / "space.yaml").write_text("g1: {type: float, low: 2, high: 1}\n")
    base = {"--goal": "mpjpe below 18", "--metric": "mpjpe", "--budget": "3", "--workdir": str(project),
            "--command": f"{PYTHON} train.py", "--ideas": str(ideas)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.replace("SPACE", str(project / "space.yaml"))
    if "--space" in base:
        base.pop("--ideas")
    before = count_all_runs(stack)
    done = run_cq("loop", "start", *[x for pair in base.items() for x in pair], "--name", "bad-input")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert count_all_runs(stack) == before


PREFECT = str(Path(PYTHON).with_name("prefect"))


def _engine_pid(flow_run_id: str) -> int | None:
    """The process running flow run ``flow_run_id`` (a worker gives it PREFECT__FLOW_RUN_ID)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode() in environ:
            return int(proc.name)
    return None


def _state(client, flow_run_id: str) -> str:
    run = client.read_flow_run(uuid.UUID(flow_run_id))
    return run.state.type.value if run.state else "SCHEDULED"


def test_deployment_run_on_a_stock_process_worker_and_the_ui_retry_of_a_killed_parent(
        stack, project, prefect_client, mlflow_client, tmp_path):
    """`prefect deployment run research-loop/…` with a config, served by a stock `prefect worker start --type
    process`; the parent's process killed while a child runs, then the Prefect UI's Retry (AwaitingRetry) runs
    the same flow run again (run_count 2), which continues the loop from its ledger: nothing runs twice."""
    from prefect.states import Scheduled

    from cq_prefect.deployment import pool_has_workers
    from cq_prefect.ledger import Ledger
    from cq_prefect.loop_submission import ensure_loop_deployment

    pool = f"loops-{uuid.uuid4().hex[:6]}"
    deployment_id = ensure_loop_deployment(prefect_client, pool=pool, name=pool)
    ideas = [{"title": f"idea {i}", "overrides": {f"g{i}": 0.1, "sleep": 2 if i == 2 else 0.3}} for i in range(1, 4)]
    config = _config(project, ideas, budget=4, goal="", target=1, direction="minimize")
    name = config["name"]
    (project / "loop.yaml").write_text(json.dumps(config))
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--type", "process", "--pool", pool, "--name", f"{pool}-worker"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1", "MLFLOW_TRACKING_URI": stack.mlflow_tracking_uri})
    try:
        wait_for(lambda: pool_has_workers(prefect_client, pool), 90, interval=0.5, what="the process worker online")
        done = subprocess.run([PREFECT, "deployment", "run", f"research-loop/{pool}", "--params",
                               json.dumps({"config": str(project / "loop.yaml")})],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        flow_run_id = str(prefect_client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))[0].id)

        def second_running():  # idea 2 runs ~4 s
            ledger = Ledger.latest(mlflow_client, name)
            return ledger is not None and any(r.cycle == 2 and r.outcome == "running" for r in ledger.records())

        wait_for(second_running, 150, interval=0.3, what=f"cycle 2 of the loop running\n{log_path.read_text()[-3000:]}")
        pid = _engine_pid(flow_run_id)
        assert pid, "the worker's process for the loop"
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: _state(prefect_client, flow_run_id) == "CRASHED", 60, what="the worker to mark it crashed")
        # Prefect 3.9's process worker reports the crash twice: its executor at once, then the worker itself
        # when the submission returns, a second or so later. A Retry between the two is crashed again by the
        # second report, so wait (as a person would) until the worker is done with the killed process.
        deadline = time.monotonic() + 30
        while "Flow run infrastructure exited" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        # what the Retry button of the Prefect UI does
        retry = prefect_client.set_flow_run_state(uuid.UUID(flow_run_id), Scheduled(
            name="AwaitingRetry", message="Retry from the UI"), force=True)
        assert str(retry.status.value).upper() == "ACCEPT", retry
        wait_for(lambda: prefect_client.read_flow_run(uuid.UUID(flow_run_id)).run_count == 2, 60, interval=0.5,
                 what=f"the worker to run it again\n{log_path.read_text()[-3000:]}")
        wait_for(lambda: _state(prefect_client, flow_run_id) in ("COMPLETED", "FAILED", "CRASHED"), 180,
                 interval=0.5, what=f"the retried loop to end\n{log_path.read_text()[-3000:]}")
        flow_run = prefect_client.read_flow_run(uuid.UUID(flow_run_id))
        assert flow_run.state.type.value == "COMPLETED" and flow_run.run_count == 2, flow_run.state
    finally:
        stop_process_group(worker)
    status = json.loads(run_cq("loop", "status", name, "--json").stdout)
    assert status["status"] == "finished" and status["reason"] == "budget_exhausted"
    assert [e["exp_id"] for e in status["experiments"]] == [f"{name}-c{c}-s0" for c in range(4)]
    runs = _runs(project)
    assert len(runs) == 4 and len(set(runs)) == 4, runs  # each hypothesis ran once: c2 re-attached, not rerun


def test_cancelling_the_parent_in_prefect_cancels_its_children(stack, project, prefect_client):
    """`cq loop start` runs the loop itself (no worker on the loop pool): a cancel from the Prefect UI still
    stops it — the children are cancelled, the ledger says stopped, the parent ends Cancelled."""
    from prefect.states import Cancelling

    name, parent = _start_slow_loop(project)

    def slow_running():
        done = run_cq("loop", "status", name, "--json")
        status = json.loads(done.stdout) if done.returncode == 0 else {}
        experiments = status.get("experiments") or []
        running = status.get("running") and status.get("cycles") == 1 and len(experiments) > 1
        return status if running and experiments[1].get("flow_run_id") else None

    slow = wait_for(slow_running, 120, interval=0.5, what="the slow experiment to run")["experiments"][1]
    # what the Cancel button of the Prefect UI does
    prefect_client.set_flow_run_state(uuid.UUID(parent), Cancelling(message="cancelled from the UI"), force=True)
    wait_for(lambda: _state(prefect_client, parent) == "CANCELLED", 60, what="the parent to end Cancelled")
    wait_for(lambda: _state(prefect_client, slow["flow_run_id"]) in ("CANCELLED", "CRASHED"), 60,
             what="the slow child to be cancelled")
    status = json.loads(run_cq("loop", "status", name, "--json").stdout)
    assert status["status"] == "stopped" and status["reason"] == "stopped" and not status["running"]
    assert [e["outcome"] for e in status["experiments"]] == ["kept", "crashed"]  # nothing started after
