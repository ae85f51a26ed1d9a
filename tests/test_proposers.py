"""Proposers (cq_prefect.proposers) and the records they read: pure, no Prefect server.

Every built-in runs the shared contract suite from cq_prefect.testing; the rest checks what is specific
to each: the scripted order and resume matching, Optuna's outcome mapping, rebuild and search-space errors.
"""

from __future__ import annotations

import json
import math
import pickle
import sys

import pytest

from cq_prefect.errors import LoopConfigError, MissingDependency
from cq_prefect.loop_config import LoopConfig
from cq_prefect.proposers import (
    ChainProposer,
    ExperimentRecord,
    Hypothesis,
    OptunaProposer,
    Proposer,
    ScriptedProposer,
    cardinality,
    load_ideas,
    load_space,
)
from cq_prefect.records import change_key
from cq_prefect.testing import FakeProposer, ProposerContract, make_record, simulate

IDEAS = [
    {"title": "bone-length loss", "rationale": "limbs drift", "overrides": {"bone_loss": 0.1}},
    {"title": "cross-attention", "rationale": "joints need context", "overrides": {"attention": "cross"}},
    {"title": "wider", "overrides": {"width": 512}},
    {"title": "wider", "overrides": {"width": 1024}},  # same title, other change: a different idea
    {"title": "no augmentation", "overrides": {"augment": False}},
]
SPACE = {
    "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    "layers": {"type": "int", "low": 2, "high": 8, "step": 2},
    "activation": ["relu", "gelu"],
    "dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
}
SMALL_SPACE = {"width": {"type": "int", "low": 1, "high": 3}, "norm": ["batch", "layer"]}


# --- the contract, on every built-in ------------------------------------------------------------


class TestScriptedContract(ProposerContract):
    def make_proposer(self) -> Proposer:
        return ScriptedProposer(IDEAS)


class TestOptunaContract(ProposerContract):
    def make_proposer(self) -> Proposer:
        return OptunaProposer(SPACE, "minimize", seed=3, startup_trials=3)


class TestOptunaSmallSpaceContract(ProposerContract):
    direction = "maximize"
    exhaust_budget = 8  # 6 points: exhausted after them

    def make_proposer(self) -> Proposer:
        return OptunaProposer(SMALL_SPACE, "maximize", seed=1, startup_trials=2)


class TestChainContract(ProposerContract):
    def make_proposer(self) -> Proposer:
        return ChainProposer(ScriptedProposer(IDEAS[:2]), OptunaProposer(SPACE, "minimize", seed=3, startup_trials=3))


def test_chain_takes_over_when_the_ideas_are_used_up():
    chain = ChainProposer(ScriptedProposer(IDEAS[:2]), OptunaProposer(SMALL_SPACE, "minimize", seed=1))
    first = chain.propose([], 3)
    assert [h.title for h in first[:2]] == ["bone-length loss", "cross-attention"]
    assert set(first[2].change) == {"width", "norm"}  # Optuna fills the third slot
    records = simulate(chain, lambda h: float(len(h.title)), budget=9, direction="minimize")
    assert [r.hypothesis.title for r in records[:2]] == ["bone-length loss", "cross-attention"]
    assert all(set(r.change) == {"width", "norm"} for r in records[2:])
    assert len({change_key(r.change) for r in records}) == len(records)


def test_random_sampler_from_a_loop_config(tmp_path):
    (tmp_path / "space.yaml").write_text("width: {type: int, low: 1, high: 3}\n")
    (tmp_path / "ideas.yaml").write_text("- {title: wider, overrides: {width: 3}}\n")
    (tmp_path / "loop.yaml").write_text(
        "name: l\ngoal: loss below 1\nmetric: loss\nbudget: 4\nexperiment: {workdir: ., command: python t.py}\n"
        "proposer: {kind: scripted, ideas: ideas.yaml, then: {kind: optuna, space: space.yaml, sampler: random}}\n")
    config = LoopConfig.from_yaml(tmp_path / "loop.yaml")
    proposer = config.create_proposer()
    assert isinstance(proposer, ChainProposer)
    assert [h.change for h in proposer.propose([], 2)][0] == {"width": 3}
    assert type(proposer.proposers[1]._study([]).sampler).__name__ == "RandomSampler"
    with pytest.raises(LoopConfigError, match="sampler"):
        LoopConfig.from_yaml((tmp_path / "loop.yaml").read_text().replace("random", "grid"), base_dir=tmp_path)


