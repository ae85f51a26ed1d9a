"""``cq note``, ``cq knowledge search`` and ``cq pi``: what cq knows, from the command line.

    cq note "bone loss needs a warm-up epoch" --tag pose
    cq knowledge search "bone length loss" [--limit 10] [--json] [--rebuild]
    cq pi "improve 3D pose estimation accuracy, currently MPJPE 48mm, target <25mm" [--space space.yaml] [--claude] \
          [--out ideas.yaml]

They need only MLflow: the tracking server of ``MLFLOW_TRACKING_URI`` or of the embedded stack (started when
nothing answers, as every command does). Searches read the local index (:mod:`cq_prefect.knowledge_store`),
brought up to date from MLflow first. Exit codes: 0 success (an empty knowledge base included), 2 bad input —
checked before anything is read or written — with the problem and the fix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from cq_prefect.errors import BadInput

DEFAULT_IDEAS_FILE = "pi-ideas.yaml"
RELATED = 20  # related entries `cq pi` derives directions from


def tracking_uri() -> str:
    """The MLflow tracking URI to read: the configured one when it answers, else the embedded stack's."""
    from cq_prefect.stack import StackConfig, connect, mlflow_healthy

    uri = StackConfig.from_env().endpoints().mlflow_tracking_uri
    return uri if mlflow_healthy(uri) else connect().mlflow_tracking_uri


def open_index(uri: str, *, rebuild: bool = False, quiet: bool = False):
    """The up-to-date index of ``uri`` and what its refresh did."""
    from cq_prefect.knowledge_store import KnowledgeIndex, mlflow_runs

    index = KnowledgeIndex.for_tracking_uri(uri)
    if rebuild:
        index.clear()
    if index.empty() and not quiet:
        print(f"cq: indexing the experiments and notes in MLflow ({uri}) into {index.path.parent}; this first read "
              "takes a while, later ones read only what changed", file=sys.stderr, flush=True)
    try:
        report = index.refresh(mlflow_runs(uri))
    except BaseException:
        index.close()
        raise
    return index, report


# -- cq note ------------------------------------------------------------------------------------------


def cmd_note(args) -> int:
    from cq_prefect.knowledge import NOTES_EXPERIMENT, check_note

    text, tags = check_note(args.text, args.tag or [])  # bad input: exit 2 before MLflow is touched
    uri = tracking_uri()
    from cq_prefect import tracking
    from cq_prefect.knowledge_store import write_note

    run_id = write_note(tracking.client(uri), text, tags)
    if args.json:
        print(json.dumps({"note_id": run_id, "mlflow_run_id": run_id, "experiment": NOTES_EXPERIMENT,
                          "tags": list(tags)}))
    else:
        print(f"Noted ({run_id[:8]}, MLflow experiment {NOTES_EXPERIMENT}"
              + (f", tags {', '.join(tags)}" if tags else "") + "). Find it: cq knowledge search \"…\"")
    return 0


# -- cq knowledge search ------------------------------------------------------------------------------


def _check_limit(limit: int, most: int = 1000) -> None:
    if not 1 <= limit <= most:
        raise BadInput(f"--limit {limit}: give 1 to {most} (how many results to show)")


def cmd_knowledge_search(args) -> int:
    from cq_prefect.knowledge import query_terms

    query_terms(args.query)  # bad input: exit 2 before MLflow is touched
    _check_limit(args.limit)
    index, report = open_index(tracking_uri(), rebuild=args.rebuild, quiet=args.json)
    with index:
        result = index.search(args.query, limit=args.limit)
    if args.json:
        print(json.dumps({"query": args.query, "total": result.total, "matched": result.matched,
                          "hits": [hit_json(hit) for hit in result.hits]}, allow_nan=False, default=str))
        return 0
    if not result.total:
        print("No experiments or notes recorded yet: research loops record theirs (`cq loop start`), "
              "and `cq note \"…\"` records an insight.")
        return 0
    print(f"{result.matched} of {result.total} records match \"{args.query}\""
          + (f"; the best {len(result.hits)}:" if result.matched > len(result.hits) else ":"))
    for number, hit in enumerate(result.hits, 1):
        print(hit_text(hit, number))
    return 0


def hit_json(hit) -> dict[str, Any]:
    """A hit as ``cq knowledge search --json`` prints it (NaN and ±inf as text, as everywhere in cq's JSON)."""
    e = hit.entry
    return _json_safe({
        "kind": e.kind, "score": round(hit.score, 4), "exp_id": e.exp_id, "loop": e.loop, "cycle": e.cycle,
        "hypothesis": e.hypothesis, "rationale": e.rationale, "change": dict(e.change), "outcome": e.outcome,
        "improved": e.improved, "value": e.value, "delta": e.delta, "metric": e.metric, "unit": e.unit,
        "message": e.message, "text": e.text, "tags": list(e.tags), "mlflow_run_id": e.run_id,
        "created": _date(e.start_time),
    })


