"""A YAML document that remembers where each value came from, so validation errors can name the line.

    >>> doc = YamlSource.parse("name: demo\\nbudget: 0\\n", "loop.yaml")
    >>> doc.data, doc.line_of(("budget",))
    ({'name': 'demo', 'budget': 0}, 2)

:meth:`YamlSource.explain` turns a pydantic ``ValidationError`` into one line per problem:
``loop.yaml line 2: budget: must be at least 1 …``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

# Pydantic phrases rewritten so each line says what to do, not only what is wrong.
_PREFIXES = ("Value error, ", "Assertion failed, ")
_NAMED_FIELD = re.compile(r"([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")


class YamlSource:
    """Parsed YAML data plus the line of every mapping key and value (1-based)."""

    def __init__(self, data: Any, name: str, lines: dict[tuple, int], path: Path | None = None):
        self.data = data
        self.name = name
        self.path = path
        self._lines = lines

    @classmethod
    def parse(cls, text: str, name: str = "<yaml>", path: Path | None = None) -> YamlSource:
        """Parse YAML text; ValueError naming the line when it is not valid YAML."""
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ValueError(f"{name}{where}: not valid YAML ({problem}); check the indentation and quoting") from exc
        lines: dict[tuple, int] = {}
        if node is not None:
            _index(node, (), lines)
        return cls(data, name, lines, path)

    @classmethod
    def read(cls, source: str | Path, name: str = "<yaml>") -> YamlSource:
        """Parse a file (a ``Path``, or a string naming an existing ``.yaml``/``.yml`` file) or YAML text
        (called ``name`` in messages)."""
        path = _as_path(source)
        if path is None:
            return cls.parse(str(source), name)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}; check the path") from exc
        return cls.parse(text, str(path), path.resolve())

    def line_of(self, loc: tuple) -> int | None:
        """The line of the deepest part of ``loc`` present in the document (pydantic's union tags and
        validator names in ``loc`` are skipped); None for an empty document."""
        found, path = None, ()
        for part in loc:
            candidate = (*path, part)
            if candidate in self._lines:
                path = candidate
                found = self._lines[path]
        return found if found is not None else self._lines.get(())

    def user_loc(self, loc: tuple) -> tuple:
        """``loc`` without the parts pydantic adds (union tags, validator names) that are not in the document."""
        kept: tuple = ()
        for part in loc:
            if (*kept, part) in self._lines or isinstance(part, int) or not _is_internal(part):
                kept = (*kept, part)
        return kept

    def explain(self, exc: ValidationError, describe: Callable[[dict], str | None] | None = None) -> str:
        """Every error of ``exc`` on its own line, with this document's name, the line and the field path.

        ``describe(error)`` may return a better message for an error (e.g. the allowed keys for an unknown
        one); pydantic's own message is used when it returns None.
        """
        out = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = (describe(error) if describe else None) or plain_message(error)
            named = _NAMED_FIELD.match(message)
            if not loc and named:
                # A whole-model check names its field first ("goal: …"): point at that field's line.
                loc = tuple(int(p) if p.isdigit() else p for p in named.group(1).split("."))
                message = message[named.end() :]
            line = self.line_of(loc)
            where = f"{self.name} line {line}" if line else self.name
            field = dotted(self.user_loc(loc), keep_all=True)
            out.append(f"{where}: {field + ': ' if field else ''}{message}")
        return "\n".join(out)


def dotted(loc: tuple, keep_all: bool = False) -> str:
    """A pydantic location as a field path: ``('proposer', 'optuna', 'space', 'lr')`` → ``proposer.space.lr``
    (discriminator tags and validator names, which are not in the user's file, are left out)."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif keep_all or not _is_internal(part):
            parts.append(("." if parts else "") + part)
    return "".join(parts)


# Union members are tagged with their discriminator value or a type description such as
# `function-after[_check(), FloatParam]`.
_INTERNAL_PARTS = {"scripted", "optuna", "claude", "float", "int", "categorical", "str", "list", "dict", "bool"}


def _is_internal(part: str) -> bool:
    return "[" in part or part in _INTERNAL_PARTS


def plain_message(error: dict) -> str:
    """Pydantic's message for one error, without its ``Value error,`` prefix."""
    message = error["msg"]
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message


def _index(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            _index(value_node, (*path, key), lines)
            # A key is where readers look for it; a nested block value starts on the next line.
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _index(item, (*path, index), lines)


def _as_path(source: str | Path) -> Path | None:
    if isinstance(source, Path):
        return source
    text = str(source)
    if "\n" in text or not text.strip():
        return None
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return Path(text)
    return None


def read_listing(source: str | Path, what: str, key: str) -> tuple[YamlSource, Any, tuple]:
    """A file path or YAML text of ideas / a search space: (document, data, path prefix). A top-level
    mapping holding only ``key`` (``ideas:`` / ``space:``) is unwrapped; errors become LoopConfigError."""
    from cq_prefect.errors import LoopConfigError

    try:
        doc = YamlSource.read(source, what)
    except ValueError as exc:
        raise LoopConfigError(str(exc)) from exc
    if isinstance(doc.data, dict) and set(doc.data) == {key}:
        return doc, doc.data[key], (key,)
    return doc, doc.data, ()

