"""Proposers: strategies that suggest the research loop's next hypotheses from its history.

    Proposer             the interface: propose(history, n) -> list[Hypothesis]; optional hooks
    ├── ScriptedProposer an ideas file, in order, then exhausted
    ├── OptunaProposer   TPE (or random search) over a search space (needs `pip install optuna`)
    ├── ClaudeProposer   Claude through the Messages API: parameter values and code edits, with a fallback
    └── ChainProposer    one after another: the next takes over when one is exhausted (ideas, then Optuna)

Shared fakes and the contract suite every proposer passes live in :mod:`cq_prefect.testing`.
Importing this package imports neither Optuna nor the anthropic SDK.
"""

from cq_prefect.proposers.base import Proposer
from cq_prefect.proposers.chain import ChainProposer
from cq_prefect.proposers.claude import ClaudeProposer
from cq_prefect.proposers.optuna_study import OptunaProposer
from cq_prefect.proposers.scripted import Idea, ScriptedProposer, load_ideas
from cq_prefect.proposers.search_space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    SearchSpace,
    cardinality,
    load_space,
)
from cq_prefect.records import ExperimentRecord, Hypothesis

__all__ = [
    "CategoricalParam",
    "ChainProposer",
    "ClaudeProposer",
    "ExperimentRecord",
    "FloatParam",
    "Hypothesis",
    "Idea",
    "IntParam",
    "OptunaProposer",
    "Proposer",
    "ScriptedProposer",
    "SearchSpace",
    "cardinality",
    "load_ideas",
    "load_space",
]
