"""One proposer after another: the next takes over when the one before it has nothing left.

    >>> from cq_prefect.proposers import ScriptedProposer
    >>> chain = ChainProposer(ScriptedProposer([{"title": "wider", "overrides": {"width": 512}}]),
    ...                       ScriptedProposer([{"title": "deeper", "overrides": {"depth": 4}}]))
    >>> [h.title for h in chain.propose([], 2)]
    ['wider', 'deeper']

The usual chain is an ideas file first, then Optuna over a search space (``proposer: {kind: scripted,
ideas: …, then: {kind: optuna, space: …}}``): what a researcher believes in is tried first, the search
goes on from there. Each member sees the whole history, so the chain is as pure a function of the history
as its members, and it is exhausted when its last member is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cq_prefect.proposers.base import Proposer
from cq_prefect.records import ExperimentRecord, Hypothesis


class ChainProposer(Proposer):
    """Asks each proposer in turn for what the ones before it could not fill."""

    def __init__(self, *proposers: Proposer):
        if not proposers:
            raise ValueError("ChainProposer needs at least one proposer")
        self.proposers = proposers

    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        proposals: list[Hypothesis] = []
        for proposer in self.proposers:
            taken = {h.key for h in proposals}
            proposals += [h for h in proposer.propose(history, n - len(proposals)) if h.key not in taken]
            if len(proposals) >= n:
                break
        return proposals[:n]

    def observe(self, record: ExperimentRecord) -> None:
        for proposer in self.proposers:
            proposer.observe(record)

    def state(self) -> Mapping[str, Any]:
        return {"chain": [dict(p.state()) for p in self.proposers]}

    def close(self) -> None:
        for proposer in self.proposers:
            proposer.close()

    def __repr__(self) -> str:
        return f"ChainProposer({', '.join(map(repr, self.proposers))})"