class TestFakeContract(ProposerContract):
    """The fake itself behaves (so loop tests built on it test the loop, not the fake)."""

    def make_proposer(self) -> Proposer:
        def fn(history, n):
            tried = {r.hypothesis.key for r in history}
            ideas = [Hypothesis(title=f"idea {i}", change={"i": i}) for i in range(6)]
            return [h for h in ideas if h.key not in tried][:n]

        return FakeProposer(fn)


# --- records ------------------------------------------------------------------------------------


def test_records_are_frozen_and_round_trip_through_json():
    hypothesis = Hypothesis(title="bone loss", rationale="why", change={"bone_loss": 0.1, "augment": True})
    record = ExperimentRecord(
        exp_id="exp-044",
        cycle=2,
        hypothesis=hypothesis,
        outcome="kept",
        value=19.87,
        overrides={"bone_loss": 0.1, "lr": 3e-4},
        curve=[(0, 30.0), (1, 25.5)],
    )
    with pytest.raises(TypeError):
        hypothesis.change["bone_loss"] = 0.2  # type: ignore[index]
    with pytest.raises(TypeError):
        record.overrides["lr"] = 1  # type: ignore[index]
    with pytest.raises(ValueError):
        record.value = 1.0  # type: ignore[misc]
    bare = make_record("no change", 1.0)
    with pytest.raises(TypeError):
        bare.hypothesis.change["x"] = 1  # type: ignore[index]  (the default {} is frozen too)
    with pytest.raises(TypeError):
        bare.overrides["x"] = 1  # type: ignore[index]
    assert pickle.loads(pickle.dumps(record)) == record  # Prefect persists task results with cloudpickle
    back = ExperimentRecord.model_validate(json.loads(record.model_dump_json()))
    assert back == record
    assert back.change["augment"] is True and back.curve == ((0, 30.0), (1, 25.5))
    assert back.hypothesis.key == hypothesis.key


def test_record_flags_and_nan_values():
    assert make_record("a", 1.0, "crashed").failed
    assert make_record("a", None, "no_metric").failed
    assert not make_record("a", None, "pruned").failed
    nan = make_record("a", float("nan"))
    assert nan.outcome == "no_metric" and not nan.has_value
    assert json.loads(nan.model_dump_json())["value"] == "NaN"
    assert not make_record("a", None, "running").finished


def test_change_key_ignores_key_order_but_not_types():
    assert change_key({"a": 1, "b": "x"}) == change_key({"b": "x", "a": 1})
    assert change_key({"a": 1}) != change_key({"a": "1"})


def test_hypothesis_rejects_non_finite_change():
    with pytest.raises(ValueError, match="finite"):
        Hypothesis(title="x", change={"lr": math.inf})


# --- scripted -----------------------------------------------------------------------------------


def test_scripted_proposes_in_order_then_exhausted():
    proposer = ScriptedProposer(IDEAS)
    assert [h.title for h in proposer.propose([], 2)] == ["bone-length loss", "cross-attention"]
    records = simulate(proposer, lambda h: 1.0, budget=99, parallel=2)
    assert [r.hypothesis.change for r in records] == [i["overrides"] for i in IDEAS]
    assert [r.cycle for r in records] == [1, 1, 2, 2, 3]
    assert proposer.propose(records, 2) == []


