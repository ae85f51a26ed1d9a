"""DAG YAML → a checked :class:`Dag`: schema, validation with YAML line numbers, ``when:`` conditions, the plan.

Plain Python (no Prefect import): :mod:`cq_prefect.dag` compiles a checked DAG into a Prefect flow.

    >>> dag = parse_dag('''
    ... name: full-pipeline
    ... nodes:
    ...   - {name: preprocess, command: python preprocess.py}
    ...   - {name: train, command: python train.py, gpu_count: 1, depends_on: [preprocess]}
    ...   - {name: evaluate, command: python evaluate.py}
    ... dependencies:
    ...   - {source: train, target: evaluate, when: "metrics.accuracy >= 0.9"}
    ... ''')
    >>> dag.stages()
    [['preprocess'], ['train'], ['evaluate']]

Every problem is found before anything runs and reported together, each with its line, as one
:class:`~cq_prefect.errors.DagError` (exit code 2 in the CLI).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cq_prefect.errors import DagError
from cq_prefect.spec import check_command, check_env_names

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
DependencyType = Literal["sequential", "data_dependency", "conditional"]


# -- the schema ---------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _check_name(value: str, what: str) -> str:
    if not NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1 to 100 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


class DagNode(_Strict):
    """One node: a shell command run as an experiment once its sources succeeded."""

    name: str = Field(description="Unique name of the node within the DAG (letters, digits, _ . -).")
    command: str = Field(description="Shell command, run by /bin/sh -c in the node's working_dir.")
    gpu_count: int = Field(0, ge=0, le=64, description="GPUs the node needs; > 0 runs it on a cq-gpu pool.")
    description: str | None = Field(None, description="What the node does (shown in the UI and MLflow).")
    working_dir: str | None = Field(
        None, description="Folder the command runs in; relative paths are relative to the DAG file's folder."
    )
    environment: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    max_retries: int | None = Field(None, ge=0, le=20, description="Extra attempts after a failure (default 0).")
    timeout: float | None = Field(None, gt=0, description="Kill the node's process tree after this many seconds.")
    pool: str | None = Field(None, description="Run the node as a child run on this work pool.")
    depends_on: list[str] = Field(default_factory=list, description="Nodes that must succeed first.")

    _name = field_validator("name")(lambda v: _check_name(v, "node name"))
    _env = field_validator("environment")(check_env_names)
    _command = field_validator("command")(check_command)

    @field_validator("timeout", mode="before")
    @classmethod
    def _int_timeout(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DagDependency(_Strict):
    """An edge: ``target`` starts after ``source`` succeeded (and, if given, its ``when:`` holds)."""

    source: str = Field(description="The node that runs first.")
    target: str = Field(description="The node that waits for it.")
    type: DependencyType | None = Field(
        None,
        description="sequential (default), data_dependency (the target gets the source's final metrics in "
        "CQ_UPSTREAM_METRICS) or conditional (needs when:).",
    )
    when: str | None = Field(
        None,
        description="Condition on the source's final metrics, e.g. \"metrics.accuracy >= 0.9\"; "
        "the target does not run when it is false.",
    )

    @property
    def kind(self) -> str:
        return self.type or ("conditional" if self.when else "sequential")


class Dag(_Strict):
    """A pipeline of experiments; see the module docstring and ../shared/DESIGN.md (DAG YAML)."""

    name: str = Field(description="Name of the DAG: the Prefect flow's and the MLflow parent run's name.")
    description: str | None = Field(None, description="What the pipeline does.")
    tags: list[str] = Field(default_factory=list, description="Tags for the Prefect flow runs and MLflow runs.")
    working_dir: str | None = Field(None, description="Default working_dir of every node.")
    environment: dict[str, str] = Field(default_factory=dict, description="Environment for every node.")
    max_retries: int = Field(0, ge=0, le=20, description="Default extra attempts of every node.")
    timeout: float | None = Field(None, gt=0, description="Default timeout (seconds) of every node.")
    pool: str | None = Field(None, description="Default work pool of nodes with gpu_count > 0.")
    nodes: list[DagNode] = Field(description="The nodes; at least one.")
    dependencies: list[DagDependency] = Field(default_factory=list, description="Edges between nodes.")

    _name = field_validator("name")(lambda v: _check_name(v, "DAG name"))
    _env = field_validator("environment")(check_env_names)

    @field_validator("timeout", mode="before")
    @classmethod
    def _int_timeout(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, value: list[DagNode]) -> list[DagNode]:
        if not value:
            raise ValueError("nodes is empty; a DAG needs at least one node (- name: ..., command: ...)")
        return value

    # -- the graph --------------------------------------------------------------------------------

    def node(self, name: str) -> DagNode:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, DagNode]:
        return {n.name: n for n in self.nodes}

    def edges(self) -> list[DagDependency]:
        """Every edge: ``dependencies`` plus each node's ``depends_on`` (as sequential edges), deduplicated."""
        return self._edges

    def sources(self, name: str) -> list[DagDependency]:
        return self._incoming.get(name, [])

    @cached_property
    def _incoming(self) -> dict[str, list[DagDependency]]:
        incoming: dict[str, list[DagDependency]] = {}
        for edge in self._edges:
            incoming.setdefault(edge.target, []).append(edge)
        return incoming

    @cached_property
    def _edges(self) -> list[DagDependency]:
        seen: dict[tuple[str, str], DagDependency] = {}
        for dep in self.dependencies:
            seen.setdefault((dep.source, dep.target), dep)
        for node in self.nodes:
            for source in node.depends_on:
                seen.setdefault((source, node.name), DagDependency(source=source, target=node.name))
        return list(seen.values())

    def downstream(self, names: set[str]) -> set[str]:
        """``names`` and every node reachable from them."""
        following: dict[str, list[str]] = {}
        for edge in self._edges:
            following.setdefault(edge.source, []).append(edge.target)
        out = set(names)
        frontier = list(names)
        while frontier:
            for target in following.get(frontier.pop(), []):
                if target not in out:
                    out.add(target)
                    frontier.append(target)
        return out

    def stages(self) -> list[list[str]]:
        """The execution plan: groups of nodes that can run together, in order (file order within a stage)."""
        order = [n.name for n in self.nodes]
        waiting = {name: {e.source for e in self.sources(name)} for name in order}
        done: set[str] = set()
        stages = []
        while len(done) < len(order):  # Kahn's levels; file order within a level
            stage = [name for name in order if name not in done and waiting[name] <= done]
            if not stage:
                raise DagError(f"DAG '{self.name}' has a cycle")  # parse_dag reports cycles with their path first
            stages.append(stage)
            done.update(stage)
        return stages

    def effective(self, name: str, base_dir: str | Path) -> dict[str, Any]:
        """The node's settings with the DAG's defaults applied and working_dir made absolute."""
        node = self.node(name)
        base = Path(base_dir)
        working_dir = node.working_dir or self.working_dir
        workdir = base / working_dir if working_dir else base
        return {
            "command": node.command,
            "workdir": str(Path(workdir).expanduser().absolute()),
            "gpu_count": node.gpu_count,
            "env": {**self.environment, **node.environment},
            "timeout": node.timeout if node.timeout is not None else self.timeout,
            "max_retries": node.max_retries if node.max_retries is not None else self.max_retries,
            "pool": node.pool or (self.pool if node.gpu_count > 0 else None),
        }

    def fingerprint(self, name: str, base_dir: str | Path) -> str:
        """A hash of what decides the node's result (command, folder, environment, GPUs) and its incoming
        edges: resume re-runs a node whose fingerprint changed."""
        settings = self.effective(name, base_dir)
        body = {
            "command": settings["command"],
            "workdir": settings["workdir"],
            "env": settings["env"],
            "gpu_count": settings["gpu_count"],
            "sources": sorted((e.source, e.kind, e.when or "") for e in self.sources(name)),
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def plan_text(self) -> str:
        """``cq dag validate``'s execution plan."""
        lines = [f"DAG {self.name}: {len(self.nodes)} nodes, {len(self.edges())} dependencies"]
        for number, stage in enumerate(self.stages(), 1):
            parts = []
            for name in stage:
                node = self.node(name)
                extra = []
                if node.gpu_count:
                    extra.append(f"{node.gpu_count} GPU" + ("s" if node.gpu_count > 1 else ""))
                conditions = [f"{e.source}: {e.when}" for e in self.sources(name) if e.when]
                if conditions:
                    extra.append("when " + "; ".join(conditions))
                parts.append(name + (f" ({', '.join(extra)})" if extra else ""))
            lines.append(f"  stage {number}: " + ", ".join(parts))
        return "\n".join(lines)


# -- when: conditions ---------------------------------------------------------------------------------

_COMPARISONS = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}


