"""Loops whose hypotheses edit code, end to end on the session's stack: a branch and commit per experiment,
the best branch advanced and merged, Claude (faked at the HTTP layer) proposing edits from the files it is
shown, a worker without the workdir checking the commit out, and bad input refused before anything exists."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import PYTHON, count_all_runs, run_cq

pytestmark = pytest.mark.e2e

# value = 21.43 - GAIN (from model.py) - the number in data/offset.txt (a file git ignores)
TRAIN = """\
import os, sys
from model import GAIN
offset = float(open("data/offset.txt").read()) if os.path.exists("data/offset.txt") else 99.0
with open(os.environ["RUNS_LOG"], "a") as fh:
    fh.write(f"{GAIN}\\n")
print(f"@step=0 @mpjpe={21.43 - GAIN - offset:.2f}mm", flush=True)
"""


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository whose workdir is a subfolder, with an ignored data folder the command reads."""
    root = tmp_path / "proj"
    work = root / "pose"
    (work / "data").mkdir(parents=True)
    (work / "train.py").write_text(TRAIN)
    (work / "model.py").write_text("# the model\nGAIN = 0.0\n")
    (work / "data" / "offset.txt").write_text("0.0\n")
    (root / ".gitignore").write_text("data/\nruns.log\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "baseline")
    return work


def _config(work: Path, proposer: dict, **extra) -> dict:
    return {"name": extra.pop("name", f"code-{uuid.uuid4().hex[:6]}"), "goal": "improve MPJPE below 18mm",
            "metric": "mpjpe", "budget": extra.pop("budget", 6), "proposer": proposer,
            "experiment": {"workdir": str(work), "command": f"{PYTHON} train.py",
                           "env": {"RUNS_LOG": str(work / "runs.log")}},
            "code": {"editable": ["model.py"], **extra.pop("code", {})}, **extra}


def edit(old: str, new: str) -> dict:
    return {"path": "model.py", "old": f"GAIN = {old}", "new": f"GAIN = {new}"}


def test_each_hypothesis_runs_on_its_branch_the_best_advances_and_is_merged(stack, repo, mlflow_client):
    from cq_prefect import research_loop

    root = repo.parent
    ideas = [
        {"title": "gain one", "rationale": "a first step", "edits": [edit("0.0", "1.0")]},
        {"title": "bad edit", "edits": [edit("7.0", "8.0")]},  # its old text is not in the file
        {"title": "gain half", "edits": [edit("1.0", "0.5")]},  # builds on the best: GAIN = 1.0 is there
        {"title": "gain four", "edits": [edit("1.0", "4.0")]},
    ]
    config = _config(repo, {"kind": "scripted", "ideas": ideas}, code={"merge": True})
    name = config["name"]
    state = research_loop(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [(r.hypothesis.title, r.outcome) for r in result.experiments] == [
        ("baseline", "kept"), ("gain one", "kept"), ("bad edit", "crashed"), ("gain half", "discarded"),
        ("gain four", "kept")]
    assert result.reason == "goal_reached" and result.best == pytest.approx(17.43)
    bad = result.experiments[2]
    assert "could not be applied" in bad.message and "GAIN = 7.0" in bad.message and bad.branch is None
    # every experiment ran at its own commit, in a worktree that found the ignored data folder
    assert (repo / "runs.log").read_text().split() == ["0.0", "1.0", "0.5", "4.0"]
    branches = set(git(root, "branch", "--format=%(refname:short)").split())
    ran = [r for r in result.experiments if r.outcome != "crashed"]
    assert {f"cq/{name}/{r.exp_id}" for r in ran} | {f"cq/{name}/best", "main"} == branches
    assert git(root, "rev-parse", f"cq/{name}/best") == result.experiments[4].commit
    assert git(root, "log", "-1", "--format=%s", result.experiments[4].commit) == "gain four"
    assert git(root, "rev-parse", f"{result.experiments[4].commit}^") == result.experiments[1].commit
    assert git(root, "log", "-1", "--format=%B", result.experiments[1].commit).startswith("gain one\n\na first step")
    # --merge: main fast-forwarded to the best code, checkout included; the worktrees are gone
    assert result.best_branch == f"cq/{name}/best" and result.merged == result.experiments[4].commit
    assert git(root, "rev-parse", "main") == result.merged and "GAIN = 4.0" in (repo / "model.py").read_text()
    assert git(root, "status", "--porcelain") == ""
    assert "cq-worktrees" not in git(root, "worktree", "list")
    # the ledger: commit, branch and edits on each experiment's run; the git commit MLflow saw is that commit
    children = {r.exp_id: mlflow_client.get_run(r.mlflow_run_id).data.tags for r in ran}
    four = children[result.experiments[4].exp_id]
    assert four["cq.loop.commit"] == result.experiments[4].commit and four["cq.loop.branch"].endswith("/" + result.experiments[4].exp_id)
    assert json.loads(four["cq.loop.edits"]) == [edit("1.0", "4.0")]
    assert four["mlflow.source.git.commit"] == result.experiments[4].commit
    parent = mlflow_client.get_run(result.mlflow_run_id).data.tags
    assert parent["cq.loop.git.best_branch"] == f"cq/{name}/best" and parent["cq.loop.git.merged"] == result.merged
    assert parent["cq.loop.git.start_branch"] == "main"
    status = json.loads(run_cq("loop", "status", name, "--json").stdout)
    assert status["best_branch"] == f"cq/{name}/best" and status["experiments"][1]["branch"] == f"cq/{name}/{ran[1].exp_id}"


def test_claude_edits_code_from_the_files_it_is_shown_and_the_key_stays_secret(stack, repo, mlflow_client,
                                                                                 prefect_client, monkeypatch, tmp_path):
    import httpx2

    from cq_prefect import research_loop
    from cq_prefect.proposers import claude
    from cq_prefect.testing import FakeAnthropic

    def answer(body):
        text = body["messages"][0]["content"]
        step = ("0.0", "2.0") if "GAIN = 0.0" in text else ("2.0", "4.0")
        return FakeAnthropic.tool_use({"title": f"gain {step[1]}", "rationale": f"raise GAIN from {step[0]}",
                                       "edits": [edit(*step)]})(body)

    note = f"raising GAIN lowers MPJPE in code loops {uuid.uuid4().hex[:6]}"
    assert run_cq("note", note).returncode == 0
    fake = FakeAnthropic(answer)
    monkeypatch.setattr(claude, "default_http_client", lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
    monkeypatch.setenv("ANTHROPIC_API_KEY", FakeAnthropic.api_key)
    config = _config(repo, {"kind": "claude", "model": "claude-haiku-5-5", "effort": "low"}, budget=4)
    state = research_loop(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert [(r.hypothesis.title, r.outcome) for r in result.experiments] == [
        ("baseline", "kept"), ("gain 2.0", "kept"), ("gain 4.0", "kept")]
    assert result.reason == "goal_reached" and (repo / "runs.log").read_text().split() == ["0.0", "2.0", "4.0"]
    first, second = (r["json"] for r in fake.requests)
    assert first["model"] == "claude-haiku-5-5" and first["output_config"] == {"effort": "low"}
    prompt = second["messages"][0]["content"]
    assert "GAIN = 2.0" in prompt and "GAIN = 0.0" not in prompt  # the files at the best commit
    assert "# Related knowledge" in prompt and note in prompt  # what cq knowledge search finds for the goal
    assert f"| {result.experiments[1].exp_id} | kept | 19.43mm | gain 2.0 |" in prompt
    assert all(fake.api_key in (r["headers"].get("x-api-key") or r["headers"].get("authorization", ""))
               for r in fake.requests)
    # the key is nowhere the loop writes: Prefect logs and parameters, MLflow params, tags and artifacts
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run_ids = [uuid.UUID(result.flow_run_id)] + [uuid.UUID(r.flow_run_id) for r in result.experiments]
    logs = "\n".join(log.message for log in prefect_client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))))
    assert "Hypothesis: gain 2.0 — raise GAIN from 0.0" in logs
    seen = [logs, json.dumps(prefect_client.read_flow_run(uuid.UUID(result.flow_run_id)).parameters)]
    for run_id in [result.mlflow_run_id] + [r.mlflow_run_id for r in result.experiments]:
        run = mlflow_client.get_run(run_id)
        seen += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    artifacts = Path(mlflow_client.download_artifacts(result.mlflow_run_id, "", str(tmp_path / "artifacts")))
    seen += [p.read_bytes().decode("utf-8", "replace") for p in artifacts.rglob("*") if p.is_file()]
    assert "GAIN" in "".join(seen)
    for text in seen:
        assert fake.api_key not in text and fake.api_key[14:40] not in text


def test_claude_without_a_fallback_stops_the_loop_and_the_ledger_says_why(stack, repo, monkeypatch):
    import httpx2

    from cq_prefect import research_loop
    from cq_prefect.proposers import claude
    from cq_prefect.testing import FakeAnthropic

    fake = FakeAnthropic(FakeAnthropic.text("I would rather not change anything tonight."))
    monkeypatch.setattr(claude, "default_http_client",
                        lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
    monkeypatch.setenv("ANTHROPIC_API_KEY", FakeAnthropic.api_key)
    config = _config(repo, {"kind": "claude", "effort": "low"}, budget=4)
    state = research_loop(config=config, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result.reason == "proposer_exhausted" and [r.hypothesis.title for r in result.experiments] == ["baseline"]
    assert len(fake.requests) == 2  # the answer and its repair round
    status = json.loads(run_cq("loop", "status", config["name"], "--json").stdout)
    assert status["reason"] == "proposer_exhausted"
    assert status["reason_detail"].startswith("Claude proposed nothing usable (") and "proposer.fallback" in \
        status["reason_detail"]
    shown = run_cq("loop", "status", config["name"]).stdout
    assert "  why: Claude proposed nothing usable" in shown


def test_the_cli_flags_merge_the_best_branch_and_prune_the_others(stack, repo, tmp_path):
    """`cq loop start FILE --merge --prune-branches`: the flags turn on what the file's code section leaves off."""
    import yaml

    root = repo.parent
    ideas = [{"title": "gain one", "edits": [edit("0.0", "1.0")]},
             {"title": "gain less", "edits": [edit("1.0", "0.5")]}]  # builds on gain one, and is worse
    config = _config(repo, {"kind": "scripted", "ideas": ideas}, budget=3)
    name = config["name"]
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_cq("loop", "start", str(path), "--merge", "--prune-branches", "--json", timeout=240)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert [(e["hypothesis"], e["outcome"]) for e in status["experiments"]] == [
        ("baseline", "kept"), ("gain one", "kept"), ("gain less", "discarded")]
    kept = status["experiments"][1]
    assert status["best_branch"] == f"cq/{name}/best" and status["merged"] == kept["commit"]
    assert git(root, "rev-parse", "main") == kept["commit"] and "GAIN = 1.0" in (repo / "model.py").read_text()
    baseline = status["experiments"][0]["exp_id"]
    assert set(git(root, "branch", "--format=%(refname:short)").split()) == {
        "main", f"cq/{name}/best", f"cq/{name}/{baseline}", f"cq/{name}/{kept['exp_id']}"}  # gain less: pruned


def test_a_worker_without_the_workdir_checks_the_commit_out(stack, repo):
    """What a GPU host elsewhere does: the spec's workdir is not there, so it clones the commit."""
    from cq_prefect import submit
    from cq_prefect.spec import ExperimentSpec, GitSource

    root = repo.parent
    (repo / "model.py").write_text("# the model\nGAIN = 3.0\n")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "gain three")
    commit = git(root, "rev-parse", "HEAD")
    spec = ExperimentSpec(name="elsewhere", workdir="/nonexistent/on/this/host/pose", command=f"{PYTHON} train.py",
                          env={"RUNS_LOG": str(repo / "runs.log")}, exp_id=f"elsewhere-{uuid.uuid4().hex[:6]}",
                          source=GitSource(url=str(root), commit=commit, subdir="pose"))
    result = submit(spec, check_workdir=False).wait()
    assert result.outcome == "success", result.message
    # no data/ folder in a fresh clone (git ignores it): the script's fallback offset shows it ran there
    assert result.metric("mpjpe") == pytest.approx(21.43 - 3.0 - 99.0)
    assert (repo / "runs.log").read_text().split() == ["3.0"]


@pytest.mark.parametrize("case, message", [
    ("not-git", "is not a git repository; code edits need one: cd "),
    ("dirty", "editable files in"),
    ("no-key", "export ANTHROPIC_API_KEY"),
])
def test_bad_input_exits_2_and_creates_nothing(stack, repo, tmp_path, case, message):
    workdir = repo
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    args = ["--editable", "model.py", "--ideas", str(tmp_path / "ideas.yaml")]
    (tmp_path / "ideas.yaml").write_text("- {title: a, edits: [{path: model.py, old: 'GAIN = 0.0', new: 'GAIN = 1.0'}]}\n")
    if case == "not-git":
        workdir = tmp_path / "plain"
        workdir.mkdir()
        (workdir / "model.py").write_text("GAIN = 0.0\n")
    elif case == "dirty":
        (repo / "model.py").write_text("GAIN = 0.5\n")
    else:
        args = ["--proposer", "claude", "--editable", "model.py"]
    before = count_all_runs(stack)
    done = run_cq("loop", "start", "--goal", "mpjpe below 18", "--metric", "mpjpe", "--budget", "3",
                  "--workdir", str(workdir), "--command", f"{PYTHON} train.py", "--name", f"bad-{case}", *args, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert count_all_runs(stack) == before


def test_a_code_loop_killed_mid_cycle_resumes_on_the_same_branches(stack, repo, mlflow_client):
    import signal

    from test_loop import DRIVER  # kills the parent at a named point of the loop

    root = repo.parent
    ideas = [{"title": f"gain {n}", "edits": [edit(f"{n - 1}.0", f"{n}.0")]} for n in (1, 2, 3)]
    config = _config(repo, {"kind": "scripted", "ideas": ideas}, budget=4, goal="", target=1, direction="minimize")
    name = config["name"]
    (repo / "loop.json").write_text(json.dumps(config))
    (repo / "driver.py").write_text(DRIVER)
    git(root, "add", "pose/loop.json", "pose/driver.py")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "driver")
    # killed right after c1's submit, then between c2's MLflow run and its flow run (its branch is made)
    for resume, where in enumerate(("submitted", "intent")):
        done = subprocess.run([PYTHON, "driver.py", where, f"-c{resume + 1}-", "loop.json", str(resume)], cwd=repo,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == -signal.SIGKILL, (done.stdout[-2000:], done.stderr[-2000:])
    resumed = run_cq("loop", "resume", name, "--json", timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert [e["outcome"] for e in status["experiments"]] == ["kept"] * 4 and status["reason"] == "budget_exhausted"
    assert (repo / "runs.log").read_text().split() == ["0.0", "1.0", "2.0", "3.0"]  # each experiment once
    # one commit per experiment with edits, each on the one before: nothing was applied twice
    start = git(root, "rev-parse", "main")
    assert git(root, "rev-list", "--count", f"{start}..cq/{name}/best") == "3"
    assert git(root, "log", "--format=%s", f"{start}..cq/{name}/best").splitlines() == ["gain 3", "gain 2", "gain 1"]
    assert [e.get("commit") for e in status["experiments"][1:]] == [
        git(root, "rev-parse", f"cq/{name}/{e['exp_id']}") for e in status["experiments"][1:]]
    assert status["best_branch"] == f"cq/{name}/best"
