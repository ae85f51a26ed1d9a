"""`cq pi` with Claude (faked at the HTTP layer) and the knowledge lines a Claude loop reads."""

from __future__ import annotations

import httpx2
import pytest

from cq_prefect.proposers import claude
from cq_prefect.proposers.scripted import load_ideas
from cq_prefect.testing import FakeAnthropic
from test_knowledge import SPACE, cq, cq_env, kb  # noqa: F401 — the knowledge base and the CLI of those tests


@pytest.fixture
def fake(monkeypatch):
    def use(*replies):
        fake = FakeAnthropic(*replies)
        monkeypatch.setattr(claude, "default_http_client",
                            lambda: httpx2.Client(transport=httpx2.MockTransport(fake.handle)))
        monkeypatch.setenv("ANTHROPIC_API_KEY", FakeAnthropic.api_key)
        return fake
    return use


DIRECTIONS = {"directions": [
    {"title": "bone loss with a cosine schedule", "rationale": "both improved alone (pose-mpjpe-c1-s0)",
     "overrides": {"bone_loss_weight": 0.1, "lr_schedule": "cosine"}},
    {"title": "wider model", "rationale": "never tried above 512", "overrides": {"width": 1024}},
]}


def test_pi_asks_claude_with_the_knowledge_and_writes_its_ideas(cq_env, fake, capsys):  # noqa: F811
    (cq_env / "space.yaml").write_text(SPACE)
    api = fake(FakeAnthropic.tool_use(DIRECTIONS, name="propose_directions"))
    code, out, err = cq(capsys, "pi", "improve 3D pose accuracy with bone length loss", "--space", "space.yaml",
                        "--out", "ideas.yaml", "--model", "claude-sonnet-5-5", "--effort", "medium")
    assert code == 0, err
    assert "Directions, brainstormed by Claude (claude-sonnet-5-5):" in out
    ideas = load_ideas(cq_env / "ideas.yaml")
    assert "directions brainstormed by Claude (claude-sonnet-5-5), with " in (cq_env / "ideas.yaml").read_text()
    assert [(i.title, i.overrides) for i in ideas] == [(d["title"], d["overrides"]) for d in DIRECTIONS["directions"]]
    [request] = api.requests
    body = request["json"]
    assert body["model"] == "claude-sonnet-5-5" and body["tool_choice"] == {"type": "tool", "name": "propose_directions"}
    assert body["output_config"] == {"effort": "medium"}
    text = body["messages"][0]["content"]
    assert "improve 3D pose accuracy" in text and "pose-mpjpe-c1-s0" in text and "bone_loss_weight" in text
    assert body["tools"][0]["input_schema"]["properties"]["directions"]["items"]["properties"]["overrides"][
        "additionalProperties"] is False
    assert FakeAnthropic.api_key not in out + err


def test_pi_repairs_once_then_falls_back_to_the_knowledge(cq_env, fake, capsys):  # noqa: F811
    (cq_env / "space.yaml").write_text(SPACE)
    bad = {"directions": [{"title": "x", "rationale": "", "overrides": {"depth": 3}}]}
    api = fake(FakeAnthropic.tool_use(bad, name="propose_directions"))
    code, out, err = cq(capsys, "pi", "improve 3D pose accuracy", "--space", "space.yaml", "--out", "ideas.yaml")
    assert code == 0, err
    assert len(api.requests) == 2 and "output_config" not in api.requests[0]["json"]  # no --effort: the model's
    repair = api.requests[1]["json"]["messages"][2]["content"][0]
    assert repair["is_error"] is True and "'depth' is not in the search space" in repair["content"]
    assert "gave none (malformed answer after a repair round" in out and "deriving them from the knowledge" in out
    assert load_ideas(cq_env / "ideas.yaml")  # the derived directions were written
    assert " directions derived, with " in (cq_env / "ideas.yaml").read_text()


def test_pi_claude_without_a_key_exits_2_before_anything(cq_env, monkeypatch, capsys, stack):  # noqa: F811
    from cq_prefect.stack import prefect_settings

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with prefect_settings(stack):
        code, out, err = cq(capsys, "pi", "improve pose", "--claude", "--out", "ideas.yaml")
    assert code == 2 and "export ANTHROPIC_API_KEY" in err and "Loading related knowledge" not in out
    assert not (cq_env / "ideas.yaml").exists()


def test_related_lines_leave_out_the_loop_itself(kb):  # noqa: F811
    from cq_prefect.knowledge_cli import related_lines

    lines = related_lines("bone length loss mpjpe", kb["uri"], limit=4)
    assert lines and any("pose-mpjpe-c1-s0" in line for line in lines) and all("\n" not in line for line in lines)
    assert not any("loop pose-mpjpe" in line for line in related_lines("bone length loss", kb["uri"],
                                                                       exclude_loop="pose-mpjpe"))