def test_scripted_resume_matches_title_and_change():
    proposer = ScriptedProposer(IDEAS)
    # The idea 'wider' with width 512 ran; 'wider' with 1024 did not, nor did a renamed 'bone-length loss'.
    history = [
        make_record(Hypothesis(title="wider", change={"width": 512}), 1.0),
        make_record(Hypothesis(title="bone loss", change={"bone_loss": 0.1}), 1.0),
    ]
    titles = [(h.title, dict(h.change)) for h in proposer.propose(history, 10)]
    assert ("wider", {"width": 512}) not in titles
    assert ("wider", {"width": 1024}) in titles
    assert titles[0] == ("bone-length loss", {"bone_loss": 0.1})


def test_ideas_file_forms(tmp_path):
    listed = tmp_path / "ideas.yaml"
    listed.write_text("- title: a\n  overrides: {x: 1}\n- title: b\n")
    wrapped = tmp_path / "pi.yaml"
    wrapped.write_text("ideas:\n  - title: a\n    rationale: r\n    overrides: {x: 1}\n")
    assert [i.title for i in load_ideas(listed)] == ["a", "b"]
    assert load_ideas(str(wrapped))[0].rationale == "r"
    assert ScriptedProposer.from_yaml(listed).propose([], 5)[1].change == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- title: a\n- title: b\n  overides: {x: 1}\n", r"ideas line 3: idea 2 \(overides\): unknown key 'overides'"),
        ("- title: a\n- rationale: r\n", r"line 2: idea 2 \(title\): title is required"),
        ("- title: a\n  overrides: {x: 1}\n- title: a\n  overrides: {x: 1}\n", r"ideas 1 and 2 are the same"),
        ("[]\n", r"non-empty list"),
        ("- title: [a\n", r"not valid YAML"),
    ],
)
def test_bad_ideas_name_the_line_and_fix(text, expected):
    with pytest.raises(LoopConfigError, match=expected) as info:
        load_ideas(text)
    assert info.value.exit_code == 2


# --- optuna ------------------------------------------------------------------------------------


def test_optuna_proposals_are_in_the_space_and_clean():
    proposer = OptunaProposer(SPACE, "minimize", seed=0)
    for hypothesis in proposer.propose([], 3):
        change = hypothesis.change
        assert set(change) == set(SPACE)
        assert 1e-4 <= change["lr"] <= 1e-1 and len(repr(change["lr"])) <= 12  # rounded for the command line
        assert change["layers"] in (2, 4, 6, 8)
        assert change["activation"] in ("relu", "gelu")
        assert round(change["dropout"] * 10, 9) == int(round(change["dropout"] * 10))  # on its 0.1 grid
        assert "lr=" in hypothesis.title and hypothesis.rationale


class _Recorder:
    """A sampler factory whose samplers note the trials the study held when it sampled (the injected
    boundary: no patching of Optuna)."""

    def __init__(self):
        self.seen = []

    def __call__(self, seed):
        import optuna

        recorder = self

        class Sampler(optuna.samplers.RandomSampler):
            def sample_independent(self, study, trial, name, distribution):
                recorder.seen.append([(t.state.name, t.value, dict(t.intermediate_values)) for t in study.trials])
                return super().sample_independent(study, trial, name, distribution)

        return Sampler(seed=seed)


