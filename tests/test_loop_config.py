"""LoopConfig, goal parsing and goal logic, and command overrides: pure, no Prefect server."""

from __future__ import annotations

import re

import math
import shlex
from pathlib import Path

import pytest

from cq_prefect.errors import BadInput, LoopConfigError, MetricNeverPrinted, OverrideError
from cq_prefect.goal import best_value, format_value, improvement, is_better, parse_goal, parse_number, reaches
from cq_prefect.loop_config import EXAMPLE, LoopConfig, parse_duration
from cq_prefect.overrides import merge_overrides, placeholders, render_command
from cq_prefect.proposers import OptunaProposer, ScriptedProposer
from cq_prefect.pruning import AshaRule, MedianRule, NoPruning
from cq_prefect.testing import make_record

IDEAS_INLINE = "proposer: {kind: scripted, ideas: [{title: bone-length loss, overrides: {bone_loss: 0.1}}]}\n"


def config_text(**fields: str) -> str:
    """EXAMPLE with top-level lines replaced (or added): config_text(budget="0")."""
    lines = {line.split(":", 1)[0]: line for line in EXAMPLE.splitlines()}
    for key, value in fields.items():
        if value is None:
            lines.pop(key, None)
        else:
            lines[key] = f"{key}: {value}"
    return "\n".join(lines.values()) + "\n"


# --- goal text ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("goal", "value", "direction", "unit"),
    [
        ("improve MPJPE below 18mm", 18.0, "minimize", "mm"),
        ("MPJPE below 18 mm, at most 5 experiments", 18.0, "minimize", None),
        ("get the loss under 0.2", 0.2, "minimize", None),
        ("top-5 accuracy above 90%", 90.0, "maximize", "%"),
        ("accuracy > 0.9", 0.9, "maximize", None),
        ("acc>=0.9", 0.9, "maximize", None),
        ("loss ≤ 1e-3", 1e-3, "minimize", None),
        ("mpjpe < 18", 18.0, "minimize", None),
        ("at least 0.95 mAP", 0.95, "maximize", None),
        ("at most 0.05 error rate", 0.05, "minimize", None),
        ("no more than 2.5ms latency", 2.5, "minimize", "ms"),
        ("BLEU of 30 or more", 30.0, "maximize", None),
        ("WER 12% or lower", 12.0, "minimize", "%"),
        ("reach 0.9 accuracy", 0.9, None, None),
        ("reduce mpjpe from 21.4mm to 18mm", 18.0, None, "mm"),
        ("improve 3d pose MPJPE below 18mm within 8 hours", 18.0, "minimize", "mm"),
        ("reward exceeds -0.5", -0.5, "maximize", None),
    ],
)
def test_goal_text_gives_target_and_direction(goal, value, direction, unit):
    found = parse_goal(goal)
    assert found is not None
    assert (found.value, found.direction, found.unit) == (value, direction, unit)


@pytest.mark.parametrize("goal", ["make it better", "improve accuracy by 2%", "at most 5 experiments", "", "f1 up"])
def test_goal_without_a_target(goal):
    assert parse_goal(goal) is None


@pytest.mark.parametrize("goal", ["loss below 0.2 and accuracy above 0.9", "try 2 layers to reach 0.9"])
def test_ambiguous_goal_is_an_error_not_a_guess(goal):
    with pytest.raises(ValueError, match="several targets"):
        parse_goal(goal)