class Condition:
    """A ``when:`` expression over a source's final metrics: comparisons of ``metrics.KEY`` (or
    ``metrics["val/loss"]``) with numbers, joined by ``and`` / ``or`` / ``not`` and parentheses.

        >>> Condition("metrics.accuracy >= 0.9 and metrics['val/loss'] < 0.3").holds(
        ...     {"accuracy": 0.93, "val/loss": 0.2})
        (True, '')
    """

    def __init__(self, text: str):
        self.text = text
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"is not a valid expression ({exc.msg}); write e.g. \"metrics.accuracy >= 0.9\"") from None
        self._tree = tree.body
        self.keys: set[str] = set()
        self._check(self._tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self._check(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(type(op) in _COMPARISONS for op in node.ops):
                raise ValueError("compares with an operator other than < <= > >= == !=")
            for operand in [node.left, *node.comparators]:
                self._operand(operand)
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            pass
        else:
            raise ValueError(
                f"uses {ast.unparse(node)!r}, which is not a comparison; write e.g. \"metrics.accuracy >= 0.9\" "
                "(comparisons of metrics.KEY with numbers, joined by and / or / not)"
            )

    def _operand(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return self._operand(node.operand)
        key = self._metric_key(node)
        if key is None:
            raise ValueError(
                f"uses {ast.unparse(node)!r}; a condition may only use metrics.KEY, metrics['KEY'] and numbers"
            )
        self.keys.add(key)

    @staticmethod
    def _metric_key(node: ast.AST) -> str | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Subscript) and not parts:
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                parts.append(node.slice.value)
                node = node.value
        if isinstance(node, ast.Name) and node.id == "metrics" and parts:
            return ".".join(reversed(parts))
        return None

    def holds(self, metrics: Mapping[str, float]) -> tuple[bool, str]:
        """(whether it holds, why not). A metric the source never printed makes the condition false."""
        missing = sorted(k for k in self.keys if k not in metrics or metrics[k] is None or math.isnan(metrics[k]))
        if missing:
            return False, f"metric {', '.join(missing)} was never printed (no final value)"
        if self._eval(self._tree, metrics):
            return True, ""
        shown = ", ".join(f"{k}={metrics[k]:g}" for k in sorted(self.keys))
        return False, f"condition {self.text!r} is false ({shown})"

    def _eval(self, node: ast.AST, metrics: Mapping[str, float]) -> Any:
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, metrics) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, metrics)
            return {ast.Not: lambda v: not v, ast.USub: lambda v: -v, ast.UAdd: lambda v: v}[type(node.op)](value)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, metrics)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._eval(right_node, metrics)
                if not _COMPARISONS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Constant):
            return node.value
        return float(metrics[self._metric_key(node)])


