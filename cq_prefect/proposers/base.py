"""The proposer interface: one required method that turns the loop's history into the next hypotheses.

    >>> class Halve(Proposer):
    ...     def propose(self, history, n):
    ...         lr = 0.1 / 2 ** len(history)
    ...         return [Hypothesis(title=f"lr {lr}", change={"lr": lr})][:n]
    >>> Halve().propose([], 2)
    [Hypothesis(title='lr 0.1', rationale='', change={'lr': 0.1})]

Proposers follow Optuna's samplers: they read frozen :class:`~cq_prefect.records.ExperimentRecord` s and
never write state, so a loop resumed after a crash gets the same behaviour by handing the same history
back. Every built-in passes the contract suite in :mod:`cq_prefect.testing`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from cq_prefect.records import ExperimentRecord, Hypothesis


class Proposer(ABC):
    """Suggests what to try next. Subclasses implement :meth:`propose`; the hooks are optional."""

    @abstractmethod
    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        """Up to ``n`` new hypotheses given every experiment so far; an empty list means nothing is left.

        Args:
            history: the loop's records in submission order, ``running`` ones included (pending: they
                count as tried, never propose them again). Never mutated.
            n: how many the loop can run now (≥ 1).

        Once a proposer returns ``[]`` for a history it must keep doing so for any longer history: the
        loop stops with ``proposer_exhausted``.
        """

    def observe(self, record: ExperimentRecord) -> None:
        """Called once per finished experiment, in the order they finish. Default: nothing.

        A cache at most: the next :meth:`propose` gets the full history anyway, and a resumed loop never
        replays ``observe`` calls.
        """

    def state(self) -> Mapping[str, Any]:
        """A small JSON-able description for the ledger and ``cq loop status`` (e.g. seed, ideas left).
        Default: empty. Informative only: resume rebuilds from the history, not from this."""
        return {}

    def why_exhausted(self) -> str | None:
        """Why the last :meth:`propose` returned nothing, when it was not simply out of ideas (the loop says it
        and records it beside ``proposer_exhausted``). Default: None."""
        return None

    def close(self) -> None:
        """Release what the proposer holds (a client, a study). Default: nothing."""
