"""Bad input: exit code 2, a message that names the problem and the fix, and nothing created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, count_all_runs, run_cq

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"--workdir": "/nonexistent/cq/project"}, ["workdir /nonexistent/cq/project does not exist", "create it"]),
        ({"--command": "   "}, ["the command is empty", "python train.py"]),
        ({"--gpu-count": "-1"}, ["gpu_count", "greater than or equal to 0"]),
        ({"--exp-id": "exp 44!"}, ["exp_id", "e.g. exp-044"]),
        ({"--env": "NOEQUALS"}, ["--env expects KEY=VALUE", "NOEQUALS"]),
        ({"--timeout": "0"}, ["timeout", "greater than 0"]),
    ],
    ids=["missing-workdir", "empty-command", "negative-gpus", "bad-exp-id", "bad-env", "zero-timeout"],
)
def test_submit_rejects_bad_input_and_creates_nothing(stack, workdir, overrides, expected):
    before = count_all_runs(stack)
    flags = {"--name": "bad", "--workdir": str(workdir), "--command": f"{PYTHON} -c pass", **overrides}
    args = [item for pair in flags.items() for item in pair]
    output = run_cq("submit", *args)
    assert output.returncode == 2, output.stdout + output.stderr
    for text in expected:
        assert text in output.stderr
    assert count_all_runs(stack) == before


def test_api_rejects_unknown_spec_fields_by_name(stack, workdir):
    import cq_prefect

    before = count_all_runs(stack)
    with pytest.raises(cq_prefect.SpecError) as raised:
        cq_prefect.submit(name="x", workdir=str(workdir), command="true", learning_rate=0.1)
    assert "unknown field 'learning_rate'" in str(raised.value)
    assert "gpu_count" in str(raised.value)  # lists the fields that exist
    assert count_all_runs(stack) == before


def test_server_rejects_unknown_spec_fields_from_prefect_cli(stack, workdir):
    before = count_all_runs(stack)
    spec = {"name": "x", "workdir": str(workdir), "command": "true", "learning_rate": 0.1}
    prefect = str(Path(sys.executable).with_name("prefect"))
    output = subprocess.run(
        [prefect, "deployment", "run", "experiment/local", "--params", json.dumps({"spec": spec})],
        capture_output=True, text=True, timeout=120,
    )
    assert output.returncode != 0
    assert "learning_rate" in output.stdout + output.stderr
    assert count_all_runs(stack) == before


@pytest.mark.parametrize("command", [["watch", "no-such-run"], ["metrics", "exp-nothere"]])
def test_unknown_run_is_bad_input(stack, command):
    output = run_cq(*command)
    assert output.returncode == 2
    assert f"no run '{command[1]}'" in output.stderr
    assert "prefect flow-run ls" in output.stderr


def test_missing_required_flag_is_exit_2():
    output = run_cq("submit", "--name", "x")
    assert output.returncode == 2
    assert "--workdir" in output.stderr and "--command" in output.stderr