def test_numbers_and_durations():
    assert parse_number("18mm") == (18.0, "mm") and parse_number(" 90 % ") == (90.0, "%")
    assert parse_number(1) == (1.0, None)
    for bad in ("fast", "1.2.3", True):
        with pytest.raises(ValueError):
            parse_number(bad)
    assert parse_duration("8h") == 28800 and parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400
    assert parse_duration("2d") == 172800 and parse_duration(12.5) == 12.5 and parse_duration("600") == 600
    for bad in ("soon", "0", -1, "8 fortnights", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_direction_aware_comparisons():
    assert is_better(19.87, 21.43, "minimize") and not is_better(21.43, 19.87, "minimize")
    assert is_better(0.91, 0.9, "maximize") and not is_better(0.9, 0.9, "maximize")
    assert is_better(5.0, None, "maximize") and not is_better(None, 5.0, "minimize")
    assert not is_better(math.nan, 5.0, "minimize") and is_better(5.0, math.nan, "minimize")
    assert improvement(19.87, 21.43, "minimize") == 1.56 and improvement(0.8, 0.9, "maximize") == -0.1
    assert reaches(18.0, 18.0, "minimize") and not reaches(18.01, 18.0, "minimize") and reaches(0.95, 0.9, "maximize")
    assert best_value([0.5, None, math.nan, 0.7], "maximize") == 0.7 and best_value([], "minimize") is None
    assert format_value(19.87, "mm") == "19.87mm" and format_value(None) == "–" and format_value(math.inf) == "inf"


# --- LoopConfig: good input --------------------------------------------------------------------


def test_example_config_derives_target_direction_and_unit():
    config = LoopConfig.from_yaml(EXAMPLE)
    assert (config.direction, config.target, config.unit) == ("minimize", 18.0, "mm")
    assert config.time_budget == 8 * 3600 and config.parallel == 1 and config.metric_strategy == "last"
    assert isinstance(config.create_proposer(), ScriptedProposer)
    assert isinstance(config.create_pruning_rule(), NoPruning)


def test_explicit_target_with_unit_and_derived_direction():
    config = LoopConfig.from_yaml(config_text(goal="'MPJPE as low as possible'", target="18mm", direction="minimize"))
    assert (config.target, config.unit) == (18.0, "mm")
    config = LoopConfig.from_yaml(config_text(goal="reach 0.9 accuracy", direction="Maximize"))
    assert (config.target, config.direction) == (0.9, "maximize")
    config = LoopConfig.from_yaml(
        config_text(goal="'loss below 0.2 and acc above 0.9'", target="0.2", direction="minimize")
    )
    assert config.target == 0.2  # an explicit target settles an ambiguous goal


def test_config_from_file_resolves_paths_from_its_folder(tmp_path):
    (tmp_path / "ideas.yaml").write_text("- title: wider\n  overrides: {width: 512}\n")
    (tmp_path / "space.yaml").write_text("lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}\n")
    (tmp_path / "scripted.yaml").write_text(
        config_text(
            experiment="{workdir: pose, command: python train.py}", proposer="{kind: scripted, ideas: ideas.yaml}"
        )
    )
    (tmp_path / "optuna.yaml").write_text(
        config_text(proposer="{kind: optuna, space: space.yaml, seed: 4}", parallel="2")
        + "pruning: {rule: median, min_experiments: 2, min_step: 5}\n"
    )
    scripted = LoopConfig.from_yaml(tmp_path / "scripted.yaml")
    assert scripted.experiment.workdir == str(tmp_path / "pose")
    assert [i.title for i in scripted.proposer.ideas] == ["wider"]
    optuna = LoopConfig.from_yaml(str(tmp_path / "optuna.yaml"))
    assert isinstance(optuna.create_proposer(), OptunaProposer)
    rule = optuna.create_pruning_rule()
    assert isinstance(rule, MedianRule) and (rule.min_experiments, rule.min_step) == (2, 5)


def test_config_survives_a_json_round_trip():
    # A deployment passes the config as a flow parameter: it must come back identical, files already read.
    config = LoopConfig.from_yaml(
        config_text(
            proposer="{kind: optuna, space: {lr: {type: float, low: 0.001, high: 0.1, log: true}, act: [relu, gelu]}}",
            time_budget="30m",
        )
    )
    again = LoopConfig.model_validate(config.model_dump(mode="json"))
    assert again == config
    params = config.mlflow_params()
    assert params["direction"] == "minimize" and params["target"] == "18.0" and params["budget"] == "5"
    assert params["experiment.command"] == "python train.py" and "lr" in params["proposer.space"]
    assert all(isinstance(v, str) for v in params.values())


def test_pruning_settings_build_each_rule():
    asha = LoopConfig.from_yaml(EXAMPLE + "pruning: {rule: asha, min_step: 2, reduction_factor: 4}\n")
    rule = asha.create_pruning_rule()
    assert isinstance(rule, AshaRule) and rule.reduction_factor == 4 and rule.rung_of(9) == 8


def test_parse_accepts_a_mapping_and_names_fields():
    data = {
        "name": "flags",
        "goal": "loss below 0.2",
        "metric": "@loss",
        "budget": 3,
        "experiment": {"workdir": "/w", "command": "python t.py"},
        "proposer": {"kind": "scripted", "ideas": [{"title": "a"}]},
    }
    assert LoopConfig.parse(data).metric == "loss"
    with pytest.raises(LoopConfigError, match=r"loop config: budget: budget 0 must be at least 1"):
        LoopConfig.parse({**data, "budget": 0})


# --- LoopConfig: bad input (exit 2, names the field, the line and the fix) ----------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (config_text(goal="improve MPJPE"), r"line 2: goal: no target in 'improve MPJPE'.*give target: 18"),
        (config_text(goal="reach 0.9"), r"direction: .*give direction: minimize or maximize"),
        (config_text(direction="lower"), r"line \d+: direction: direction 'lower' must be minimize or maximize"),
        (config_text(direction="maximize"), r"the goal says 'below 18mm' \(minimize\) but direction is maximize"),
        (config_text(budget="0"), r"line 4: budget: budget 0 must be at least 1"),
        (config_text(budget="-3"), r"budget -3 must be at least 1"),
        (config_text(parallel="0"), r"parallel: .*greater than or equal to 1"),
        (config_text(time_budget="soon"), r"line \d+: time_budget: 'soon' is not a duration"),
        (
            config_text(proposer="{kind: optuna, space: {lr: {type: float, low: 0.1, high: 0.01}}}"),
            r"proposer.space.lr: low 0.1 > high 0.01; swap them",
        ),
        (config_text(proposer="optuna"), r"proposer.space: is required"),
        (config_text(proposer="{kind: bayes}"), r"proposer: kind 'bayes' is not one of"),
        (config_text(proposer="{kind: scripted, ideas: missing.yaml}"), r"ideas file .*missing.yaml' not found"),
        (config_text(name="'my loop'"), r"name 'my loop' must be letters"),
        (config_text(metric="'a b'"), r"metric 'a b' is not a metric key"),
        (EXAMPLE + "command: python x.py\n", r"command: unknown key 'command'; put command under experiment:"),
        (EXAMPLE + "budgett: 3\n", r"budgett: unknown key 'budgett' \(allowed: name, goal"),
        (
            config_text(experiment="{workdir: /w, command: 'cd a && python train.py'}"),
            r"proposer.ideas: idea 1 \('bone-length loss'\) does not fit experiment.command",
        ),
        (config_text(experiment="{workdir: /w, command: 'python t.py --lr={lr}'}"), r"idea 1 .*no value for lr"),
        (
            config_text(
                experiment="{workdir: /w, command: 'python t.py | tee log'}",
                proposer="{kind: optuna, space: {lr: [0.1, 0.01]}}",
            ),
            r"proposer.space: its parameters do not fit experiment.command: cannot tell which part",
        ),
        ("name: [x\n", r"not valid YAML"),
        ("- a\n", r"a loop config is a mapping"),
    ],
)
def test_bad_config_is_exit_2_with_the_field_and_fix(text, expected):
    with pytest.raises(LoopConfigError, match=expected) as info:
        LoopConfig.from_yaml(text)
    assert isinstance(info.value, BadInput) and info.value.exit_code == 2


