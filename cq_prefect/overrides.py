"""Parameter overrides: how a hypothesis's ``change`` becomes the command an experiment runs; no Prefect import.

A command with ``{key}`` placeholders gets them filled; any other command gets ``--key=value`` flags,
replacing a ``--key=…`` already there or appended otherwise. Values are quoted for ``/bin/sh``.

    >>> render_command("python train.py --lr=0.1", {"lr": 0.01, "bone_loss": True})
    'python train.py --lr=0.01 --bone_loss=true'
    >>> render_command("python train.py --lr {lr} --name {name}", {"lr": 3e-4, "name": "a b"})
    "python train.py --lr 0.0003 --name 'a b'"
    >>> merge_overrides({"lr": 0.1}, {"bone_loss": True}, {"lr": 0.05})
    {'lr': 0.05, 'bone_loss': True}

Nothing is guessed: a change the command cannot take (a missing placeholder, a flag to append to a
pipeline) is an :class:`~cq_prefect.errors.OverrideError` that says what to write instead.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from cq_prefect.errors import OverrideError

KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_.\-]*"
_KEY = re.compile(KEY_PATTERN)
# `{lr}` is a placeholder; `${HOME}`, `{{lr}}`, `{a,b}` and awk's `{print $1}` are not.
_PLACEHOLDER = re.compile(r"(?<![$\{])\{(" + KEY_PATTERN + r")\}(?!\})")
_CONTROL = {";", "&", "&&", "||", "|", "|&", ";;", "(", ")", "\n"}
_REDIRECT_START = set("<>")


def format_value(value: Any) -> str:
    """A value as the command-line text the script receives (before shell quoting).

    Booleans become ``true``/``false`` (what YAML, JSON, absl and click parse as booleans); floats use the
    shortest text that reads back as the same float.

        >>> format_value(True), format_value(0.1), format_value(1e-05), format_value(4), format_value("relu")
        ('true', '0.1', '1e-05', '4', 'relu')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def merge_overrides(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Overrides stacked in order, later layers winning: the base, then each kept change, then the new one.

        >>> merge_overrides({"lr": 0.1, "layers": 4}, None, {"layers": 6})
        {'lr': 0.1, 'layers': 6}
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer or {})
    return merged


def placeholders(command: str) -> list[str]:
    """The ``{key}`` placeholders in a command, each once, in order of appearance.

        >>> placeholders("python train.py --lr={lr} --wd {wd} --again {lr} && echo ${HOME} '{print $1}'")
        ['lr', 'wd']
    """
    return list(dict.fromkeys(_PLACEHOLDER.findall(command)))


def render_command(command: str, overrides: Mapping[str, Any]) -> str:
    """The command with ``overrides`` applied (see the module docstring); OverrideError when they cannot be.

        >>> render_command("python train.py 2>&1 > log.txt", {"lr": 0.1})
        'python train.py --lr=0.1 2>&1 > log.txt'
    """
    for key in overrides:
        if not _KEY.fullmatch(str(key)):
            raise OverrideError(
                f"override key {key!r} is not a valid parameter name; use letters, digits, '_', '.', '-' "
                f"starting with a letter or '_' (e.g. lr, model.layers)"
            )
    names = placeholders(command)
    if names:
        return _fill_placeholders(command, names, overrides)
    return _apply_flags(command, overrides)


def _fill_placeholders(command: str, names: list[str], overrides: Mapping[str, Any]) -> str:
    missing = [name for name in names if name not in overrides]
    if missing:
        listed = ", ".join(f"{{{name}}}" for name in missing)
        raise OverrideError(
            f"the command has placeholders {listed} but no value for {', '.join(missing)}; give defaults in the "
            f"experiment's params (e.g. params: {{{missing[0]}: …}}) or remove the placeholder"
        )
    unused = [key for key in overrides if key not in names]
    if unused:
        raise OverrideError(
            f"the change sets {', '.join(unused)} but the command has no placeholder for "
            f"{'it' if len(unused) == 1 else 'them'}; add e.g. --{unused[0]}={{{unused[0]}}} to the command"
        )
    quoted = _quoted_spans(command)
    for match in _PLACEHOLDER.finditer(command):
        if any(start <= match.start() < end for start, end in quoted):
            raise OverrideError(
                f"placeholder {match.group(0)} is inside quotes in {command!r}; remove the quotes around it "
                f"(cq quotes every value for the shell itself)"
            )
    return _PLACEHOLDER.sub(lambda m: shlex.quote(format_value(overrides[m.group(1)])), command)


