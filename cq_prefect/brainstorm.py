"""Claude's brainstorm for ``cq pi``: directions from the goal and the related knowledge, as ideas.

    >>> brainstorm = ClaudeBrainstorm(api_key=key, space=space)                  # doctest: +SKIP
    >>> [s.title for s in brainstorm("improve MPJPE, target <25mm", hits, lines)] # doctest: +SKIP
    ['bone-length loss + cosine schedule', 'occlusion augmentation', …]

One Messages API call whose only tool, ``propose_directions``, takes a list of ``{title, rationale,
overrides}``: the entries of the ideas file ``cq pi`` writes. With a search space the overrides must be its
parameters, within their ranges. An answer that is not a valid call gets one repair round; then
:class:`~cq_prefect.proposers.claude.ClaudeUnavailable` says why, and ``cq pi`` derives the directions
from the knowledge instead (and says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import SecretStr

from cq_prefect.directions import Suggestion
from cq_prefect.proposers.claude import (DEFAULT_MODEL, MAX_RETRIES, ClaudeUnavailable, check_value, param_schema,
                                         request_block, import_anthropic, make_client)

TOOL_NAME = "propose_directions"
MAX_DIRECTIONS = 8

SYSTEM = """\
You are an ML research lead. From a goal and what earlier experiments and notes found, brainstorm the most \
promising next experiments: each one idea, with a rationale that cites the evidence it builds on (exp ids, \
notes) and the parameter values that implement it. Prefer combining what improved, then what was never \
tried; avoid what failed. Answer by calling propose_directions once."""


def tool(space: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``propose_directions`` tool; with a space, overrides are limited to its parameters and ranges."""
    overrides: dict[str, Any] = {"type": "object", "description": "Parameter values that implement the idea."}
    if space:
        overrides.update(additionalProperties=False,
                         properties={name: param_schema(param) for name, param in space.items()})
    item = {"type": "object", "additionalProperties": False, "required": ["title", "rationale", "overrides"],
            "properties": {"title": {"type": "string"}, "rationale": {"type": "string"}, "overrides": overrides}}
    return {"name": TOOL_NAME, "description": f"Propose up to {MAX_DIRECTIONS} directions, best first.",
            "input_schema": {"type": "object", "required": ["directions"], "additionalProperties": False,
                             "properties": {"directions": {"type": "array", "items": item,
                                                           "maxItems": MAX_DIRECTIONS}}}}


def parse(data: Any, space: Mapping[str, Any] | None) -> list[Suggestion]:
    """Suggestions from a ``propose_directions`` input; ValueError naming what is wrong (for the repair)."""
    items = data.get("directions") if isinstance(data, Mapping) else None
    if not isinstance(items, list) or not items:
        raise ValueError("directions: give a non-empty list of {title, rationale, overrides}")
    out = []
    for number, item in enumerate(items[:MAX_DIRECTIONS], 1):
        if not isinstance(item, Mapping) or not isinstance(item.get("title"), str) or not item["title"].strip():
            raise ValueError(f"directions[{number}]: each direction needs a title")
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise ValueError(f"directions[{number}].overrides: an object of parameter → value")
        checked = {}
        for name, value in overrides.items():
            if space and name not in space:
                raise ValueError(f"directions[{number}].overrides: {name!r} is not in the search space "
                                 f"(allowed: {', '.join(space)})")
            try:
                checked[name] = check_value(name, value, space.get(name) if space else None)
            except ValueError as exc:
                raise ValueError(f"directions[{number}].{exc}") from None
        out.append(Suggestion(title=item["title"].strip()[:200], rationale=str(item.get("rationale") or "").strip(),
                              overrides=checked, kind="brainstorm"))
    return out


class ClaudeBrainstorm:
    """A :class:`cq_prefect.directions.Brainstorm` that asks Claude."""

    def __init__(self, *, api_key: SecretStr | str | None = None, client: Any = None, model: str | None = None,
                 effort: str | None = None, space: Mapping[str, Any] | None = None, describe=None,
                 max_retries: int = MAX_RETRIES):
        self.model = model or DEFAULT_MODEL
        self.effort = effort  # low | medium | high | xhigh | max; None: the model's default
        self.name = f"Claude ({self.model})"
        self.space = space
        self.describe = describe or (lambda hit, number: f"{number}. {hit.entry.hypothesis or hit.entry.text}")
        self._client = client if client is not None else make_client(api_key, max_retries=max_retries)

    def __call__(self, goal: str, hits: Sequence[Any]) -> list[Suggestion]:
        anthropic = import_anthropic()
        knowledge = "\n".join(self.describe(hit, number) for number, hit in enumerate(hits, 1))
        space = "\n".join(f"- {name}: {param_schema(param)}" for name, param in (self.space or {}).items())
        text = (f"# Goal\n{goal}\n\n# Related knowledge, most related first\n{knowledge or '(nothing recorded yet)'}"
                + (f"\n\n# Search space (overrides must be these parameters, in range)\n{space}" if space else "")
                + f"\n\nCall {TOOL_NAME} with up to {MAX_DIRECTIONS} directions, best first.")
        messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
        problem = ""
        for round_ in (1, 2):
            try:
                response = self._client.messages.create(
                    model=self.model, max_tokens=8000, system=SYSTEM, messages=messages, tools=[tool(self.space)],
                    tool_choice={"type": "tool", "name": TOOL_NAME},
                    **({"output_config": {"effort": self.effort}} if self.effort else {}))
            except anthropic.APIStatusError as exc:
                raise ClaudeUnavailable(f"the Anthropic API answered {exc.status_code}") from exc
            except anthropic.APIConnectionError as exc:
                raise ClaudeUnavailable(f"the Anthropic API could not be reached ({type(exc).__name__})") from exc
            use = next((b for b in response.content if getattr(b, "type", None) == "tool_use"), None)
            try:
                if use is None:
                    raise ValueError(f"the answer called no tool; call {TOOL_NAME}")
                return parse(use.input, self.space)
            except ValueError as exc:
                problem = str(exc)
            if round_ == 1:
                messages.append({"role": "assistant", "content": [request_block(b) for b in response.content]})
                fix = [{"type": "tool_result", "tool_use_id": use.id, "is_error": True, "content": problem}] if use else []
                messages.append({"role": "user", "content": [*fix, {"type": "text", "text": f"{problem}. Call "
                                                                     f"{TOOL_NAME} again, fixing this."}]})
        raise ClaudeUnavailable(f"malformed answer after a repair round: {problem}")
