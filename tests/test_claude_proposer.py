"""The Claude proposer against the real anthropic SDK, with the API faked by an httpx2 MockTransport."""

from __future__ import annotations

import logging
import re
import typing

import pytest

from cq_prefect.errors import BadInput
from cq_prefect.loop_config import LoopConfig
from cq_prefect.proposers.claude import DEFAULT_MODEL, TOOL_NAME, Brief, ClaudeProposer, parse_proposal, tool_schema
from cq_prefect.proposers.scripted import ScriptedProposer
from cq_prefect.proposers.search_space import load_space
from cq_prefect.records import ExperimentRecord, Hypothesis
from cq_prefect.testing import FakeAnthropic, ProposerContract

SPACE = load_space({"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
                    "attention": {"type": "categorical", "choices": ["none", "cross"]}})
FILES = {"model.py": "class Net:\n    def __init__(self):\n        self.dropout = 0.1\n",
         "losses.py": "def loss(pred, y):\n    return mse(pred, y)\n"}


def brief(**changes) -> Brief:
    fields = dict(goal="improve MPJPE below 25mm", metric="mpjpe", direction="minimize", target=25.0, unit="mm",
                  params={**SPACE, "epochs": None}, base_params={"epochs": 10}, editable=("*.py",),
                  knowledge=("exp-038 (pose-demo): DINOv2 features — kept, improved mpjpe by 8mm",),
                  files=lambda history: FILES)
    fields.update(changes)
    return Brief(**fields)


def history() -> tuple[ExperimentRecord, ...]:
    base = ExperimentRecord(exp_id="exp-042", cycle=0, hypothesis=Hypothesis(title="baseline"), outcome="kept",
                            value=46.11)
    bone = ExperimentRecord(exp_id="exp-043", cycle=1, hypothesis=Hypothesis(
        title="bone-length loss", change={"lr": 0.01}), outcome="discarded", value=47.5)
    crash = ExperimentRecord(exp_id="exp-044", cycle=2, hypothesis=Hypothesis(
        title="attention", change={"attention": "cross"}), outcome="crashed", message="exited with code 1: OOM")
    return base, bone, crash


def proposal(title="cosine schedule", **fields):
    return {"title": title, "rationale": "the loss plateaus after epoch 6", **fields}


def test_a_tool_call_becomes_a_hypothesis_and_the_request_carries_model_tool_ledger_files_and_knowledge():
    edit = {"path": "model.py", "old": "self.dropout = 0.1", "new": "self.dropout = 0.3"}
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"lr": 0.003}, edits=[edit])))
    proposer = ClaudeProposer(brief(), client=fake.client())

    [hypothesis] = proposer.propose(history(), 1)

    assert hypothesis.title == "cosine schedule" and hypothesis.change == {"lr": 0.003}
    assert hypothesis.edits[0].path == "model.py" and hypothesis.edits[0].new == "self.dropout = 0.3"
    [request] = fake.requests
    assert request["url"].endswith("/v1/messages") and FakeAnthropic.api_key in (request["headers"].get("x-api-key") or request["headers"]["authorization"])
    body = request["json"]
    assert body["model"] == DEFAULT_MODEL and body["output_config"] == {"effort": "high"}
    assert body["tool_choice"] == {"type": "any"}
    [tool] = body["tools"]
    assert tool["name"] == TOOL_NAME
    overrides = tool["input_schema"]["properties"]["overrides"]
    assert overrides["properties"]["lr"] == {"type": "number", "minimum": 1e-4, "maximum": 0.1}
    assert overrides["properties"]["attention"] == {"enum": ["none", "cross"]} and overrides["additionalProperties"] is False
    assert tool["input_schema"]["properties"]["edits"]["items"]["required"] == ["path", "old", "new"]
    text = body["messages"][0]["content"]
    # the whole ledger as a table, the best so far, knowledge, parameters and the files
    assert "| exp-042 | kept | 46.11mm | baseline |" in text
    assert "| exp-043 | discarded | 47.5mm | bone-length loss | lr=0.01 |" in text
    assert "exited with code 1: OOM" in text
    assert "improve MPJPE below 25mm: minimize `mpjpe`, target 25mm." in text
    assert "Best so far: exp-042 with mpjpe=46.11mm" in text
    assert "DINOv2 features" in text
    assert "- lr: number in [0.0001, 0.1] (log scale)" in text and "- epochs: any value" in text and "(base: 10)" in text
    assert '<file path="model.py">' in text and "self.dropout = 0.1" in text and "def loss(pred, y)" in text
    assert "never write a command" in body["system"]