def test_optuna_tells_each_outcome_as_its_trial_state():
    recorder = _Recorder()
    proposer = OptunaProposer({"x": {"type": "float", "low": 0, "high": 1}}, "minimize", sampler=recorder)
    x = iter([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    history = [
        make_record(Hypothesis(title="k", change={"x": next(x)}), 0.5, "kept"),
        make_record(Hypothesis(title="d", change={"x": next(x)}), 0.9, "discarded"),
        make_record(Hypothesis(title="c", change={"x": next(x)}), None, "crashed"),
        make_record(Hypothesis(title="n", change={"x": next(x)}), None, "no_metric"),
        make_record(Hypothesis(title="nan", change={"x": next(x)}), float("nan"), "discarded"),
        make_record(Hypothesis(title="p", change={"x": next(x)}), None, "pruned", curve=[(1, 2.0), (2, 1.5)]),
        make_record(Hypothesis(title="r", change={"x": next(x)}), None, "running"),
        make_record(Hypothesis(title="baseline"), 1.0, "kept"),  # no parameter of the space: left out
        make_record(Hypothesis(title="old", change={"x": 7.0}), 0.1, "kept"),  # outside today's space: left out
    ]
    proposer.propose(history, 1)
    states = recorder.seen[0]
    assert [s[0] for s in states] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "FAIL", "PRUNED", "RUNNING", "RUNNING"]
    assert states[0][1] == 0.5 and states[1][1] == 0.9
    assert states[5][2] == {1: 2.0, 2: 1.5}  # a pruned run keeps its curve for TPE


def test_optuna_never_repeats_and_exhausts_a_finite_space():
    proposer = OptunaProposer(SMALL_SPACE, "minimize", seed=5, startup_trials=1)
    assert cardinality(load_space(SMALL_SPACE)) == 6
    records = simulate(proposer, lambda h: float(h.change["width"]), budget=50, parallel=4)
    assert len(records) == 6
    assert len({change_key(r.change) for r in records}) == 6
    assert proposer.propose(records, 1) == []


def test_optuna_resume_rebuilds_the_same_study():
    space = {"lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}}
    objective = lambda h: (math.log10(h.change["lr"]) + 2) ** 2  # noqa: E731 — best at lr = 0.01
    full = simulate(OptunaProposer(space, "minimize", seed=11, startup_trials=4), objective, budget=14)
    resumed = simulate(
        OptunaProposer(space, "minimize", seed=11, startup_trials=4), objective, budget=14, history=full[:6]
    )
    assert [r.change for r in resumed] == [r.change for r in full]
    assert "TPE" in full[-1].hypothesis.rationale and "random" in full[0].hypothesis.rationale
    assert min(r.value for r in full) < 0.25  # TPE closes in on lr ≈ 0.01


def test_optuna_seed_changes_proposals():
    a = OptunaProposer(SPACE, "minimize", seed=1).propose([], 2)
    b = OptunaProposer(SPACE, "minimize", seed=2).propose([], 2)
    assert [h.change for h in a] != [h.change for h in b]


def test_optuna_accepts_a_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("space:\n  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    assert list(OptunaProposer(path, "maximize").propose([], 1)[0].change) == ["lr"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: {type: float, low: 0.1, high: 0.01}\n", r"line 1: lr: low 0.1 > high 0.01; swap them"),
        (
            "a: {type: int, low: 1, high: 2}\nlr:\n  type: float\n  low: 0\n  high: 1\n  log: true\n",
            r"line 2: lr: log: true needs low > 0",
        ),
        ("lr: {type: float, low: 0.1, high: 1, log: true, step: 0.1}\n", r"log and step cannot be combined"),
        ("x: {type: integer, low: 1, high: 2}\n", r"type 'integer' is not float, int or categorical"),
        ("x: {low: 1, high: 2}\n", r"give the parameter's type"),
        ("x: {type: int, low: 1, high: 2, stepp: 1}\n", r"unknown key 'stepp'"),
        ("x: [a, a]\n", r"repeat a value"),
        ("x: 3\n", r"give a range"),
        ("{}\n", r"maps parameter names to ranges"),
    ],
)
def test_bad_search_spaces_name_the_parameter_and_fix(text, expected):
    with pytest.raises(LoopConfigError, match=expected) as info:
        load_space(text)
    assert info.value.exit_code == 2


def test_optuna_missing_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` sees when it is not installed
    with pytest.raises(MissingDependency, match=r"pip install 'optuna>=4,<5'") as info:
        OptunaProposer(SPACE, "minimize")
    assert info.value.exit_code == 2
