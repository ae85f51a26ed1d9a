"""The scripted proposer: ideas from a YAML list, tried in order, then exhausted.

    >>> proposer = ScriptedProposer.from_yaml('''
    ... - title: bone-length loss
    ...   rationale: limbs drift in length between frames
    ...   overrides: {bone_loss: 0.1}
    ... - title: cross-attention
    ...   overrides: {attention: cross}
    ... ''')
    >>> [h.title for h in proposer.propose([], 5)]
    ['bone-length loss', 'cross-attention']

An ideas file is a list of ``{title, rationale, overrides}`` (or a mapping with such a list under
``ideas:``, which is what ``cq pi`` writes). On resume, ideas already in the history — matched by title and
change — are skipped, so none runs twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from cq_prefect.errors import LoopConfigError
from cq_prefect.proposers.base import Proposer
from cq_prefect.records import Edit, ExperimentRecord, Hypothesis, Scalar
from cq_prefect.yaml_source import read_listing


class Idea(BaseModel):
    """One entry of an ideas file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(description="Short name of the idea; unique together with its overrides.", min_length=1)
    rationale: str = Field("", description="Why it might improve the metric (shown in the log and the ledger).")
    overrides: dict[str, Scalar] = Field(
        default_factory=dict, description="Parameters to set, e.g. {bone_loss: 0.1}; applied as --key=value."
    )
    edits: list[Edit] = Field(
        default_factory=list, description="Code edits {path, old, new}, made on the experiment's git branch "
        "(the loop needs code: {editable: [...]})."
    )

    def hypothesis(self) -> Hypothesis:
        return Hypothesis(title=self.title, rationale=self.rationale, change=self.overrides, edits=tuple(self.edits))


_IDEAS = TypeAdapter(list[Idea])


def load_ideas(source: str | Path | Sequence[Mapping[str, Any] | Idea]) -> list[Idea]:
    """Ideas from a file path, YAML text or a list; LoopConfigError naming the line and the fix.

        >>> [i.title for i in load_ideas([{"title": "wider", "overrides": {"width": 512}}])]
        ['wider']
    """
    doc = None
    if isinstance(source, (str, Path)):
        doc, data, prefix = read_listing(source, "ideas", "ideas")
        name = doc.name
    else:
        data, name, prefix = list(source), "ideas", ()
    if not isinstance(data, list) or not data:
        raise LoopConfigError(
            f"{name}: an ideas file is a non-empty list of {{title, rationale, overrides}}, e.g.\n"
            f"- title: bone-length loss\n  rationale: limbs drift\n  overrides: {{bone_loss: 0.1}}"
        )
    try:
        ideas = _IDEAS.validate_python(data)
    except ValidationError as exc:
        if doc is None:
            raise LoopConfigError(f"{name}: {exc}") from exc
        message = "\n".join(
            f"{name} line {doc.line_of((*prefix, *e['loc']))}: idea {_where(e['loc'])}: {_msg(e)}" for e in exc.errors()
        )
        raise LoopConfigError(message + "\n(each idea: title, optional rationale, overrides)") from exc
    seen: dict[tuple[str, str], int] = {}
    for index, idea in enumerate(ideas):
        key = idea.hypothesis().key
        if key in seen:
            raise LoopConfigError(
                f"{name}: ideas {seen[key] + 1} and {index + 1} are the same ({idea.title!r} with the same "
                f"overrides); remove one or change its title"
            )
        seen[key] = index
    return ideas


def _where(loc: tuple) -> str:
    index, *rest = loc
    return f"{index + 1}" + (f" ({'.'.join(str(p) for p in rest)})" if rest else "") if isinstance(index, int) else "?"


def _msg(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown key {error['loc'][-1]!r}; an idea has title, rationale and overrides"
    if error["type"] == "missing":
        return f"{error['loc'][-1]} is required"
    return error["msg"]


class ScriptedProposer(Proposer):
    """Proposes a fixed list of ideas in order, skipping those already in the history; then nothing.

    Args:
        ideas: :class:`Idea` s, :class:`~cq_prefect.records.Hypothesis` es or plain mappings.
    """

    def __init__(self, ideas: Sequence[Idea | Hypothesis | Mapping[str, Any]]):
        hypotheses = []
        for item in ideas:
            if isinstance(item, Hypothesis):
                hypotheses.append(item)
            elif isinstance(item, Idea):
                hypotheses.append(item.hypothesis())
            else:
                hypotheses.append(Idea.model_validate(item).hypothesis())
        self.hypotheses: tuple[Hypothesis, ...] = tuple(hypotheses)

    @classmethod
    def from_yaml(cls, source: str | Path) -> ScriptedProposer:
        """A proposer over the ideas in a YAML file or text (see :func:`load_ideas`)."""
        return cls(load_ideas(source))

    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        tried = {record.hypothesis.key for record in history}
        return [h for h in self.hypotheses if h.key not in tried][: max(n, 0)]

    def state(self) -> Mapping[str, Any]:
        return {"ideas": len(self.hypotheses)}

    def __repr__(self) -> str:
        return f"ScriptedProposer({len(self.hypotheses)} ideas)"