def test_text_only_gets_one_repair_round_that_asks_for_the_tool():
    fake = FakeAnthropic(FakeAnthropic.text("I think we should try a cosine schedule."),
                         FakeAnthropic.tool_use(proposal(overrides={"lr": 0.002})))
    [hypothesis] = ClaudeProposer(brief(), client=fake.client()).propose(history(), 1)
    assert hypothesis.change == {"lr": 0.002}
    second = fake.requests[1]["json"]["messages"]
    assert second[1] == {"role": "assistant", "content": [{"type": "text", "text": "I think we should try a cosine schedule."}]}
    assert "called no tool" in second[2]["content"][-1]["text"] and TOOL_NAME in second[2]["content"][-1]["text"]


def test_malformed_input_is_quoted_back_as_a_tool_error_and_the_repair_is_used():
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"lr": 5.0, "batch": 64})),
                         FakeAnthropic.tool_use(proposal(overrides={"lr": 0.05})))
    [hypothesis] = ClaudeProposer(brief(), client=fake.client()).propose(history(), 1)
    assert hypothesis.change == {"lr": 0.05}
    assistant, user = fake.requests[1]["json"]["messages"][1:]
    tool_use = next(b for b in assistant["content"] if b["type"] == "tool_use")
    result = user["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == tool_use["id"] and result["is_error"] is True
    assert "'batch' is not a declared parameter" in result["content"] or "outside [0.0001, 0.1]" in result["content"]


def test_malformed_twice_falls_back_and_the_rationale_says_why():
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"command": "rm -rf /"})))
    fallback = ScriptedProposer.from_yaml("- {title: wider, overrides: {epochs: 20}}")
    proposer = ClaudeProposer(brief(), client=fake.client(), fallback=fallback)
    [hypothesis] = proposer.propose(history(), 1)
    assert len(fake.requests) == 2  # the answer and one repair round, no more
    assert hypothesis.title == "wider" and hypothesis.change == {"epochs": 20}
    assert hypothesis.rationale.startswith("[fallback from Claude: malformed answer after a repair round: ")
    assert "'command' is not a declared parameter" in hypothesis.rationale
    assert proposer.state()["fallbacks"] == 1


def test_files_past_the_size_limit_are_named_not_shown():
    files = {"model.py": FILES["model.py"], "[cq: 2 more files left out]": "losses.py\nnets/head.py\n"}
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"lr": 0.003})))
    ClaudeProposer(brief(files=lambda history: files), client=fake.client()).propose(history(), 1)
    text = fake.requests[0]["json"]["messages"][0]["content"]
    assert '<file path="model.py">' in text and "<file path=\"[cq" not in text
    assert "cq: 2 more files left out (the prompt's size limit): losses.py, nets/head.py" in text


def test_without_a_fallback_a_failed_answer_proposes_nothing():
    fake = FakeAnthropic(FakeAnthropic.text("no idea"))
    proposer = ClaudeProposer(brief(), client=fake.client())
    assert proposer.why_exhausted() is None
    assert proposer.propose(history(), 1) == []
    why = proposer.why_exhausted()  # what the loop says and records beside proposer_exhausted
    assert why.startswith("Claude proposed nothing usable (") and "give proposer.fallback" in why


def test_429_is_retried_with_backoff_then_succeeds():
    fake = FakeAnthropic(FakeAnthropic.error(429, "rate_limit_error", "Number of request tokens has exceeded your "
                                             "per-minute rate limit"),
                         FakeAnthropic.tool_use(proposal(overrides={"attention": "none"})))
    [hypothesis] = ClaudeProposer(brief(), client=fake.client(max_retries=3)).propose(history(), 1)
    assert hypothesis.change == {"attention": "none"} and len(fake.requests) == 2
    assert fake.requests[1]["headers"]["x-stainless-retry-count"] == "1"