def test_bad_search_space_file_names_its_own_line(tmp_path):
    (tmp_path / "space.yaml").write_text(
        "lr: {type: float, low: 1.0e-4, high: 0.1}\nwidth:\n  type: int\n  low: 9\n  high: 3\n"
    )
    (tmp_path / "loop.yaml").write_text(config_text(proposer="{kind: optuna, space: space.yaml}"))
    with pytest.raises(LoopConfigError) as info:
        LoopConfig.from_yaml(tmp_path / "loop.yaml")
    message = str(info.value)
    assert "loop.yaml line 7: proposer.space:" in message
    assert "space.yaml line 2: width: low 9 > high 3" in message


def test_placeholder_commands_must_cover_the_search_space():
    with pytest.raises(LoopConfigError, match=r"none for search-space parameter 'wd'; add --wd=\{wd\}"):
        LoopConfig.from_yaml(
            config_text(
                experiment="{workdir: /w, command: 'python t.py --lr={lr}'}",
                proposer="{kind: optuna, space: {lr: [0.1, 0.01], wd: [0, 1]}}",
            )
        )
    with pytest.raises(LoopConfigError, match=r"placeholder \{epochs\} has no value"):
        LoopConfig.from_yaml(
            config_text(
                experiment="{workdir: /w, command: 'python t.py --lr={lr} --epochs={epochs}'}",
                proposer="{kind: optuna, space: {lr: [0.1, 0.01]}}",
            )
        )
    ok = LoopConfig.from_yaml(
        config_text(
            experiment="{workdir: /w, command: 'python t.py --lr={lr} --epochs={epochs}', params: {epochs: 10}}",
            proposer="{kind: optuna, space: {lr: [0.1, 0.01]}}",
        )
    )
    assert ok.experiment.render({"lr": 0.01}) == "python t.py --lr=0.01 --epochs=10"


