"""Fakes and contract tests for code built on cq-prefect's strategy interfaces; no Prefect import.

Every proposer — the built-ins and yours — should pass :class:`ProposerContract`::

    from cq_prefect.testing import ProposerContract

    class TestMyProposer(ProposerContract):
        def make_proposer(self):
            return MyProposer(seed=0)

:func:`simulate` runs a proposer against a plain function the way the loop would (without Prefect), and
:class:`FakeProposer` wraps a function as a proposer, like ``httpx.MockTransport`` wraps one as a transport:

    >>> proposer = FakeProposer(lambda history, n: [Hypothesis(title=f"idea {len(history)}")][:n])
    >>> records = simulate(proposer, lambda h: 1.0, budget=2)
    >>> [(r.hypothesis.title, r.outcome) for r in records], proposer.calls
    ([('idea 0', 'kept'), ('idea 1', 'discarded')], [(0, 1), (1, 1)])
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cq_prefect.goal import Direction, best_value, is_better
from cq_prefect.proposers.base import Proposer
from cq_prefect.records import ExperimentRecord, Hypothesis, Outcome

Objective = Callable[[Hypothesis], "float | None"]
"""What an experiment would measure for a hypothesis; None: no metric; raising: a crash."""


class FakeProposer(Proposer):
    """A proposer that calls ``fn(history, n)``; records every call's ``(len(history), n)`` in ``calls``."""

    def __init__(self, fn: Callable[[Sequence[ExperimentRecord], int], list[Hypothesis]]):
        self.fn = fn
        self.calls: list[tuple[int, int]] = []
        self.observed: list[ExperimentRecord] = []

    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        self.calls.append((len(history), n))
        return list(self.fn(history, n))

    def observe(self, record: ExperimentRecord) -> None:
        self.observed.append(record)


def make_record(
    hypothesis: Hypothesis | str,
    value: float | None = None,
    outcome: Outcome | None = None,
    *,
    exp_id: str = "exp-1",
    cycle: int = 1,
    curve: Sequence[tuple[int, float]] = (),
) -> ExperimentRecord:
    """A record for tests; ``outcome`` defaults to ``discarded`` with a value and ``no_metric`` without.

        >>> make_record("wider", 0.5).outcome, make_record("wider").outcome
        ('discarded', 'no_metric')
    """
    if isinstance(hypothesis, str):
        hypothesis = Hypothesis(title=hypothesis)
    if outcome is None:
        outcome = "discarded" if value is not None and not math.isnan(value) else "no_metric"
    return ExperimentRecord(
        exp_id=exp_id, cycle=cycle, hypothesis=hypothesis, outcome=outcome, value=value, curve=tuple(curve)
    )


def hashed_objective(hypothesis: Hypothesis) -> float:
    """A deterministic stand-in metric: a number in [0, 1) from the hypothesis's change.

        >>> a, b = Hypothesis(title="a", change={"lr": 0.1}), Hypothesis(title="b", change={"lr": 0.1})
        >>> hashed_objective(a) == hashed_objective(b), 0 <= hashed_objective(a) < 1
        (True, True)
    """
    text = json.dumps(dict(hypothesis.change), sort_keys=True, default=str)
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def simulate(
    proposer: Proposer,
    objective: Objective = hashed_objective,
    *,
    budget: int,
    parallel: int = 1,
    direction: Direction = "minimize",
    history: Sequence[ExperimentRecord] = (),
) -> list[ExperimentRecord]:
    """Run ``proposer`` the way the loop does, with ``objective`` in place of experiments: each cycle asks
    for up to ``parallel`` hypotheses, evaluates them, records kept / discarded / crashed / no_metric.
    Stops at the budget (counting ``history``) or when the proposer returns nothing. Returns the whole
    history, ``history`` included (which is not mutated)."""
    records = list(history)
    cycle = max((r.cycle for r in records), default=0)
    while len(records) < budget:
        hypotheses = proposer.propose(tuple(records), min(parallel, budget - len(records)))
        if not hypotheses:
            break
        cycle += 1
        best = best_value((r.value for r in records if r.outcome in ("kept", "discarded")), direction)
        for slot, hypothesis in enumerate(hypotheses):
            message = None
            try:
                value = objective(hypothesis)
            except Exception as exc:  # noqa: BLE001 — a crash is an outcome, as in the loop
                value, outcome, message = None, "crashed", f"{type(exc).__name__}: {exc}"
            else:
                if value is None or math.isnan(value):
                    outcome = "no_metric"
                else:
                    outcome = "kept" if is_better(value, best, direction) else "discarded"
            record = ExperimentRecord(
                exp_id=f"exp-{len(records) + 1}", cycle=cycle, slot=slot, hypothesis=hypothesis,
                outcome=outcome, value=value, message=message,
            )
            records.append(record)
            proposer.observe(record)
        best = best_value((r.value for r in records if r.outcome in ("kept", "discarded")), direction)
    return records