def hit_text(hit, number: int) -> str:
    """A hit as lines: what it is and how it ended, the hypothesis and rationale (or the note), the change."""
    from cq_prefect.goal import format_value

    e = hit.entry
    if e.kind == "note":
        head = f"note {e.run_id[:8]} · {_date(e.start_time)}" + (f" · tags {', '.join(e.tags)}" if e.tags else "")
        return f"{number:3d}. {head}\n     {_clip(e.text, 300)}"
    where = f"loop {e.loop} · cycle {e.cycle}" if e.loop else "experiment"
    if e.value is not None:
        result = f"{e.metric or 'value'} {format_value(e.value, e.unit)}"
        if e.delta is not None:
            sign, improved = "+" if e.delta >= 0 else "", ", improved" if e.improved else ""
            result += f" (Δ {sign}{format_value(e.delta, e.unit)}{improved})"
    else:
        result = ", ".join(f"{k}={format_value(v)}" for k, v in list(e.metrics.items())[:3])
    lines = [f"{number:3d}. {e.exp_id} · {where} · {e.outcome or '?'}" + (f" · {result}" if result else "")]
    lines.append(f"     {e.hypothesis}" + (f" — {_clip(e.rationale, 200)}" if e.rationale else ""))
    if e.change:
        lines.append("     change: " + _clip(", ".join(f"{k}={v}" for k, v in e.change.items()), 200))
    if e.edited or e.branch:
        edits = f"edited {_clip(', '.join(e.edited), 150)}" if e.edited else ""
        lines.append("     " + " · ".join(p for p in (edits, f"branch {e.branch}" if e.branch else "") if p))
    if e.message and e.outcome not in ("kept", "discarded"):
        lines.append(f"     {_clip(e.message, 200)}")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    # cq_prefect.tracking.json_safe, without importing tracking (and pydantic with it) into a quick command.
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _date(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "?"


# -- cq pi --------------------------------------------------------------------------------------------


def _out_path(args) -> Path:
    path = Path(args.out or DEFAULT_IDEAS_FILE).expanduser().absolute()
    if path.is_dir():
        raise BadInput(f"--out {args.out}: that is a folder; give a file name, e.g. --out {path / DEFAULT_IDEAS_FILE}")
    if not path.parent.is_dir():
        raise BadInput(f"--out {args.out or DEFAULT_IDEAS_FILE}: the folder {path.parent} does not exist; create it "
                       f"(mkdir -p {path.parent}) or write elsewhere")
    if not os.access(path.parent, os.W_OK):
        raise BadInput(f"--out {args.out or DEFAULT_IDEAS_FILE}: the folder {path.parent} is not writable; "
                       "write elsewhere")
    if path.exists() and not args.force:
        raise BadInput(f"{path} exists; give --out NEW_FILE, or --force to replace it")
    return path


def _space(args):
    if not args.space:
        return None
    from cq_prefect.proposers.search_space import load_space

    path = Path(args.space).expanduser()
    if not path.is_file():
        raise BadInput(f"--space {args.space}: no such file; give a search-space YAML "
                       f"(name: {{type: float, low: 0.0, high: 1.0}} per parameter, see examples/pose/space.yaml)")
    return load_space(path)


def configured_brainstorm(args, space=None):
    """The brainstorm strategy of ``cq pi``: Claude's when a key is at hand (``ANTHROPIC_API_KEY``, or
    ``--credentials BLOCK``; ``--claude`` also looks for the block ``anthropic`` and insists on a key),
    None with ``--no-claude`` or without a key — then the directions are derived from the knowledge."""
    if getattr(args, "no_claude", False):
        return None
    block = getattr(args, "credentials", None)
    if not (block or os.environ.get("ANTHROPIC_API_KEY", "").strip() or getattr(args, "claude", False)):
        return None
    from cq_prefect.brainstorm import ClaudeBrainstorm
    from cq_prefect.credentials import anthropic_key

    if block or not os.environ.get("ANTHROPIC_API_KEY", "").strip():  # a block lives on the Prefect server
        from cq_prefect.stack import connect, prefect_settings

        with prefect_settings(connect()):
            key = anthropic_key(block)
    else:
        key = anthropic_key()
    return ClaudeBrainstorm(api_key=key, model=getattr(args, "model", None), effort=getattr(args, "effort", None),
                            space=space, describe=hit_text)


def related_lines(query: str, uri: str, *, limit: int = 8, exclude_loop: str | None = None) -> list[str]:
    """The experiments and notes most related to ``query`` as one line each (for Claude's prompt in a
    loop), leaving out the loop ``exclude_loop`` itself (its ledger is in the prompt already)."""
    index, _ = open_index(uri, quiet=True)
    with index:
        hits = [h for h in index.search(query, limit=limit * 3).hits if not exclude_loop or h.entry.loop != exclude_loop]
    return [" ".join(line.strip() for line in hit_text(hit, number).splitlines())
            for number, hit in enumerate(hits[:limit], 1)]


def cmd_pi(args) -> int:
    from cq_prefect import directions as directions_module
    from cq_prefect.errors import CqError
    from cq_prefect.knowledge import query_terms

    # Bad input, all of it, before MLflow is touched: exit 2 and nothing written.
    query_terms(args.text, example='cq pi "improve 3D pose accuracy, MPJPE 48mm, target <25mm"')
    _check_limit(args.limit, 50)
    space = _space(args)
    out = _out_path(args)
    brainstorm = configured_brainstorm(args, space)  # --claude without a key is bad input too
    say = (lambda *a, **k: None) if args.json else print
    say("Loading related knowledge…", flush=True)
    index, _ = open_index(tracking_uri(), quiet=args.json)
    with index:
        result = index.search(args.text, limit=max(RELATED, args.limit))
        tried = index.tried()
        loops = index.loops()
    hits = result.hits
    shown = hits[: args.limit]
    if space is None:  # the search space of the closest related loop that declared one
        space, origin = _related_space(loops, hits)
        if space is not None:
            say(f"  search space: loop {origin}'s ({', '.join(space)}); --space FILE gives another")
            if brainstorm is not None:
                brainstorm.space = space
    if not result.total:
        say("  nothing recorded yet: no experiments or notes in MLflow. Research loops record theirs "
            "(`cq loop start`); `cq note \"…\"` records an insight.")
    elif not hits:
        say(f"  none of the {result.total} recorded experiments and notes relate to this goal.")
    else:
        say(f"  {result.matched} of {result.total} records relate to it; the closest {len(shown)}:")
        for number, hit in enumerate(shown, 1):
            say(hit_text(hit, number))
    suggestions = None
    if brainstorm is not None:
        say(f"\nDirections, brainstormed by {brainstorm.name}:")
        try:
            suggestions = directions_module.directions(
                args.text, [h.entry for h in hits], tried, space, brainstorm=brainstorm, hits=hits)
        except CqError as exc:  # Claude down or confused: the knowledge still gives directions
            say(f"  {brainstorm.name} gave none ({exc}); deriving them from the knowledge instead:")
            brainstorm = None
    elif not getattr(args, "no_claude", False):
        say("\nDirections: Claude is not configured (export ANTHROPIC_API_KEY to ask it), so they are derived from "
            "the knowledge (past improvements not yet combined"
            + (", unexplored regions of the search space)" if space else ")") + ":")
    else:
        say("\nDirections, derived from the knowledge (past improvements not yet combined"
            + (", unexplored regions of the search space)" if space else ")") + ":")
    if suggestions is None:
        suggestions = directions_module.directions(args.text, [h.entry for h in hits], tried, space, hits=hits)
    for number, s in enumerate(suggestions, 1):
        say(f"{number:3d}. {s.title}\n     {_clip(s.rationale, 300)}\n     overrides: "
            + ", ".join(f"{k}={v}" for k, v in s.overrides.items()))
    written = None
    if suggestions:
        source = (f"brainstormed by {brainstorm.name}" if brainstorm is not None else "derived")
        written = _write_ideas(out, suggestions, args, result.total, loops, hits, source)
        command = _loop_command(written, suggestions, args.text, loops, hits)
        say(f"\nWrote {len(suggestions)} ideas to {written}. Run them:\n  {command}")
    else:
        improved = sum(1 for hit in hits if hit.entry.improved)
        why = ("the related improvements were already run together" if improved > 1 else
               "combining needs two related improvements" + (f" (there is {improved})" if improved else " (none yet)"))
        why += "; every choice and range of the space was tried" if space else (
            "; give the search space to explore its untried regions (`--space space.yaml`)")
        say(f"  none: {why}. No ideas file written.")
    if args.json:
        print(json.dumps({
            "goal": args.text, "total": result.total, "matched": result.matched,
            "hits": [hit_json(hit) for hit in shown], "brainstorm": brainstorm.name if brainstorm else None,
            "derived_from": brainstorm.name if brainstorm else "knowledge",
            "ideas": [{**s.idea(), "kind": s.kind, "sources": list(s.sources)} for s in suggestions],
            "out": str(written) if written else None,
        }, default=str))
    return 0


def _related_space(loops, hits):
    """(space, loop name) of the first related loop whose config declared a search space; (None, None)."""
    from cq_prefect.errors import CqError
    from cq_prefect.proposers.search_space import load_space

    for loop in _related_loops(loops, hits):
        if not loop.space:
            continue
        try:
            return load_space(json.loads(loop.space)), loop.name
        except (ValueError, CqError):  # cut at MLflow's param limit, or from an older cq: not usable
            continue
    return None, None


def _related_loops(loops, hits):
    """The loops of the hits (LoopInfo), most related first, each once."""
    by_name = {loop.name: loop for loop in loops.values()}
    return [by_name[name] for name in dict.fromkeys(hit.entry.loop for hit in hits) if name in by_name]


def _loop_command(path: Path, suggestions, goal: str, loops, hits) -> str:
    import shlex

    from cq_prefect.goal import parse_goal

    loop = next(iter(_related_loops(loops, hits)), None)
    target = parse_goal(goal)
    parts = ["cq loop start --proposer scripted --ideas", shlex.quote(str(path)), "--goal", shlex.quote(goal)]
    if target is None:  # the loop reads its target from the goal text; this one names none
        parts += ["--target", "TARGET"]
    if target is None or target.direction is None:
        parts += ["--direction", loop.direction if loop and loop.direction else "'minimize|maximize'"]
    parts += ["--metric", shlex.quote(loop.metric) if loop and loop.metric else "METRIC",
              "--budget", str(len(suggestions) + 1),
              "--workdir", shlex.quote(loop.workdir) if loop and loop.workdir else "DIR",
              "--command", shlex.quote(loop.command) if loop and loop.command else "'python train.py'"]
    return " ".join(parts)


def _write_ideas(path: Path, suggestions, args, total: int, loops, hits, source: str) -> Path:
    from cq_prefect.directions import ideas_yaml
    from cq_prefect.proposers.scripted import load_ideas

    header = [f"cq pi: {args.text}",
              f"{time.strftime('%Y-%m-%d %H:%M')}: {len(suggestions)} directions {source}, with {total} recorded "
              "experiments and notes",
              f"run: {_loop_command(path, suggestions, args.text, loops, hits)}"]
    text = ideas_yaml(suggestions, header)
    load_ideas(text)  # what the loop will read: a file it rejects is never written
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def add_parser(sub) -> None:
    """Register ``cq note``, ``cq knowledge …`` and ``cq pi`` on the ``cq`` parser's subcommands."""
    p = sub.add_parser("note", help="record an insight in MLflow (searchable with cq knowledge search)")
    p.add_argument("text", metavar="TEXT", help="the insight, e.g. 'bone loss needs a warm-up epoch'")
    p.add_argument("--tag", action="append", metavar="T", help="a label, e.g. --tag pose (repeatable)")
    p.add_argument("--json", action="store_true", help="print {note_id, mlflow_run_id, experiment, tags}")
    p.set_defaults(func=cmd_note)

    p = sub.add_parser("knowledge", help="search every experiment and note")
    knowledge_sub = p.add_subparsers(dest="knowledge_command", required=True, metavar="ACTION")
    s = knowledge_sub.add_parser("search", help="experiments and notes ranked by relevance, improvements first")
    s.add_argument("query", metavar="QUERY",
                   help="words to look for in hypotheses, rationales, changes, outcomes and notes")
    s.add_argument("--limit", type=int, default=10, help="most results to show (default 10)")
    s.add_argument("--json", action="store_true", help="print {query, total, matched, hits: [...]}")
    s.add_argument("--rebuild", action="store_true", help="read everything from MLflow again (after deleting runs)")
    s.set_defaults(func=cmd_knowledge_search)

    p = sub.add_parser("pi", help="related knowledge + directions for a goal → an ideas file for cq loop start")
    p.add_argument("text", metavar="TEXT", help="the goal, e.g. 'improve 3D pose accuracy, MPJPE 48mm, target <25mm'")
    p.add_argument("--space", metavar="FILE", help="search-space YAML: also propose its unexplored regions")
    p.add_argument("--out", metavar="FILE", help=f"ideas file to write (default ./{DEFAULT_IDEAS_FILE})")
    p.add_argument("--force", action="store_true", help="replace --out when it exists")
    p.add_argument("--limit", type=int, default=5, help="related experiments and notes to show (default 5)")
    p.add_argument("--json", action="store_true", help="print {goal, hits, ideas, out, …} only")
    claude = p.add_mutually_exclusive_group()
    claude.add_argument("--claude", action="store_true",
                        help="brainstorm with Claude (the default when ANTHROPIC_API_KEY is set); exit 2 without a key")
    claude.add_argument("--no-claude", action="store_true", help="derive the directions from the knowledge only")
    p.add_argument("--model", help="Claude model (default: a current model)")
    p.add_argument("--effort", choices=["low", "medium", "high", "xhigh", "max"],
                   help="how much effort Claude spends on the answer (default: the model's)")
    p.add_argument("--credentials", metavar="BLOCK", help="AnthropicCredentials block holding the key")
    p.set_defaults(func=cmd_pi)
