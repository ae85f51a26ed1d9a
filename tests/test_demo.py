"""The README's main job on a machine with no stack — `cq demo --quick` starts one and runs the pose research
loop end to end — then what users see, rendered by headless Chromium: the loop's MLflow parent run and its
Prefect flow run. Screenshots are kept under CQ_TEST_OUTPUT (default: test-output/ in the checkout)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from browser import find_chromium, render
from conftest import free_port, run_cq
from cq_prefect.goal import format_value

pytestmark = pytest.mark.e2e

OUTPUT = Path(os.environ.get("CQ_TEST_OUTPUT") or Path(__file__).resolve().parents[1] / "test-output")


def _isolated_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with no stack: own CQ_HOME and ports, no server URLs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(CQ_HOME=str(tmp_path / "cqhome"), CQ_PREFECT_PORT=str(free_port()), CQ_MLFLOW_PORT=str(free_port()),
               PREFECT_WORKER_QUERY_SECONDS="1", COLUMNS="160")
    return env


def test_quick_demo_from_no_stack_to_the_report_and_the_uis(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        message = "headless Chromium is needed to check the UIs: apt-get install chromium"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): this end-to-end path is never skipped there
        pytest.skip(message)
    env = _isolated_env(tmp_path)
    try:
        done = run_cq("demo", "--quick", env=env, timeout=400)
        out = done.stdout
        assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
        assert "no running stack found; starting the embedded one" in done.stderr
        # knowledge first (none on a fresh stack), then the loop live, then the report
        assert out.index("Loading related knowledge…") < out.index("[loop] Cycle 1 — best:") < out.index("Results")
        assert "nothing yet: this is the first pose-demo-quick loop" in out
        for line in ("Hypothesis: bone-length loss", "Execute: submit exp-043", "Execute: submit exp-044",
                     "Hypothesis: occlusion augmentation"):
            assert line in out
        report = out[out.index("Results"):]
        for text in ("Experiment", "Change", "MPJPE", "exp-042", "Baseline", "exp-043", "+ bone-length loss",
                     "exp-044", "+ occlusion augmentation", "total compute", "the loop ended: budget_exhausted"):
            assert text in report, text
        status = json.loads(run_cq("loop", "status", "pose-demo-quick", "--json", env=env).stdout)
        assert [e["exp_id"] for e in status["experiments"]] == ["exp-042", "exp-043", "exp-044"]
        for experiment in status["experiments"]:  # every number in the table is the ledger's, from training
            assert experiment["value"] is not None and 20 < experiment["value"] < 1000
            assert format_value(experiment["value"], "mm") in report
        best, baseline = status["best"], status["experiments"][0]["value"]
        assert f"reduction {(baseline - best) / baseline * 100:.1f}%" in report
        prefect_url = re.search(r"Prefect UI: (\S+)", report).group(1)
        mlflow_url = re.search(r"MLflow UI: +(\S+)", report).group(1)
        assert prefect_url.endswith(status["flow_run_id"]) and mlflow_url.endswith(status["mlflow_run_id"])

        # what users see: the loop and its experiments, rendered by a real browser
        OUTPUT.mkdir(parents=True, exist_ok=True)
        # MLflow: the loop's parent run, with its experiments listed as child runs
        mlflow_dom = render(mlflow_url, OUTPUT / "mlflow-loop-run.png", expect=["pose-demo-quick (loop)", "exp-043"])
        assert "pose-demo-quick (loop)" in mlflow_dom and "exp-043" in mlflow_dom
        # Prefect: the loop's flow run, its log naming each experiment it submitted
        prefect_dom = render(prefect_url, OUTPUT / "prefect-loop-flow-run.png",
                             expect=["pose-demo-quick", "Execute: submit exp-043"])
        assert "pose-demo-quick" in prefect_dom and "Execute: submit exp-043" in prefect_dom
        for png in ("mlflow-loop-run.png", "prefect-loop-flow-run.png"):
            assert (OUTPUT / png).stat().st_size > 10_000  # a rendered page, not a blank one
    finally:
        down = run_cq("down", env=env, timeout=120)
    assert "stopped worker, mlflow-server, prefect-server" in down.stderr
    assert not list((tmp_path / "cqhome" / "run").glob("*.pid"))