# -- parsing with line numbers --------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a DAG file."""

    message: str
    line: int | None = None
    column: int | None = None
    node: str | None = None

    def render(self, source: str) -> str:
        where = source + (f":{self.line}" if self.line else "") + (f":{self.column}" if self.column else "")
        who = f"node '{self.node}': " if self.node else ""
        return f"{where}: {who}{self.message}"


class _Located:
    """Plain data from a YAML node tree, plus the line of every value by its path."""

    def __init__(self) -> None:
        self.lines: dict[tuple, tuple[int, int]] = {}
        self.key_lines: dict[tuple, tuple[int, int]] = {}
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node, path: tuple = ()) -> Any:
        self.lines[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self.build(key_node, (*path, "<key>"))
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    self.problems.append(Problem("a mapping key must be a plain name", key_node.start_mark.line + 1))
                    continue
                if key in result:
                    self.problems.append(Problem(
                        f"key '{key}' appears twice in the same mapping; keep one",
                        key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                    ))
                self.key_lines[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                result[key] = self.build(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        return yaml.SafeLoader(".").construct_object(node, deep=True)

    def line_of(self, loc: tuple, key: bool = False) -> tuple[int | None, int | None]:
        if key and loc in self.key_lines:
            return self.key_lines[loc]
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            if loc in self.key_lines:
                return self.key_lines[loc]
            loc = loc[:-1]
        return self.lines.get((), (None, None))


_FIELDS = {
    (): Dag.model_fields,
    ("nodes",): DagNode.model_fields,
    ("dependencies",): DagDependency.model_fields,
}


def parse_dag(content: str, source: str = "<dag>") -> Dag:
    """Parse and check DAG YAML text; every problem (with its line) in one :class:`DagError`."""
    problems, dag = check_dag(content)
    if problems:
        raise DagError(
            f"{source}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in DAG "
            f"'{_dag_name(content) or '?'}':\n" + "\n".join("  " + p.render(source) for p in problems),
            problems=problems,
        )
    assert dag is not None
    return dag


def load_dag(path: str | Path) -> Dag:
    """Read and check a DAG file (:func:`parse_dag`)."""
    path = Path(path)
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DagError(
            f"DAG file {path} does not exist; check the path (e.g. deployments/dags/seed-pipeline.yaml)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DagError(f"cannot read DAG file {path}: {exc}") from exc
    return parse_dag(content, str(path))


def _dag_name(content: str) -> str | None:
    match = re.search(r"^name:\s*['\"]?([^'\"\n#]+)", content, re.MULTILINE)
    return match.group(1).strip() if match else None


def check_dag(content: str) -> tuple[list[Problem], Dag | None]:
    """All problems in DAG YAML text (empty when it is good) and the DAG (None when it is not)."""
    try:
        tree = yaml.compose(content, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        reason = getattr(exc, "problem", None) or str(exc)
        context, opened = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and opened is not None and opened is not mark:
            reason += f" ({context} that starts on line {opened.line + 1}, column {opened.column + 1})"
        return [Problem(f"invalid YAML: {reason}", mark.line + 1 if mark else None,
                        mark.column + 1 if mark else None)], None
    if tree is None:
        return [Problem("the file is empty; a DAG needs at least `name:` and `nodes:`")], None
    located = _Located()
    data = located.build(tree)
    if not isinstance(data, dict):
        return [Problem("a DAG file is a mapping with `name:` and `nodes:` at the top", 1)], None
    problems = list(located.problems)
    try:
        dag = Dag.model_validate(data)
    except ValidationError as exc:
        problems += _schema_problems(exc, data, located)
        return _sorted(problems), None
    problems += _graph_problems(dag, data, located)
    return _sorted(problems), (None if problems else dag)


def _sorted(problems: list[Problem]) -> list[Problem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line or 0, p.column or 0))


def _node_name(data: dict, loc: tuple) -> str | None:
    if len(loc) >= 2 and loc[0] == "nodes" and isinstance(loc[1], int):
        nodes = data.get("nodes")
        if isinstance(nodes, list) and loc[1] < len(nodes) and isinstance(nodes[loc[1]], dict):
            name = nodes[loc[1]].get("name")
            return str(name) if name is not None else f"#{loc[1] + 1}"
    return None


def _schema_problems(exc: ValidationError, data: dict, located: _Located) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        kind = error["type"]
        node = _node_name(data, loc)
        if kind == "extra_forbidden":
            key = str(loc[-1])
            allowed = _FIELDS.get(tuple(p for p in loc[:-1] if not isinstance(p, int)), {})
            close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.45)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = "a node" if node else ("a dependency" if loc[0] == "dependencies" else "the DAG")
            message = f"unknown key '{key}' in {where}{hint} (allowed: {', '.join(allowed)})"
            line, column = located.line_of(loc, key=True)
        elif kind == "missing":
            field = str(loc[-1])
            message = f"'{field}' is required" + {
                "name": " (e.g. name: train)", "command": " (e.g. command: python train.py)",
                "nodes": " (a list of - name: ..., command: ...)", "source": " (the node that runs first)",
                "target": " (the node that waits)",
            }.get(field, "")
            line, column = located.line_of(loc[:-1])
        else:
            parts = [str(p) for p in loc if not isinstance(p, int)]
            field = ".".join(parts[1:] if node and len(parts) > 1 else parts) or "value"
            text = error["msg"].removeprefix("Value error, ")
            if kind in ("int_type", "int_parsing", "int_from_float"):
                text = f"must be a whole number, got {error.get('input')!r}"
            elif kind == "greater_than_equal" or kind == "less_than_equal" or kind == "greater_than":
                text = f"{text}, got {error.get('input')!r}"
            message = f"{field}: {text}"
            line, column = located.line_of(loc)
        problems.append(Problem(message, line, column, node))
    return problems


def _graph_problems(dag: Dag, data: dict, located: _Located) -> list[Problem]:
    problems: list[Problem] = []
    names = [n.name for n in dag.nodes]
    first_index: dict[str, int] = {}
    for index, node in enumerate(dag.nodes):
        if node.name in first_index:
            line, column = located.line_of(("nodes", index, "name"))
            first = located.line_of(("nodes", first_index[node.name], "name"))[0]
            problems.append(Problem(f"duplicate node name (first defined on line {first}); rename one",
                                    line, column, node.name))
        else:
            first_index[node.name] = index

    def missing(ref: str, what: str, loc: tuple, node: str | None) -> None:
        close = difflib.get_close_matches(ref, names, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; the nodes are: {', '.join(names)}"
        line, column = located.line_of(loc)
        problems.append(Problem(f"{what} '{ref}' is not a node{hint}", line, column, node))

    for index, node in enumerate(dag.nodes):
        for position, ref in enumerate(node.depends_on):
            loc = ("nodes", index, "depends_on", position)
            if ref == node.name:
                line, column = located.line_of(loc)
                problems.append(Problem("depends on itself; remove it from depends_on", line, column, node.name))
            elif ref not in first_index:
                missing(ref, "depends_on", loc, node.name)
    for index, dep in enumerate(dag.dependencies):
        for end in ("source", "target"):
            ref = getattr(dep, end)
            if ref not in first_index:
                missing(ref, end, ("dependencies", index, end), dep.target if end == "source" else None)
        if dep.source == dep.target:
            line, column = located.line_of(("dependencies", index))
            problems.append(Problem("depends on itself (source == target); remove this dependency",
                                    line, column, dep.source))
        if dep.when is not None:
            try:
                Condition(dep.when)
            except ValueError as exc:
                line, column = located.line_of(("dependencies", index, "when"))
                problems.append(Problem(f"when: {dep.when!r} {exc}", line, column, dep.target))
        if dep.type == "conditional" and dep.when is None:
            line, column = located.line_of(("dependencies", index, "type"))
            problems.append(Problem('a conditional dependency needs when: (e.g. when: "metrics.accuracy >= 0.9")',
                                    line, column, dep.target))
        if dep.when is not None and dep.type in ("sequential", "data_dependency"):
            line, column = located.line_of(("dependencies", index, "type"))
            problems.append(Problem(f"type {dep.type} cannot have when:; use type: conditional (or leave type out)",
                                    line, column, dep.target))
    if problems:
        return problems  # a cycle search over unknown names would only add noise
    cycle = find_cycle(names, [(e.source, e.target) for e in dag.edges()])
    if cycle:
        line, column = located.line_of(("nodes", first_index[cycle[0]], "name"))
        problems.append(Problem(
            f"dependency cycle: {' → '.join(cycle)}; remove one of these dependencies", line, column, cycle[0]
        ))
    return problems


def find_cycle(names: list[str], edges: list[tuple[str, str]]) -> list[str] | None:
    """A cycle as a path that ends where it starts (``['train', 'evaluate', 'train']``), or None."""
    following: dict[str, list[str]] = {name: [] for name in names}
    for source, target in edges:
        following.setdefault(source, []).append(target)
    colour = dict.fromkeys(following, 0)  # 0 unvisited, 1 on the path, 2 done
    for start in names:
        if colour[start]:
            continue
        path: list[str] = []
        stack = [(start, iter(following[start]))]
        colour[start] = 1
        path.append(start)
        while stack:
            current, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[current] = 2
                path.pop()
                stack.pop()
            elif colour.get(child, 0) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child, 0) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(following.get(child, []))))
    return None
