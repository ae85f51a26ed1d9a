"""The Claude proposer: Claude reads the loop's ledger and proposes the next experiments through a tool.

    >>> proposer = ClaudeProposer(Brief(goal="MPJPE below 25mm", metric="mpjpe", direction="minimize",
    ...                                 target=25.0, params={"lr": None}), api_key="sk-ant-…")  # doctest: +SKIP
    >>> proposer.propose(history, 1)                                                             # doctest: +SKIP
    [Hypothesis(title='cosine schedule', rationale='…', change={'lr_schedule': 'cosine'}, edits=())]

Each proposal is one Messages API call (the anthropic SDK) whose only tool is ``propose_experiment``:
title, rationale, overrides (values for the declared parameters only, each checked against the search
space) and code edits (``{path, old, new}`` replacements in files matching the loop's editable globs).
The prompt holds the goal and target, the best experiment so far, the whole ledger as a compact table,
related knowledge from earlier loops, the allowed parameters, and the editable files at the best commit.
Claude never supplies a command: the loop renders the configured command with the values (shell-quoted).

Failures are data, as everywhere in a loop. The SDK backs off and retries 429, 5xx and 529 (overloaded)
itself; an answer that is not a valid tool call (text only, bad input, an unknown parameter, an edit outside
the editable files) gets one repair round that quotes the problem; when that fails too, or the API stays
away, the proposal comes from the ``fallback`` proposer (Optuna or scripted) and each fallback hypothesis
says why in its rationale, so the ledger, the log and the MLflow run record it. The API key stays a
:class:`~pydantic.SecretStr` until the SDK client is built and is never logged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr, ValidationError

from cq_prefect.errors import CqError, MissingDependency
from cq_prefect.proposers.base import Proposer
from cq_prefect.proposers.search_space import CategoricalParam, FloatParam, IntParam
from cq_prefect.records import Edit, ExperimentRecord, Hypothesis, change_key

log = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-opus-5-5"
"""A current Claude model (in the SDK's model list and not in its deprecated list; a test checks both)."""
DEFAULT_EFFORT = "high"
EFFORTS = ("low", "medium", "high", "xhigh", "max")
TOOL_NAME = "propose_experiment"
MAX_TOKENS = 16_000
MAX_RETRIES = 4  # the SDK's own backoff on 408/409/429/5xx/529 (0.5 s doubling to 8 s, or retry-after)
TIMEOUT_S = 600.0

Param = FloatParam | IntParam | CategoricalParam | None
"""A declared parameter: its search-space range, or None when any value goes (a base param of the command)."""


class ClaudeUnavailable(CqError):
    """Claude gave no usable proposal: the API failed after its retries, or the answer stayed malformed."""


@dataclass(frozen=True)
class Brief:
    """What the proposer tells Claude about the loop: the goal and what Claude may change."""

    goal: str
    metric: str
    direction: str
    target: float | None = None
    unit: str | None = None
    params: Mapping[str, Param] = field(default_factory=dict)
    base_params: Mapping[str, Any] = field(default_factory=dict)  # the values the base experiment runs with
    editable: Sequence[str] = ()
    instructions: str | None = None
    knowledge: Sequence[str] = ()  # lines about related experiments and notes of earlier loops
    files: Callable[[Sequence[ExperimentRecord]], Mapping[str, str]] | None = None  # editable files at the best commit

    def format(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "–"
        return f"{value:.4g}{self.unit or ''}"


def import_anthropic() -> Any:
    """The ``anthropic`` module, or MissingDependency with the command that installs it."""
    try:
        import anthropic
    except ImportError as exc:
        raise MissingDependency(
            "the claude proposer needs the anthropic SDK, which is not installed; run: pip install 'anthropic>=2.14,<3' "
            "(or choose proposer: scripted or optuna)"
        ) from exc
    return anthropic


def default_http_client() -> Any:
    """The HTTP client of new SDK clients: None, the SDK's own. Tests return an ``httpx2.Client`` with a
    ``MockTransport`` here (there is no network where they run)."""
    return None


def make_client(api_key: SecretStr | str, *, max_retries: int = MAX_RETRIES, http_client: Any = None) -> Any:
    """An ``anthropic.Anthropic`` client; the key leaves its SecretStr only here."""
    anthropic = import_anthropic()
    secret = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
    return anthropic.Anthropic(api_key=secret, max_retries=max_retries, timeout=TIMEOUT_S,
                               http_client=http_client if http_client is not None else default_http_client())


# -- the tool ------------------------------------------------------------------------------------------


def tool_schema(params: Mapping[str, Param], editable: Sequence[str]) -> dict[str, Any]:
    """The ``propose_experiment`` tool: its input schema allows the declared parameters, and edits only when
    the loop has editable files.

        >>> schema = tool_schema({"lr": FloatParam(type="float", low=1e-4, high=0.1, log=True)}, [])
        >>> schema["input_schema"]["properties"]["overrides"]["properties"]["lr"]
        {'type': 'number', 'minimum': 0.0001, 'maximum': 0.1}
        >>> "edits" in schema["input_schema"]["properties"]
        False
    """
    properties: dict[str, Any] = {
        "title": {"type": "string", "description": "Short name of the idea, e.g. 'bone-length loss'."},
        "rationale": {"type": "string",
                      "description": "Why it should improve the metric, citing the ledger or knowledge it builds on."},
        "overrides": {
            "type": "object", "additionalProperties": False,
            "description": "Values for the declared parameters only (others keep their current value).",
            "properties": {name: param_schema(param) for name, param in params.items()},
        },
    }
    if editable:
        properties["edits"] = {
            "type": "array",
            "description": "Code edits: replace the exact text `old` (which must occur exactly once in the file) by "
                           "`new`; an empty `old` creates a new file. Paths are relative to the workdir and must "
                           f"match the editable globs {list(editable)}.",
            "items": {"type": "object", "additionalProperties": False, "required": ["path", "old", "new"],
                      "properties": {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}},
        }
    return {
        "name": TOOL_NAME,
        "description": "Propose one experiment for the research loop: a change to the base experiment (parameter "
                       "overrides and/or code edits) that should move the metric toward the target. Call it once "
                       "per experiment asked for.",
        "input_schema": {"type": "object", "additionalProperties": False, "required": ["title", "rationale"],
                         "properties": properties},
    }


def param_schema(param: Param) -> dict[str, Any]:
    if isinstance(param, FloatParam):
        return {"type": "number", "minimum": param.low, "maximum": param.high}
    if isinstance(param, IntParam):
        return {"type": "integer", "minimum": param.low, "maximum": param.high}
    if isinstance(param, CategoricalParam):
        return {"enum": list(param.choices)}
    return {"type": ["number", "integer", "string", "boolean"]}


def parse_proposal(data: Any, brief: Brief, files: Mapping[str, str] | None = None) -> Hypothesis:
    """A hypothesis from one ``propose_experiment`` input; ValueError saying what is wrong, for the repair round.

        >>> brief = Brief(goal="g", metric="m", direction="minimize", params={"lr": None})
        >>> parse_proposal({"title": "lower lr", "rationale": "noisy loss", "overrides": {"lr": 0.01}}, brief).change
        {'lr': 0.01}
        >>> parse_proposal({"title": "x", "rationale": "", "overrides": {"epochs": 99}}, brief)
        Traceback (most recent call last):
        ValueError: overrides: 'epochs' is not a declared parameter (allowed: lr)
    """
    from cq_prefect.code_changes import EditRejected, check_edit_path

    if not isinstance(data, Mapping):
        raise ValueError("the tool input must be an object with title, rationale, overrides, edits")
    unknown = sorted(set(data) - {"title", "rationale", "overrides", "edits"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; the fields are title, rationale, overrides, edits")
    title, rationale = data.get("title"), data.get("rationale", "")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title: give a short name of the idea")
    if not isinstance(rationale, str):
        raise ValueError("rationale: give the reason as text")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("overrides: an object of parameter → value")
    change = {}
    for name, value in overrides.items():
        if name not in brief.params:
            allowed = ", ".join(brief.params) or "none: change the code instead"
            raise ValueError(f"overrides: {name!r} is not a declared parameter (allowed: {allowed})")
        change[name] = check_value(name, value, brief.params[name])
    raw_edits = data.get("edits") or []
    if raw_edits and not brief.editable:
        raise ValueError("edits: this loop edits no code (no code.editable globs); change parameters only")
    if not isinstance(raw_edits, list):
        raise ValueError("edits: a list of {path, old, new}")
    edits = []
    for number, raw in enumerate(raw_edits, 1):
        try:
            edit = Edit.model_validate(raw)
            path = check_edit_path(edit.path, brief.editable)
        except ValidationError as exc:
            raise ValueError(f"edits[{number}]: each edit is {{path, old, new}} with text values ({exc.errors()[0]['msg']})") from None
        except EditRejected as exc:
            raise ValueError(f"edits[{number}]: {exc}") from None
        text = (files or {}).get(path)
        if text is not None and edit.old and text.count(edit.old) != 1:
            found = text.count(edit.old)
            raise ValueError(f"edits[{number}]: the `old` text occurs {found} times in {path}; quote it exactly as the "
                             f"file has it, with enough context to occur exactly once")
        edits.append(edit.model_copy(update={"path": path}))
    if not change and not edits:
        raise ValueError("propose a change: overrides for the declared parameters, or code edits")
    return Hypothesis(title=title.strip()[:200], rationale=rationale.strip(), change=change, edits=tuple(edits))


def check_value(name: str, value: Any, param: Param) -> Any:
    if isinstance(value, bool) and not isinstance(param, CategoricalParam):
        if param is None:
            return value
        raise ValueError(f"overrides: {name}={value!r} must be a number")
    if param is None:
        if not isinstance(value, (str, int, float)) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"overrides: {name}={value!r} must be a number, text or true/false")
        return value
    if isinstance(param, CategoricalParam):
        if value not in param.choices:
            raise ValueError(f"overrides: {name}={value!r} is not one of {list(param.choices)}")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"overrides: {name}={value!r} must be a number in [{param.low}, {param.high}]")
    if isinstance(param, IntParam):
        if value != int(value):
            raise ValueError(f"overrides: {name}={value!r} must be an integer in [{param.low}, {param.high}]")
        value = int(value)
    if not param.low <= value <= param.high:
        raise ValueError(f"overrides: {name}={value!r} is outside [{param.low}, {param.high}]")
    return value


# -- the prompt --------------------------------------------------------------------------------------------

SYSTEM = """\
You are the researcher running an autonomous ML research loop. Each experiment you propose is run as is: the \
loop applies your parameter values and code edits to the base experiment, runs it, reads the metric, keeps the \
change when it improves on the best so far (later experiments build on it) and discards it otherwise.

Propose experiments by calling the propose_experiment tool, once per experiment asked for. Rules:
- Set only the declared parameters, with values in their ranges. You never write a command.
- Edit only the editable files shown, by exact-text replacement: `old` must occur exactly once in the file \
as shown (copy it with its indentation and enough context).
- Do not repeat an experiment of the ledger. Learn from it: build on what was kept, avoid what was discarded \
or crashed, and prefer changes whose effect you can explain.
- Keep each experiment to one idea, so its effect can be measured."""


def ledger_table(records: Sequence[ExperimentRecord], brief: Brief) -> str:
    """The whole ledger as a compact Markdown table, one row per experiment."""
    if not records:
        return "(no experiments yet)"
    rows = ["| exp | outcome | " + brief.metric + " | hypothesis | change | code | note |", "|---|---|---|---|---|---|---|"]
    for record in records:
        change = ", ".join(f"{k}={v}" for k, v in record.change.items()) or "–"
        code = ", ".join(sorted({e.path for e in record.hypothesis.edits})) or "–"
        note = (record.message or "").replace("\n", " ")[:120] or "–"
        cells = [record.exp_id, record.outcome, brief.format(record.value), record.hypothesis.title, change, code, note]
        rows.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(rows)


def prompt(brief: Brief, history: Sequence[ExperimentRecord], n: int, files: Mapping[str, str]) -> str:
    """The user message: goal, best, ledger, knowledge, parameters, editable files, instructions, the ask."""
    finished = [r for r in history if r.has_value and r.outcome in ("kept", "discarded")]
    best = None
    for record in finished:
        if best is None or (record.value < best.value if brief.direction == "minimize" else record.value > best.value):
            best = record
    parts = [
        "# Goal",
        f"{brief.goal or brief.metric}: {brief.direction} `{brief.metric}`, target {brief.format(brief.target)}.",
        "Best so far: " + (f"{best.exp_id} with {brief.metric}={brief.format(best.value)} ({best.hypothesis.title})"
                           if best else "no result yet"),
        "",
        f"# Ledger ({len(history)} experiments, oldest first; kept changes are part of the current base)",
        ledger_table(history, brief),
    ]
    if brief.knowledge:
        parts += ["", "# Related knowledge from earlier loops and notes", *[f"- {line}" for line in brief.knowledge]]
    parts += ["", "# Parameters you may set"]
    if brief.params:
        for name, param in brief.params.items():
            current = brief.base_params.get(name)
            parts.append(f"- {name}: {_describe_param(param)}" + ("" if current is None else f" (base: {current})"))
    else:
        parts.append("(none: propose code edits)")
    if brief.editable:
        parts += ["", f"# Editable files (globs {list(brief.editable)}), at the best experiment's commit"]
        if files:
            for path, text in files.items():
                if path.startswith("[cq:"):  # the files past the prompt's size limit, by name
                    parts += [f"{path[1:-1]} (the prompt's size limit): " + ", ".join(text.split())]
                else:
                    parts += [f'<file path="{path}">', text.rstrip("\n"), "</file>"]
        else:
            parts.append("(no file matches the globs yet; an edit with an empty `old` creates one)")
    if brief.instructions:
        parts += ["", "# Instructions from the researcher", brief.instructions.strip()]
    parts += ["", f"Propose {n} new experiment{'s' if n > 1 else ''}: call {TOOL_NAME} {n} time{'s' if n > 1 else ''}."]
    return "\n".join(parts)


def _describe_param(param: Param) -> str:
    if isinstance(param, FloatParam):
        return f"number in [{param.low}, {param.high}]" + (" (log scale)" if param.log else "")
    if isinstance(param, IntParam):
        return f"integer in [{param.low}, {param.high}]"
    if isinstance(param, CategoricalParam):
        return "one of " + ", ".join(json.dumps(c) for c in param.choices)
    return "any value (number, text or true/false)"


# -- the proposer --------------------------------------------------------------------------------------------


class ClaudeProposer(Proposer):
    """Asks Claude for each cycle's hypotheses; falls back to another proposer when Claude gives none.

    Args:
        brief: the goal, the declared parameters, the editable globs, knowledge and a reader of the files.
        model: a Claude model name (default :data:`DEFAULT_MODEL`).
        effort: low | medium | high | xhigh | max, or None for the model's default.
        api_key: the Anthropic key (ignored when ``client`` is given).
        client: an ``anthropic.Anthropic`` to use instead of building one (its ``http_client`` is the seam tests use).
        fallback: the proposer used when Claude gives no valid proposal; None stops the loop (proposer exhausted).
    """

    def __init__(self, brief: Brief, *, model: str | None = None, effort: str | None = DEFAULT_EFFORT,
                 api_key: SecretStr | str | None = None, client: Any = None, fallback: Proposer | None = None,
                 max_tokens: int = MAX_TOKENS, max_retries: int = MAX_RETRIES):
        if client is None:
            if api_key is None:
                raise ValueError("give api_key or client")
            client = make_client(api_key, max_retries=max_retries)
        self.brief = brief
        self.model = model or DEFAULT_MODEL
        self.effort = effort
        self.max_tokens = max_tokens
        self.fallback = fallback
        self._client = client
        self.calls = 0
        self.fallbacks: list[str] = []
        self._exhausted: str | None = None

    def propose(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        try:
            return self._ask(history, n)
        except ClaudeUnavailable as exc:
            reason = str(exc)
        self.fallbacks.append(reason)
        if self.fallback is None:
            log.warning("Claude proposed nothing usable (%s) and the loop has no fallback proposer: stopping", reason)
            self._exhausted = (f"Claude proposed nothing usable ({reason}) and the loop has no fallback proposer; "
                               "give proposer.fallback (scripted ideas or an Optuna space) or proposer.space to go on")
            return []
        log.warning("Claude proposed nothing usable (%s): the fallback proposer takes this cycle", reason)
        note = f"[fallback from Claude: {reason}]"
        return [h.model_copy(update={"rationale": f"{note} {h.rationale}".strip()})
                for h in self.fallback.propose(history, n)]

    def _ask(self, history: Sequence[ExperimentRecord], n: int) -> list[Hypothesis]:
        files = dict(self.brief.files(history)) if self.brief.files else {}
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt(self.brief, history, n, files)}]
        tried = {change_key(r.change): r.exp_id for r in history if not r.hypothesis.edits}
        chosen: list[Hypothesis] = []
        for round_ in (1, 2):  # the answer, then one repair round
            response = self._create(messages)
            results, problems = [], []
            uses = [block for block in response.content if getattr(block, "type", None) == "tool_use"]
            for use in uses:
                try:
                    if use.name != TOOL_NAME:
                        raise ValueError(f"unknown tool {use.name!r}; call {TOOL_NAME}")
                    hypothesis = parse_proposal(use.input, self.brief, files)
                    key = change_key(hypothesis.change)
                    if not hypothesis.edits and key in tried:
                        raise ValueError(f"this change was already run as {tried[key]}; propose something new")
                    if any(h.key == hypothesis.key and h.edits == hypothesis.edits for h in chosen):
                        raise ValueError("the same experiment twice in one answer")
                except ValueError as exc:
                    problems.append(str(exc))
                    results.append({"type": "tool_result", "tool_use_id": use.id, "is_error": True, "content": str(exc)})
                    continue
                chosen.append(hypothesis)
                results.append({"type": "tool_result", "tool_use_id": use.id, "content": "accepted"})
            if len(chosen) >= n or (chosen and round_ == 2):
                return chosen[:n]
            if not uses:
                problems.append("the answer called no tool" + _text_excerpt(response))
            if round_ == 2:
                break
            missing = n - len(chosen)
            ask = (f"{'; '.join(problems)}. Call {TOOL_NAME} again ({missing} more experiment"
                   f"{'s' if missing > 1 else ''}), fixing this.")
            messages.append({"role": "assistant", "content": [request_block(block) for block in response.content]})
            messages.append({"role": "user", "content": [*results, {"type": "text", "text": ask}]})
            log.info("Claude's answer was not usable (%s): asking once more", "; ".join(problems)[:500])
        raise ClaudeUnavailable(f"malformed answer after a repair round: {'; '.join(problems)[:400]}")

    def _create(self, messages: list[dict[str, Any]]) -> Any:
        anthropic = import_anthropic()
        options: dict[str, Any] = {}
        if self.effort:
            options["output_config"] = {"effort": self.effort}
        self.calls += 1
        try:
            return self._client.messages.create(
                model=self.model, max_tokens=self.max_tokens, system=SYSTEM, messages=messages,
                tools=[tool_schema(self.brief.params, self.brief.editable)],
                tool_choice={"type": "any"}, **options)
        except anthropic.APIStatusError as exc:
            raise ClaudeUnavailable(f"the Anthropic API answered {exc.status_code} ({_error_type(exc)}) after "
                                    f"{self._client.max_retries} retries") from exc
        except anthropic.APIConnectionError as exc:
            raise ClaudeUnavailable(f"the Anthropic API could not be reached ({type(exc).__name__})") from exc

    def why_exhausted(self) -> str | None:
        return self._exhausted

    def state(self) -> Mapping[str, Any]:
        return {"model": self.model, "effort": self.effort, "calls": self.calls, "fallbacks": len(self.fallbacks),
                **({"last_fallback": self.fallbacks[-1]} if self.fallbacks else {})}

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            if self.fallback is not None:
                self.fallback.close()

    def __repr__(self) -> str:
        return f"ClaudeProposer(model={self.model!r}, effort={self.effort!r})"


def request_block(block: Any) -> dict[str, Any]:
    """A response content block as a request block (what the assistant said, sent back in the repair round)."""
    data = block.model_dump(mode="json", exclude_none=True) if hasattr(block, "model_dump") else dict(block)
    keep = {"text": ("type", "text"), "tool_use": ("type", "id", "name", "input"),
            "thinking": ("type", "thinking", "signature"), "redacted_thinking": ("type", "data")}
    fields = keep.get(data.get("type"))
    return {k: data[k] for k in fields if k in data} if fields else data


def _text_excerpt(response: Any) -> str:
    text = " ".join(getattr(b, "text", "") for b in response.content if getattr(b, "type", None) == "text").strip()
    return f" (it said: {text[:150]!r})" if text else ""


def _error_type(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping) and error.get("type"):
            return str(error["type"])
    return type(exc).__name__