def test_claude_settings_parse_with_model_effort_space_and_fallback():
    config = LoopConfig.from_yaml(config_text(
        proposer="{kind: claude, model: some-model, effort: low, space: {lr: {type: float, low: 0.001, high: 0.1}}, "
                 "fallback: {kind: scripted, ideas: [{title: wider, overrides: {width: 512}}]}}"))
    assert config.proposer.model == "some-model" and config.proposer.effort == "low"
    assert config.proposer.space["lr"].high == 0.1 and config.proposer.fallback.ideas[0].title == "wider"
    with pytest.raises(LoopConfigError, match="effort"):
        LoopConfig.from_yaml(config_text(proposer="{kind: claude, effort: extreme}"))


@pytest.mark.parametrize(("fields", "expected"), [
    ({"proposer": "{kind: scripted, ideas: [{title: a, edits: [{path: model.py, old: x, new: y}]}]}"},
     "idea 1 ('a') edits code; add code: {editable:"),
    ({"code": "{editable: ['../*.py']}"}, "must be relative to the workdir and stay inside it"),
    ({"code": "{editable: ['/etc/*']}"}, "must be relative to the workdir"),
    ({"code": "{editable: ['*.py']}",
      "proposer": "{kind: scripted, ideas: [{title: a, edits: [{path: data/x.csv, old: x, new: y}]}]}"},
     "idea 1 ('a')"),
    ({"code": "{editable: ['*.py']}",
      "proposer": "{kind: scripted, ideas: [{title: a, edits: [{path: ../train.py, old: x, new: y}]}]}"}, ".."),
    ({"code": "{}"}, "editable"),
    ({"proposer": "{kind: claude}"}, "Claude has nothing it may change"),
])
def test_code_settings_and_idea_edits_are_checked_when_parsed(fields, expected):
    with pytest.raises(LoopConfigError, match=re.escape(expected)):
        LoopConfig.from_yaml(config_text(**fields))


def test_metric_never_printed_message():
    error = MetricNeverPrinted("mpjpe")
    assert str(error) == "metric 'mpjpe' was never printed — does the script print @mpjpe=…?"
    assert error.exit_code == 2


