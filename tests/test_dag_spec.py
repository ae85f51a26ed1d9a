"""DAG YAML checking and planning (cq_prefect.dag_spec): pure, no server — plus the malformed-file corpus
through the real CLI, which must exit 2 with the message and create nothing."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import count_all_runs, run_cq
from cq_prefect.dag_spec import Condition, check_dag, find_cycle, parse_dag
from cq_prefect.errors import DagError

BAD = sorted((Path(__file__).parent / "dags" / "bad").glob("*.yaml"))
SEED = Path(__file__).resolve().parents[1] / "deployments" / "dags" / "seed-pipeline.yaml"


def _meta(path: Path) -> dict[str, str]:
    return {line[2:].split(":", 1)[0]: line.split(":", 1)[1].strip()
            for line in path.read_text().splitlines() if line.startswith("# ") and ":" in line}


def test_the_corpus_has_at_least_20_malformed_files():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_malformed_file_is_reported_with_its_line_and_node(path):
    meta = _meta(path)
    problems, dag = check_dag(path.read_text())
    assert dag is None and problems
    rendered = "\n".join(p.render(path.name) for p in problems)
    assert meta["expect"] in rendered, rendered
    if "line" in meta:
        assert any(p.line == int(meta["line"]) for p in problems), rendered
        assert f"{path.name}:{meta['line']}" in rendered
    if "node" in meta:
        assert any(p.node == meta["node"] for p in problems), rendered


def test_cli_rejects_every_malformed_file_with_exit_2_and_creates_nothing(stack):
    before = count_all_runs(stack)
    for path in BAD:
        meta = _meta(path)
        for action in (["validate"], ["run", "--watch"], ["deploy", "--cron", "0 2 * * *"]):
            result = run_cq("dag", *action, str(path))
            assert result.returncode == 2, (path.name, action, result.stdout, result.stderr)
            assert meta["expect"] in result.stderr, (path.name, result.stderr)
            assert "Traceback" not in result.stderr
    assert count_all_runs(stack) == before
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:  # no flow or deployment named after a bad DAG either
        assert not client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline", "broken"])))


def test_missing_file_and_bad_flags_exit_2(tmp_path):
    result = run_cq("dag", "validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_cq("dag", "run", str(SEED), "--parallel", "0")
    assert result.returncode == 2 and "--parallel 0" in result.stderr
    result = run_cq("dag", "deploy", str(SEED), "--cron", "every night")
    assert result.returncode == 2 and "is not a cron schedule" in result.stderr, result.stderr
    result = run_cq("dag", "deploy", str(SEED), "--cron", "0 2 * * *", "--timezone", "Mars/Olympus")
    assert result.returncode == 2 and "is not a cron schedule" in result.stderr, result.stderr


def test_validate_prints_the_plan_of_the_seed_pipeline():
    result = run_cq("dag", "validate", str(SEED))
    assert result.returncode == 0, result.stderr
    assert "DAG full-pipeline: 3 nodes, 2 dependencies" in result.stdout
    assert "stage 1: preprocess" in result.stdout and "stage 2: train" in result.stdout
    assert "stage 3: evaluate (when train: metrics.train_accuracy >= 0.8)" in result.stdout


def test_stages_group_independent_nodes_in_file_order():
    dag = parse_dag("""
name: diamond
nodes:
  - {name: prep, command: echo}
  - {name: left, command: echo, depends_on: [prep]}
  - {name: right, command: echo, gpu_count: 2, depends_on: [prep]}
  - {name: lonely, command: echo}
  - {name: join, command: echo, depends_on: [left, right]}
""")
    assert dag.stages() == [["prep", "lonely"], ["left", "right"], ["join"]]
    assert dag.downstream({"left"}) == {"left", "join"}
    assert "right (2 GPUs)" in dag.plan_text()


def test_every_problem_is_reported_at_once():
    with pytest.raises(DagError) as caught:
        parse_dag("""
name: many
nodes:
  - {name: a, command: echo, gpus: 1}
  - {name: b, command: ''}
""", "many.yaml")
    assert len(caught.value.problems) == 2
    assert "many.yaml:4" in str(caught.value) and "many.yaml:5" in str(caught.value)


def test_depends_on_and_dependencies_merge_and_dedupe():
    dag = parse_dag("""