def _snapshot(records: Sequence[ExperimentRecord]) -> list[dict[str, Any]]:
    return [record.model_dump(mode="json") for record in records]


class ProposerContract:
    """The behaviour every proposer owes the loop, as pytest tests: subclass it (``Test…``) and define
    :meth:`make_proposer`, which must build a fresh proposer with the same settings (seed) on every call.

    Class attributes a subclass may change: ``direction``, ``budget`` (experiments per simulated run),
    ``exhaust_budget`` (experiments tried before checking exhaustion), ``objective``.
    """

    direction: Direction = "minimize"
    budget: int = 8
    exhaust_budget: int = 50

    def make_proposer(self) -> Proposer:
        raise NotImplementedError("define make_proposer() to return a fresh proposer with fixed settings")

    def objective(self, hypothesis: Hypothesis) -> float | None:
        return hashed_objective(hypothesis)

    def _run(self, proposer: Proposer | None = None, **kwargs: Any) -> list[ExperimentRecord]:
        return simulate(
            proposer or self.make_proposer(), self.objective, budget=kwargs.pop("budget", self.budget),
            direction=self.direction, **kwargs,
        )

    def test_returns_at_most_n_hypotheses(self) -> None:
        for n in (1, 2, 3):
            proposals = self.make_proposer().propose((), n)
            assert isinstance(proposals, list)
            assert 1 <= len(proposals) <= n, f"asked for {n}, got {len(proposals)}"
            assert all(isinstance(h, Hypothesis) for h in proposals)

    def test_hypotheses_are_frozen(self) -> None:
        hypothesis = self.make_proposer().propose((), 1)[0]
        for attempt in (lambda: setattr(hypothesis, "title", "changed"), lambda: hypothesis.change.update(x=1)):
            try:
                attempt()
            except (TypeError, AttributeError, ValueError):
                continue
            raise AssertionError("a proposed hypothesis could be changed after the fact")

    def test_same_settings_and_history_give_same_proposals(self) -> None:
        first, second = self._run(), self._run()
        assert [r.hypothesis for r in first] == [r.hypothesis for r in second]

    def test_does_not_mutate_the_history(self) -> None:
        history = self._run(budget=3)
        before = _snapshot(history)
        frozen = tuple(history)
        self.make_proposer().propose(frozen, 2)
        assert _snapshot(history) == before and list(frozen) == history

    def test_never_proposes_a_tried_hypothesis(self) -> None:
        records = self._run(parallel=2)
        keys = [r.hypothesis.key for r in records]
        assert len(keys) == len(set(keys)), "the same hypothesis ran twice"

    def test_resume_continues_without_repeats(self) -> None:
        # The loop's parent died after 3 experiments: a fresh proposer gets the ledger back.
        uninterrupted = self._run()
        head = uninterrupted[:3]
        resumed = self._run(history=head)
        tried = {r.hypothesis.key for r in head}
        assert all(r.hypothesis.key not in tried for r in resumed[3:]), "a resumed loop re-proposed a tried idea"
        assert [r.hypothesis for r in resumed] == [r.hypothesis for r in uninterrupted], (
            "a resumed proposer proposed something else than the original would have"
        )

    def test_running_experiments_count_as_tried(self) -> None:
        proposer = self.make_proposer()
        first = proposer.propose((), 1)[0]
        pending = make_record(first, None, "running")
        again = self.make_proposer().propose((pending,), 2)
        assert first.key not in {h.key for h in again}, "a running experiment's hypothesis was proposed again"

    def test_failed_and_pruned_experiments_are_outcomes(self) -> None:
        proposer = self.make_proposer()
        hypotheses = proposer.propose((), 3)
        outcomes: list[Outcome] = ["crashed", "no_metric", "pruned"]
        history = tuple(
            make_record(h, None, outcome, exp_id=f"exp-{i}", curve=((1, 0.5),) if outcome == "pruned" else ())
            for i, (h, outcome) in enumerate(zip(hypotheses, outcomes))
        )
        nan = make_record(Hypothesis(title="diverged"), float("nan"), "no_metric", exp_id="exp-nan")
        following = self.make_proposer().propose((*history, nan), 2)
        tried = {r.hypothesis.key for r in history}
        assert all(h.key not in tried for h in following)

    def test_exhausted_stays_exhausted(self) -> None:
        records = self._run(budget=self.exhaust_budget)
        proposer = self.make_proposer()
        if proposer.propose(tuple(records), 1):
            return  # never exhausted within the budget (e.g. a continuous space): nothing to check
        longer = (*records, make_record("extra", 1.0, exp_id="exp-extra"))
        assert proposer.propose(longer, 3) == [], "an exhausted proposer proposed again"

    def test_hooks_are_safe_to_call(self) -> None:
        proposer = self.make_proposer()
        hypothesis = proposer.propose((), 1)[0]
        proposer.observe(make_record(hypothesis, 0.5))
        state = proposer.state()
        assert isinstance(state, Mapping)
        json.dumps(dict(state))
        proposer.close()