def test_529_overloaded_after_the_retries_falls_back_with_the_reason():
    fake = FakeAnthropic(FakeAnthropic.error(529, "overloaded_error", "Overloaded"))
    fallback = ScriptedProposer.from_yaml("- {title: longer, overrides: {epochs: 30}}")
    [hypothesis] = ClaudeProposer(brief(), client=fake.client(max_retries=2), fallback=fallback).propose(history(), 1)
    assert len(fake.requests) == 3  # the call and two retries
    assert "answered 529 (overloaded_error) after 2 retries" in hypothesis.rationale and hypothesis.title == "longer"


def test_edits_outside_the_editable_files_or_the_repo_and_missing_old_text_are_sent_back():
    b = brief(editable=("model.py",))
    for edit, expected in [
        ({"path": "../../etc/passwd", "old": "", "new": "x"}, ".."),
        ({"path": "/etc/passwd", "old": "", "new": "x"}, "absolute"),
        ({"path": "losses.py", "old": "mse", "new": "l1"}, "editable"),
        ({"path": "model.py", "old": "self.dropout = 0.5", "new": "x"}, "occurs 0 times"),
    ]:
        with pytest.raises(ValueError, match=re.escape(expected)):
            parse_proposal(proposal(edits=[edit]), b, FILES)


def test_a_repeat_of_a_tried_change_is_refused():
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"lr": 0.01})),
                         FakeAnthropic.tool_use(proposal(overrides={"lr": 0.02})))
    [hypothesis] = ClaudeProposer(brief(), client=fake.client()).propose(history(), 1)
    assert hypothesis.change == {"lr": 0.02}
    assert "already run as exp-043" in fake.requests[1]["json"]["messages"][2]["content"][0]["content"]


def test_parallel_cycles_get_several_tool_calls_in_one_answer():
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal("a", overrides={"lr": 0.001}), proposal("b", overrides={"lr": 0.03})))
    hypotheses = ClaudeProposer(brief(), client=fake.client()).propose(history(), 2)
    assert [h.title for h in hypotheses] == ["a", "b"]
    assert "call propose_experiment 2 times" in fake.requests[0]["json"]["messages"][0]["content"]


def test_without_editable_files_the_tool_has_no_edits_and_edits_are_refused():
    assert "edits" not in tool_schema(SPACE, ())["input_schema"]["properties"]
    with pytest.raises(ValueError, match="edits no code"):
        parse_proposal(proposal(edits=[{"path": "model.py", "old": "a", "new": "b"}]), brief(editable=()), FILES)


def test_the_default_model_is_current_in_the_sdk():
    from anthropic._data import DEPRECATED_MODELS
    from anthropic.types import ModelParam

    known = typing.get_args(typing.get_args(ModelParam)[0])
    assert DEFAULT_MODEL in known and DEFAULT_MODEL not in DEPRECATED_MODELS


def test_the_key_never_reaches_a_log_line_a_repr_or_the_state(caplog):
    fake = FakeAnthropic(FakeAnthropic.error(529, "overloaded_error", "Overloaded"),
                         FakeAnthropic.tool_use(proposal(overrides={"lr": 0.004})))
    with caplog.at_level(logging.DEBUG):
        proposer = ClaudeProposer(brief(), client=fake.client())
        proposer.propose(history(), 1)
    seen = caplog.text + repr(proposer) + str(proposer.state())
    assert "anthropic" in caplog.text.lower() or "retry" in caplog.text.lower()  # the SDK did log at DEBUG
    assert FakeAnthropic.api_key not in seen and FakeAnthropic.api_key[12:30] not in seen