def _apply_flags(command: str, overrides: Mapping[str, Any]) -> str:
    tokens = _scan(command)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in the original text
    new_flags: list[str] = []
    for key, value in overrides.items():
        flag = f"--{key}={shlex.quote(format_value(value))}"
        spans = [
            (start, end)
            for start, end, kind, text in tokens
            if kind == "word" and _unquoted(text).startswith(f"--{key}=")
        ]
        if spans:
            edits.extend((start, end, flag) for start, end in spans)
        else:
            new_flags.append(flag)
    if new_flags:
        controls = [text for _, _, kind, text in tokens if kind == "control"]
        if controls:
            raise OverrideError(
                f"cannot tell which part of {command!r} takes {new_flags[0]} (the command has "
                f"{controls[0]!r}); add --{new_flags[0][2:].split('=')[0]}=<default> where it belongs, or use "
                f"{{key}} placeholders"
            )
        # Flags go before the first redirection or comment: after `> log.txt` they would still reach the
        # program, but after `# note` they would be commented out.
        stop = next((start for start, _, kind, _ in tokens if kind in ("redirect", "comment")), len(command))
        head, tail = command[:stop].rstrip(), command[stop:]
        edits.append((len(head), stop, " " + " ".join(new_flags) + (" " if tail else "")))
    result = command
    for start, end, text in sorted(edits, reverse=True):
        result = result[:start] + text + result[end:]
    return result


def _unquoted(word: str) -> str:
    try:
        parts = shlex.split(word)
    except ValueError:
        return word
    return parts[0] if len(parts) == 1 else word


def _scan(command: str) -> list[tuple[int, int, str, str]]:
    """Split a shell command into (start, end, kind, text) tokens; kind: word | control | redirect | comment.

    Enough of sh to find words, operators and redirections without running anything: quotes, backslashes,
    ``$( … )`` and backticks are kept inside their word.
    """
    tokens: list[tuple[int, int, str, str]] = []
    i, n = 0, len(command)
    while i < n:
        char = command[i]
        if char in " \t":
            i += 1
        elif char == "#":
            tokens.append((i, n, "comment", command[i:]))
            break
        elif char == "\n" or char in "|&;()":
            start = i
            i += 1
            while i < n and command[start : i + 1] in _CONTROL:
                i += 1
            tokens.append((start, i, "control", command[start:i]))
        elif char in _REDIRECT_START:
            start = i
            while i < n and command[i] in "<>&|-":
                i += 1
            if command[start:i].startswith("<<"):
                tokens.append((start, i, "control", command[start:i]))  # a here-document: not a flag's place
            else:
                tokens.append((start, i, "redirect", command[start:i]))
        else:
            start = i
            i = _word_end(command, i)
            text = command[start:i]
            if text.isdigit() and i < n and command[i] in _REDIRECT_START:
                tokens.append((start, i, "redirect", text))  # `2>&1`: the 2 belongs to the redirection
            else:
                tokens.append((start, i, "word", text))
    return tokens


def _word_end(command: str, i: int) -> int:
    n = len(command)
    depth = 0
    while i < n:
        char = command[i]
        if char == "\\":
            i += 2
            continue
        if char == "'":
            close = command.find("'", i + 1)
            i = n if close < 0 else close + 1
            continue
        if char == '"':
            i += 1
            while i < n and command[i] != '"':
                i += 2 if command[i] == "\\" else 1
            i += 1
            continue
        if char == "`":
            close = command.find("`", i + 1)
            i = n if close < 0 else close + 1
            continue
        if char == "$" and command[i + 1 : i + 2] == "(":
            depth += 1
            i += 2
            continue
        if char == ")" and depth:
            depth -= 1
            i += 1
            continue
        if not depth and (char in " \t\n|&;()<>"):
            break
        i += 1
    return min(i, n)


def _quoted_spans(command: str) -> list[tuple[int, int]]:
    """Where single or double quotes are open, as (start, end) index ranges."""
    spans, i, n = [], 0, len(command)
    while i < n:
        char = command[i]
        if char == "\\":
            i += 2
        elif char in "'\"":
            close = i + 1
            while close < n and command[close] != char:
                close += 2 if (char == '"' and command[close] == "\\") else 1
            spans.append((i, close + 1))
            i = close + 1
        else:
            i += 1
    return spans