# -- a fake Anthropic API ------------------------------------------------------------------------------


class FakeAnthropic:
    """The Anthropic Messages API as an ``httpx2.MockTransport``: replies shaped like the real API's, in order.

    Each reply is a function of the request body (a dict) that returns an ``httpx2.Response`` — use
    :meth:`tool_use`, :meth:`text`, :meth:`error` — or a list of them, answered one request at a time; the
    last one answers every further request. ``requests`` keeps every request (method, URL, headers, JSON
    body), so tests assert what was sent::

        fake = FakeAnthropic(FakeAnthropic.tool_use({"title": "lower lr", "rationale": "…", "overrides": {"lr": 0.01}}))
        proposer = ClaudeProposer(brief, client=fake.client())
    """

    def __init__(self, *replies: Callable[[dict[str, Any]], Any]):
        if not replies:
            raise ValueError("give at least one reply")
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []

    def handle(self, request: Any) -> Any:
        body = json.loads(request.content or b"{}")
        self.requests.append({"method": request.method, "url": str(request.url), "headers": dict(request.headers),
                              "json": body})
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        return reply(body)

    def client(self, *, max_retries: int = 2) -> Any:
        """An ``anthropic.Anthropic`` that talks to this fake (the key is a fixed test value unless given)."""
        import anthropic
        import httpx2

        return anthropic.Anthropic(api_key=self.api_key, max_retries=max_retries,
                                   http_client=httpx2.Client(transport=httpx2.MockTransport(self.handle)))

    api_key = "sk-ant-api03-FAKE-TEST-KEY-never-to-be-logged-0123456789"

    # -- replies ---------------------------------------------------------------------------------------

    @staticmethod
    def message(content: list[dict[str, Any]], stop_reason: str = "tool_use", model: str | None = None
                ) -> Callable[[dict[str, Any]], Any]:
        """A 200 Messages response with these content blocks (``id``s of tool_use blocks filled in)."""
        def reply(body: dict[str, Any]) -> Any:
            import httpx2

            blocks = [{**b, "id": b.get("id") or f"toolu_01{hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest()[:22]}"}
                      if b["type"] == "tool_use" else b for b in content]
            return httpx2.Response(200, headers={"request-id": "req_011CTestFake", "content-type": "application/json"},
                                   json={"id": "msg_01TestFakeMessage", "type": "message", "role": "assistant",
                                         "model": model or body.get("model"), "content": blocks,
                                         "stop_reason": stop_reason, "stop_sequence": None,
                                         "usage": {"input_tokens": 2048, "output_tokens": 180,
                                                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}})
        return reply

    @classmethod
    def tool_use(cls, *inputs: dict[str, Any], name: str = "propose_experiment", thought: str | None = None
                 ) -> Callable[[dict[str, Any]], Any]:
        """A reply that calls the tool once per input (with a short text before, as Claude often writes)."""
        blocks: list[dict[str, Any]] = [{"type": "text", "text": thought or "Looking at the ledger, I'll try this next."}]
        blocks += [{"type": "tool_use", "name": name, "input": item} for item in inputs]
        return cls.message(blocks)

    @classmethod
    def text(cls, text: str) -> Callable[[dict[str, Any]], Any]:
        """A reply with text only (no tool call)."""
        return cls.message([{"type": "text", "text": text}], stop_reason="end_turn")

    @staticmethod
    def error(status: int, kind: str, message: str, retry_after_ms: int = 1) -> Callable[[dict[str, Any]], Any]:
        """An API error as the API sends it: 429 rate_limit_error, 529 overloaded_error, 500 api_error, …"""
        def reply(body: dict[str, Any]) -> Any:
            import httpx2

            return httpx2.Response(status, headers={"retry-after-ms": str(retry_after_ms), "request-id": "req_011CErr"},
                                   json={"type": "error", "error": {"type": kind, "message": message}})
        return reply