# --- goal logic on the config ------------------------------------------------------------------


def test_judge_best_and_stop_reasons():
    config = LoopConfig.from_yaml(config_text(budget="4") + "max_failures: 2\n")
    assert config.judge(19.9, 21.4) == "kept" and config.judge(21.4, 21.4) == "discarded"
    assert config.judge(None, 21.4) == "no_metric" and config.judge(1.0, 2.0, crashed=True) == "crashed"
    assert config.judge(1.0, 2.0, pruned=True) == "pruned" and config.judge(5.0, None) == "kept"
    assert config.format_value(19.87) == "19.87mm" and config.improvement(19.87, 21.43) == 1.56

    base = make_record("baseline", 21.4, "kept", exp_id="e0", cycle=0)
    worse = make_record("worse", 22.0, "discarded", exp_id="e1")
    pruned = make_record("pruned", None, "pruned", exp_id="e2")
    assert config.best([base, worse, pruned]) is base
    assert config.stop_reason([base, worse, pruned]) is None
    assert config.failures([base, pruned]) == 0  # pruning is on purpose, not a failure
    assert config.budget_left([base, make_record("r", None, "running")]) == 2  # a running child holds budget
    assert config.stop_reason([base, worse, pruned, make_record("x", 25.0)]) == "budget_exhausted"
    crashes = [make_record(f"c{i}", None, "crashed", exp_id=f"c{i}") for i in range(2)]
    assert config.stop_reason([base, *crashes]) == "too_many_failures"
    goal = make_record("goal", 17.5, "kept", exp_id="e9")
    assert config.stop_reason([base, *crashes, goal]) == "goal_reached"  # the goal outranks everything
    assert config.stop_reason([base], elapsed_s=8 * 3600) == "time_budget"
    assert config.stop_reason([base], elapsed_s=10) is None
    assert config.stop_reason([base], proposer_exhausted=True) == "proposer_exhausted"
    assert config.kept_changes([base, worse, goal]) == [{}, {}]


# --- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "overrides", "expected"),
    [
        ("python train.py", {"lr": 0.01}, "python train.py --lr=0.01"),
        ("python train.py --lr=0.1 --epochs 10", {"lr": 0.05}, "python train.py --lr=0.05 --epochs 10"),
        ("python train.py --lr='0.1'", {"lr": 0.05}, "python train.py --lr=0.05"),
        ("python train.py  ", {"flag": True, "off": False}, "python train.py --flag=true --off=false"),
        ("python train.py > out.log 2>&1", {"lr": 1e-05}, "python train.py --lr=1e-05 > out.log 2>&1"),
        ("python train.py # baseline", {"a": 1}, "python train.py --a=1 # baseline"),
        ("cd sub && python train.py --lr=0.1", {"lr": 0.2}, "cd sub && python train.py --lr=0.2"),
        ("python t.py --name={name}", {"name": "a b; rm -rf /"}, "python t.py --name='a b; rm -rf /'"),
        ("python t.py --lr {lr} && echo ${HOME} {lr}", {"lr": 3}, "python t.py --lr 3 && echo ${HOME} 3"),
        ("awk '{print $1}' f && python t.py", {}, "awk '{print $1}' f && python t.py"),
        ("python t.py --model.layers=2", {"model.layers": 4}, "python t.py --model.layers=4"),
    ],
)
def test_render_command(command, overrides, expected):
    assert render_command(command, overrides) == expected


def test_values_are_quoted_for_the_shell():
    nasty = "x'; echo pwned; '$(reboot)"
    rendered = render_command("python t.py", {"tag": nasty})
    assert shlex.split(rendered) == ["python", "t.py", f"--tag={nasty}"]
    rendered = render_command("python t.py --tag {tag}", {"tag": nasty})
    assert shlex.split(rendered) == ["python", "t.py", "--tag", nasty]