name: merge
nodes:
  - {name: a, command: echo}
  - {name: b, command: echo, depends_on: [a]}
dependencies:
  - {source: a, target: b, when: "metrics.x > 1"}
""")
    [edge] = dag.edges()
    assert edge.kind == "conditional" and edge.when == "metrics.x > 1"


def test_condition_language():
    assert Condition("metrics.accuracy >= 0.9").holds({"accuracy": 0.95}) == (True, "")
    holds, why = Condition("metrics.accuracy >= 0.9").holds({"accuracy": 0.5})
    assert not holds and "accuracy=0.5" in why
    holds, why = Condition("metrics.accuracy >= 0.9").holds({})
    assert not holds and "never printed" in why
    assert Condition("metrics['val/loss'] < 0.3 and not metrics.train.acc < 0.5").holds(
        {"val/loss": 0.1, "train.acc": 0.7})[0]
    assert Condition("0 < metrics.x < 1 or metrics.y == -2").holds({"x": 5, "y": -2})[0]
    for bad in ("metrics.x", "metrics.x + 1 > 2", "os.system('x') == 0", "metrics.x > 'a'", "lambda: 1", "x > 1"):
        with pytest.raises(ValueError):
            Condition(bad)


def test_fingerprint_follows_what_decides_a_result(tmp_path):
    text = """
name: fp
environment: {SEED: "1"}
nodes:
  - {name: a, command: python a.py}
  - {name: b, command: python b.py, depends_on: [a], timeout: 10, max_retries: 2}
"""
    base = parse_dag(text)
    same = parse_dag(text.replace("timeout: 10", "timeout: 99").replace("max_retries: 2", "max_retries: 0"))
    changed_env = parse_dag(text.replace('SEED: "1"', 'SEED: "2"'))
    changed_cmd = parse_dag(text.replace("python b.py", "python b.py --lr=0.1"))
    fp = lambda dag, n, d=tmp_path: dag.fingerprint(n, d)  # noqa: E731
    assert fp(base, "b") == fp(same, "b")  # retries and timeouts do not change what a success means
    assert fp(base, "a") != fp(changed_env, "a") and fp(base, "b") != fp(changed_env, "b")
    assert fp(base, "a") == fp(changed_cmd, "a") and fp(base, "b") != fp(changed_cmd, "b")
    assert fp(base, "a") != fp(base, "a", tmp_path / "elsewhere")


def test_effective_settings_apply_dag_defaults(tmp_path):
    dag = parse_dag("""
name: defaults
working_dir: sub
environment: {A: "1", B: "1"}
max_retries: 2
timeout: 30
pool: gpus
nodes:
  - {name: cpu, command: echo, environment: {B: "2"}}
  - {name: gpu, command: echo, gpu_count: 1, working_dir: /abs, max_retries: 0, timeout: 5}
""")
    cpu, gpu = dag.effective("cpu", tmp_path), dag.effective("gpu", tmp_path)
    assert cpu["workdir"] == str(tmp_path / "sub") and cpu["env"] == {"A": "1", "B": "2"}
    assert cpu["max_retries"] == 2 and cpu["timeout"] == 30 and cpu["pool"] is None
    assert gpu["workdir"] == "/abs" and gpu["max_retries"] == 0 and gpu["timeout"] == 5 and gpu["pool"] == "gpus"


def test_find_cycle_returns_a_closed_path():
    assert find_cycle(["a", "b", "c"], [("a", "b"), ("b", "c")]) is None
    assert find_cycle(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "b")]) == ["b", "c", "b"]


def test_a_500_node_dag_checks_and_plans():
    rng = random.Random(3)
    lines = ["name: big", "nodes:"]
    for i in range(500):
        deps = sorted({f"n{rng.randrange(i)}" for _ in range(min(i, 3))}) if i else []
        lines.append(f"  - {{name: n{i}, command: echo {i}, depends_on: [{', '.join(deps)}]}}")
    dag = parse_dag("\n".join(lines))
    order = [n for stage in dag.stages() for n in stage]
    position = {n: i for i, n in enumerate(order)}
    assert len(order) == 500 and all(position[e.source] < position[e.target] for e in dag.edges())