CONFIG = """
name: claude-loop
goal: mpjpe below 25mm
metric: mpjpe
budget: 4
experiment: {workdir: /tmp, command: python train.py, params: {epochs: 10}}
proposer:
  kind: claude
  model: claude-sonnet-5-5
  effort: medium
  instructions: Prefer changes to the loss.
  space: {lr: {type: float, low: 0.0001, high: 0.1, log: true}}
"""


def test_the_config_builds_the_proposer_with_model_effort_instructions_and_an_optuna_fallback(monkeypatch):
    config = LoopConfig.from_yaml(CONFIG)
    fake = FakeAnthropic(FakeAnthropic.text("…"))
    proposer = config.create_proposer(knowledge=["a past note"], client=fake.client())
    [hypothesis] = proposer.propose((), 1)  # Claude fails twice: Optuna over the same space takes the cycle
    assert "lr" in hypothesis.change and hypothesis.rationale.startswith("[fallback from Claude")
    body = fake.requests[0]["json"]
    assert body["model"] == "claude-sonnet-5-5" and body["output_config"] == {"effort": "medium"}
    assert "Prefer changes to the loss." in body["messages"][0]["content"] and "a past note" in body["messages"][0]["content"]
    assert set(body["tools"][0]["input_schema"]["properties"]["overrides"]["properties"]) == {"epochs", "lr"}


def test_no_api_key_names_both_ways_to_give_one(monkeypatch, stack):
    from cq_prefect.stack import prefect_settings

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with prefect_settings(stack), pytest.raises(BadInput) as info:
        LoopConfig.from_yaml(CONFIG).create_proposer()
    assert "export ANTHROPIC_API_KEY" in str(info.value)
    assert "blocks/anthropic_credentials.py" in str(info.value) and "proposer.credentials" in str(info.value)


def test_the_key_comes_from_an_anthropic_credentials_block(monkeypatch, stack):
    from cq_prefect.credentials import AnthropicCredentials, anthropic_key
    from cq_prefect.stack import prefect_settings

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with prefect_settings(stack):
        AnthropicCredentials(api_key="sk-ant-from-the-block").save("cq-test-anthropic", overwrite=True)
        assert anthropic_key("cq-test-anthropic").get_secret_value() == "sk-ant-from-the-block"
        with pytest.raises(BadInput, match="no AnthropicCredentials block named 'no-such-block'"):
            anthropic_key("no-such-block")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
        assert anthropic_key().get_secret_value() == "sk-ant-from-env"


class TestClaudeProposerContract(ProposerContract):
    """A fake Claude that answers from the ledger it is sent passes the contract every proposer owes the loop."""

    def make_proposer(self):
        def answer(body):
            text = body["messages"][0]["content"]
            rows = len(re.findall(r"^\| (?!exp \||---)", text, flags=re.M))
            asked = int(re.search(r"Propose (\d+) new", text).group(1))
            return FakeAnthropic.tool_use(*[proposal(f"width {rows + i}", overrides={"epochs": 10 + rows + i})
                                            for i in range(asked)])(body)

        return ClaudeProposer(brief(files=None, editable=()), client=FakeAnthropic(answer).client())



def test_the_pose_example_config_gives_claude_the_space_and_model_py():
    config = LoopConfig.from_yaml("examples/pose/claude.yaml")
    fake = FakeAnthropic(FakeAnthropic.tool_use(proposal(overrides={"lr": 0.002, "lr_schedule": "cosine"})))
    proposer = config.create_proposer(client=fake.client(), files=lambda history: {"model.py": "NUM_JOINTS = 17\n"})
    [hypothesis] = proposer.propose((), 1)
    assert hypothesis.change == {"lr": 0.002, "lr_schedule": "cosine"}
    body = fake.requests[0]["json"]
    assert body["tools"][0]["input_schema"]["properties"]["edits"]["description"].endswith("['model.py'].")
    assert "occluded joints" in body["messages"][0]["content"]
    # values are quoted for the shell when the command is rendered: Claude cannot add a command
    assert config.experiment.render({"lr_schedule": "cosine; touch /tmp/x"}) == (
        "python train.py --config configs/baseline.yaml --lr_schedule='cosine; touch /tmp/x'")