@pytest.mark.parametrize(
    ("command", "overrides", "expected"),
    [
        ("python t.py --lr={lr} --wd={wd}", {"lr": 1}, r"no value for wd"),
        ("python t.py --lr={lr}", {"lr": 1, "wd": 2}, r"sets wd but the command has no placeholder.*--wd=\{wd\}"),
        ("python t.py --lr='{lr}'", {"lr": 1}, r"placeholder \{lr\} is inside quotes"),
        ("python a.py | tee log", {"lr": 1}, r"cannot tell which part .* '\|'"),
        ("python a.py; python b.py", {"lr": 1}, r"cannot tell which part"),
        ("python a.py", {"bad key": 1}, r"'bad key' is not a valid parameter name"),
    ],
)
def test_overrides_that_do_not_fit_are_errors(command, overrides, expected):
    with pytest.raises(OverrideError, match=expected) as info:
        render_command(command, overrides)
    assert info.value.exit_code == 2


def test_changes_accumulate_onto_the_base():
    assert placeholders("python t.py --lr={lr} {lr} {wd} ${HOME} {{x}}") == ["lr", "wd"]
    assert merge_overrides({"lr": 0.1, "w": 1}, {"bone": True}, None, {"lr": 0.05}) == {
        "lr": 0.05,
        "w": 1,
        "bone": True,
    }
    config = LoopConfig.from_yaml(
        config_text(
            experiment="{workdir: /w, command: python train.py, params: {lr: 0.1}, "
            "gpu_count: 1, timeout: 30m, env: {SEED: '1'}}"
        )
    )
    spec = config.experiment.spec(
        name="pose-mpjpe/2/0", exp_id="exp-045", changes=[{"bone_loss": 0.1}, {"attention": "cross"}], tags=["cycle=2"]
    )
    assert spec.command == "python train.py --lr=0.1 --bone_loss=0.1 --attention=cross"
    assert spec.params == {"lr": 0.1, "bone_loss": 0.1, "attention": "cross"}
    assert (spec.gpu_count, spec.timeout, spec.env, spec.tags) == (1, 1800.0, {"SEED": "1"}, ["cycle=2"])


# --- the pure cores stay pure ------------------------------------------------------------------

PURE_MODULES = [
    "cq_prefect.goal",
    "cq_prefect.records",
    "cq_prefect.overrides",
    "cq_prefect.pruning",
    "cq_prefect.yaml_source",
    "cq_prefect.loop_config",
    "cq_prefect.testing",
    "cq_prefect.proposers",
    "cq_prefect.proposers.base",
    "cq_prefect.proposers.scripted",
    "cq_prefect.proposers.search_space",
    "cq_prefect.proposers.optuna_study",
]


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_cores_import_no_prefect_and_their_examples_hold(name):
    import ast
    import doctest
    import importlib

    module = importlib.import_module(name)
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("prefect", "mlflow")}, f"{name} imports Prefect or MLflow"
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failures == 0


# --- experiment names --------------------------------------------------------------------------------


def test_exp_ids_number_experiments_from_first_n():
    config = LoopConfig.from_yaml(config_text(exp_ids='"exp-{n:03d}"', first_n="42", parallel="2"))
    assert [config.exp_id(c, s) for c, s in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]] == [
        "exp-042", "exp-043", "exp-044", "exp-045", "exp-046"]
    default = LoopConfig.from_yaml(config_text())
    assert default.exp_id(3, 1) == f"{default.name}-c3-s1"


@pytest.mark.parametrize(("template", "message"), [
    ('"run"', "must name each experiment apart: use {n}"),
    ('"exp-{cycle}"', "must name each experiment apart"),
    ('"exp-{n}-{seed}"', "use only {loop}, {cycle}, {slot} and {n}"),
    ('"exp {n}"', "an exp id is letters, digits"),
])
def test_bad_exp_ids_name_the_fix(template, message):
    with pytest.raises(LoopConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        LoopConfig.from_yaml(config_text(exp_ids=template))
