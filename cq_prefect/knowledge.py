"""What cq knows: every experiment and every note as a searchable :class:`Entry`, ranked by relevance.

    >>> bone = Entry(kind="experiment", run_id="r1", exp_id="pose-c1-s0", loop="pose", hypothesis="bone-length loss",
    ...              rationale="limbs drift in length", change={"bone_loss": 0.1}, outcome="kept", value=19.87,
    ...              delta=1.56, metric="mpjpe", unit="mm")
    >>> wide = Entry(kind="experiment", run_id="r2", exp_id="pose-c2-s0", loop="pose", hypothesis="wider layers",
    ...              change={"width": 2048}, outcome="discarded", value=22.1, delta=-0.7, metric="mpjpe")
    >>> note = Entry(kind="note", run_id="r3", text="bone loss needs a warm-up epoch", tags=("pose",))
    >>> [(hit.entry.run_id, round(hit.score, 3)) for hit in rank([bone, wide, note], "bone loss")]
    [('r1', 2.365), ('r3', 1.772)]

A loop's experiment is the nested MLflow run the ledger writes (``cq.loop.*`` tags, see
:mod:`cq_prefect.ledger`); a plain experiment (``cq submit``) is a run with ``cq.exp_id``; a note is a run
tagged ``cq.kind=note`` in the MLflow experiment ``cq-knowledge`` (``cq note``). :func:`entry_from_run` turns
one run — a plain mapping of ``run_id``, ``experiment_id``, ``run_name``, ``status``, ``start_time``, ``tags``,
``params``, ``metrics`` — into an entry, or None for runs that are not cq's.

Ranking is BM25 (k1 1.2, b 0.75, idf ``ln(1 + (N − df + ½) / (df + ½))``, which stays positive in small
knowledge bases) over the words of each entry, counted with field weights — hypothesis 3, change (overrides
and the paths a code edit changed) and notes 2, rationale 1.5, outcome 1, the new text of code edits 1, the
rest (loop name and goal, metric, exp id, command) 0.5 — and multiplied by a
boost: 1.5 for an experiment that improved its metric (kept, positive delta), 1.3 for a note, 1.1 for other
kept ones, 0.9 for pruned or pending ones, 0.8 for crashed or metric-less ones. Ties go to the newer entry.
The same :func:`score` ranks an in-memory list (:func:`rank`) and the index under ``CQ_HOME``
(:mod:`cq_prefect.knowledge_store`). Nothing here imports MLflow, Prefect or pydantic: it is pure and quick.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cq_prefect.errors import BadInput

# The ledger's and tracking's tag names (cq_prefect.ledger / cq_prefect.tracking), repeated so that searching
# imports neither (they pull in pydantic: +0.5 s per command); tests/test_knowledge.py checks they match.
TAG_KIND = "cq.kind"
TAG_LOOP = "cq.loop.name"
TAG_LEDGER = "cq.loop.ledger"
TAG_CYCLE = "cq.loop.cycle"
TAG_HYPOTHESIS = "cq.loop.hypothesis"
TAG_RATIONALE = "cq.loop.rationale"
TAG_CHANGE = "cq.loop.change"
TAG_OVERRIDES = "cq.loop.overrides"
TAG_OUTCOME = "cq.loop.outcome"
TAG_VALUE = "cq.loop.value"
TAG_DELTA = "cq.loop.delta"
TAG_MESSAGE = "cq.loop.message"
TAG_BRANCH = "cq.loop.branch"  # code loops: the experiment's branch and its edits ([{path, old, new}] as JSON)
TAG_EDITS = "cq.loop.edits"
TAG_EXP_ID = "cq.exp_id"
TAG_RUN_OUTCOME = "cq.outcome"
TAG_COMMAND = "cq.command"
UNIT_TAG_PREFIX = "cq.unit."
# Notes (cq note).
NOTES_EXPERIMENT = "cq-knowledge"
KIND_NOTE = "note"
KIND_LOOP = "loop"
TAG_NOTE_TEXT = "cq.note.text"
TAG_NOTE_TAGS = "cq.note.tags"
NOTE_MAX_CHARS = 5000
_NOTE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/+=-]{0,63}")

FIELD_WEIGHTS: Mapping[str, float] = {
    "hypothesis": 3.0, "change": 2.0, "note": 2.0, "tags": 2.0, "rationale": 1.5, "outcome": 1.0, "code": 1.0,
    "context": 0.5,
}
CODE_MAX_CHARS = 2000  # of a code edit's new text, searched
BOOST_IMPROVED = 1.5
BOOST_NOTE = 1.3
OUTCOME_BOOSTS: Mapping[str, float] = {
    "kept": 1.1, "discarded": 1.0, "success": 1.0, "pruned": 0.9, "running": 0.9, "cancelled": 0.9,
    "crashed": 0.8, "no_metric": 0.8, "failed": 0.8, "timeout": 0.8,
}
K1 = 1.2
B = 0.75
SETTLED_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})


@dataclass(frozen=True)
class LoopInfo:
    """What an experiment's loop says about it: from the loop's parent run (its config params)."""

    run_id: str
    name: str
    metric: str | None = None
    direction: str | None = None
    unit: str | None = None
    goal: str = ""
    workdir: str | None = None
    command: str | None = None
    space: str | None = None  # the search space it declared (its proposer's, or its Claude fallback's), as JSON

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoopInfo:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Entry:
    """One experiment or note, as the knowledge base holds and shows it."""

    kind: str  # "experiment" | "note"
    run_id: str
    experiment_id: str = ""
    start_time: int = 0  # ms since the epoch
    exp_id: str | None = None
    loop: str | None = None
    cycle: int | None = None
    hypothesis: str = ""
    rationale: str = ""
    change: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    outcome: str | None = None
    value: float | None = None
    delta: float | None = None
    metric: str | None = None
    unit: str | None = None
    direction: str | None = None
    message: str | None = None
    context: str = ""  # loop goal, command…: searched with a low weight
    metrics: Mapping[str, float] = field(default_factory=dict)  # plain experiments: final values
    text: str = ""  # notes
    tags: tuple[str, ...] = ()
    edited: tuple[str, ...] = ()  # code loops: the files the hypothesis edited
    code: str = ""  # … the new text of its edits (capped at CODE_MAX_CHARS)
    branch: str | None = None  # … and the branch it ran on, cq/<loop>/<exp-id>

    @property
    def improved(self) -> bool:
        """An experiment the loop kept because it beat the best before it."""
        return self.kind == "experiment" and self.outcome == "kept" and self.delta is not None and self.delta > 0

    @property
    def title(self) -> str:
        if self.kind == KIND_NOTE:
            return self.text.splitlines()[0] if self.text else ""
        return self.hypothesis

    def fields(self) -> dict[str, str]:
        """The entry's searchable text per field (see FIELD_WEIGHTS)."""
        change = " ".join([*(f"{key} {value}" for key, value in self.change.items()), *self.edited])
        outcome = " ".join(p for p in (self.outcome or "", "improved" if self.improved else "", self.message or "")
                           if p)
        context = " ".join(p for p in (self.loop or "", self.exp_id or "", self.metric or "", self.context) if p)
        return {"hypothesis": self.hypothesis, "change": change, "note": self.text, "tags": " ".join(self.tags),
                "rationale": self.rationale, "outcome": outcome, "code": self.code, "context": context}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        data = json.loads(text)
        data["tags"] = tuple(data.get("tags") or ())
        data["edited"] = tuple(data.get("edited") or ())
        return cls(**data)


@dataclass(frozen=True)
class Hit:
    """An entry that matched a query, with its score (relevance × boost)."""

    entry: Entry
    score: float


# -- words ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")
STOPWORDS = frozenset(
    "a an and are as at be been but by for from had has have if in into is it its of on or so than that the "
    "then there these this those to was were which while will with".split()
)


def tokenize(text: str) -> list[str]:
    """The words of ``text`` as the index counts them: lower case, split at anything but letters and digits
    (``bone_loss_weight`` → bone, loss, weight; ``0.05`` stays one word), common English words dropped,
    plurals made singular.

        >>> tokenize("Bone-length losses for 3D poses, lr=0.05")
        ['bone', 'length', 'loss', '3d', 'pose', 'lr', '0.05']
    """
    return [_singular(word) for word in _TOKEN.findall(text.lower()) if word not in STOPWORDS]


def _singular(word: str) -> str:
    # Plurals only: stemming harder (occlusion → occlud) merges words a researcher keeps apart.
    if not word.isalpha() or len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def weighted_terms(entry: Entry) -> dict[str, float]:
    """Each word of the entry with its field-weighted count (the BM25 term frequency)."""
    counts: dict[str, float] = {}
    for name, text in entry.fields().items():
        weight = FIELD_WEIGHTS[name]
        for word in tokenize(text):
            counts[word] = counts.get(word, 0.0) + weight
    return counts


def boost(entry: Entry) -> float:
    """How much an entry's relevance is multiplied by: improvements and notes first, failures last."""
    if entry.kind == KIND_NOTE:
        return BOOST_NOTE
    if entry.improved:
        return BOOST_IMPROVED
    return OUTCOME_BOOSTS.get(entry.outcome or "", 1.0)


# -- ranking ----------------------------------------------------------------------------------------

Posting = tuple[int, float, float, float, int]
"""One entry containing a word: (document, weighted count, document length, boost, start time)."""


def query_terms(query: str, example: str = 'cq knowledge search "bone length loss"') -> list[str]:
    """The distinct words of a query, in a fixed order; BadInput when it has none to search for."""
    terms = sorted(set(tokenize(query or "")))
    if not terms:
        raise BadInput(f"nothing to search for in {query!r}; give words, e.g. {example}")
    return terms


def score(terms: Sequence[str], postings: Mapping[str, Sequence[Posting]], documents: int,
          average_length: float) -> dict[int, float]:
    """BM25 × boost of every document that contains at least one of ``terms``.

    ``postings[term]`` lists the documents containing ``term``; ``documents`` is how many there are in all
    and ``average_length`` their mean (weighted) length.
    """
    scores: dict[int, float] = {}
    boosts: dict[int, float] = {}
    average_length = average_length or 1.0
    for term in terms:
        hits = postings.get(term) or ()
        if not hits:
            continue
        idf = math.log(1.0 + (documents - len(hits) + 0.5) / (len(hits) + 0.5))
        for doc, tf, length, doc_boost, _ in hits:
            norm = tf + K1 * (1.0 - B + B * length / average_length)
            scores[doc] = scores.get(doc, 0.0) + idf * tf * (K1 + 1.0) / norm
            boosts[doc] = doc_boost
    return {doc: value * boosts[doc] for doc, value in scores.items()}


def best(scores: Mapping[int, float], starts: Mapping[int, int], limit: int) -> list[int]:
    """The ``limit`` best documents: highest score, then the newest, then the lowest id (deterministic)."""
    if limit <= 0 or not scores:
        return []
    # The cut-off score first (a C-speed pass), then the full ordering of the few documents above it.
    cutoff = round(heapq.nlargest(limit, scores.values())[-1], 9)
    # A score more than 1e-9 below the cut-off cannot round up to it: only the rest are rounded.
    near = [doc for doc, value in scores.items() if value >= cutoff - 1e-9 and round(value, 9) >= cutoff]
    return sorted(near, key=lambda doc: (-round(scores[doc], 9), -starts.get(doc, 0), doc))[:limit]


def postings_of(entries: Sequence[Entry]) -> tuple[dict[str, list[Posting]], float]:
    """The postings of a list of entries (document = position in the list) and their mean length."""
    postings: dict[str, list[Posting]] = {}
    total = 0.0
    for doc, entry in enumerate(entries):
        terms = weighted_terms(entry)
        length = sum(terms.values())
        total += length
        entry_boost = boost(entry)
        for term, tf in terms.items():
            postings.setdefault(term, []).append((doc, tf, length, entry_boost, entry.start_time))
    return postings, total / len(entries) if entries else 0.0


def rank(entries: Sequence[Entry], query: str, limit: int = 10) -> list[Hit]:
    """The entries that match ``query``, best first (at most ``limit``).

        >>> rank([Entry(kind="note", run_id="n1", text="cosine schedule helps")], "cosine")[0].entry.run_id
        'n1'
    """
    terms = query_terms(query)
    postings, average = postings_of(entries)
    scores = score(terms, postings, len(entries), average)
    starts = {doc: entries[doc].start_time for doc in scores}
    return [Hit(entries[doc], scores[doc]) for doc in best(scores, starts, limit)]


# -- from MLflow runs -------------------------------------------------------------------------------


def loop_from_run(run: Mapping[str, Any]) -> LoopInfo | None:
    """A loop's parent run (``cq.kind=loop``) as LoopInfo; None for other runs."""
    tags, params = run.get("tags") or {}, run.get("params") or {}
    if tags.get(TAG_KIND) != KIND_LOOP:
        return None
    return LoopInfo(
        run_id=run["run_id"], name=tags.get(TAG_LOOP) or params.get("name") or run.get("run_name") or run["run_id"],
        metric=params.get("metric") or None, direction=params.get("direction") or None,
        unit=params.get("unit") or None, goal=params.get("goal") or tags.get("mlflow.note.content") or "",
        workdir=params.get("experiment.workdir") or None, command=params.get("experiment.command") or None,
        space=params.get("proposer.space") or params.get("proposer.fallback.space") or None,
    )


def entry_from_run(run: Mapping[str, Any], loops: Mapping[str, LoopInfo] | None = None) -> Entry | None:
    """The entry of an MLflow run (a plain mapping, see the module docstring); None when it is not a cq
    experiment or note. ``loops`` maps parent run ids to their LoopInfo (metric, unit, goal)."""
    tags = run.get("tags") or {}
    common = {"run_id": run["run_id"], "experiment_id": str(run.get("experiment_id") or ""),
              "start_time": int(run.get("start_time") or 0)}
    kind = tags.get(TAG_KIND)
    if kind == KIND_NOTE:
        text = tags.get(TAG_NOTE_TEXT) or tags.get("mlflow.note.content") or ""
        return Entry(kind=KIND_NOTE, text=text, tags=tuple(_json(tags.get(TAG_NOTE_TAGS), [])), **common)
    if kind == KIND_LOOP:
        return None
    if TAG_CYCLE in tags:
        loop = (loops or {}).get(tags.get(TAG_LEDGER) or "")
        metric = loop.metric if loop else None
        return Entry(
            kind="experiment", exp_id=tags.get(TAG_EXP_ID) or run.get("run_name") or run["run_id"],
            loop=tags.get(TAG_LOOP) or (loop.name if loop else None), cycle=_int(tags.get(TAG_CYCLE)),
            hypothesis=tags.get(TAG_HYPOTHESIS) or "", rationale=tags.get(TAG_RATIONALE) or "",
            change=_json(tags.get(TAG_CHANGE), {}), overrides=_json(tags.get(TAG_OVERRIDES), {}),
            outcome=tags.get(TAG_OUTCOME) or "running", value=_float(tags.get(TAG_VALUE)),
            delta=_float(tags.get(TAG_DELTA)), metric=metric,
            unit=(tags.get(UNIT_TAG_PREFIX + metric) if metric else None) or (loop.unit if loop else None),
            direction=loop.direction if loop else None, message=tags.get(TAG_MESSAGE) or None,
            context=loop.goal if loop else "", branch=tags.get(TAG_BRANCH) or None, **_edits(tags.get(TAG_EDITS)),
            **common,
        )
    if TAG_EXP_ID in tags:
        params = run.get("params") or {}
        metrics = run.get("metrics") or {}
        return Entry(
            kind="experiment", exp_id=tags[TAG_EXP_ID], hypothesis=run.get("run_name") or tags[TAG_EXP_ID],
            change={key: parse_scalar(value) for key, value in sorted(params.items())},
            overrides={key: parse_scalar(value) for key, value in sorted(params.items())},
            outcome=tags.get(TAG_RUN_OUTCOME) or str(run.get("status") or "").lower() or None,
            context=tags.get(TAG_COMMAND) or "",
            metrics={key: metrics[key] for key in sorted(metrics)[:12]}, **common,
        )
    return None


def _edits(text: str | None) -> dict[str, Any]:
    """``edited`` and ``code`` of an entry from the ``cq.loop.edits`` tag (the ledger's: the edits as JSON, or
    only their paths when they did not fit a tag)."""
    items = _json(text, [])
    if not isinstance(items, list):
        return {}
    paths = [str(i["path"]) for i in items if isinstance(i, Mapping) and i.get("path")]
    code = "\n".join(str(i.get("new") or "") for i in items if isinstance(i, Mapping))
    return {"edited": tuple(dict.fromkeys(paths)), "code": code[:CODE_MAX_CHARS]}


def settled(run: Mapping[str, Any]) -> bool:
    """Whether a run's record can no longer change: a note or loop, a loop experiment with its outcome, a plain
    experiment that ended. Unsettled runs are read again at every refresh of the index."""
    tags = run.get("tags") or {}
    if tags.get(TAG_KIND) in (KIND_NOTE, KIND_LOOP):
        return True
    if TAG_CYCLE in tags:
        return (tags.get(TAG_OUTCOME) or "running") != "running"
    return str(run.get("status") or "") in SETTLED_STATUSES


def parse_scalar(text: Any) -> Any:
    """An MLflow param (always text) as the value it stands for: int, float, bool or text.

        >>> parse_scalar("3"), parse_scalar("0.1"), parse_scalar("true"), parse_scalar("relu")
        (3, 0.1, True, 'relu')
    """
    if not isinstance(text, str):
        return text
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            value = convert(text)
        except ValueError:
            continue
        return value if not isinstance(value, float) or math.isfinite(value) else text
    return text


def same_value(a: Any, b: Any) -> bool:
    """Whether two override values are the same setting (``1`` and ``1.0`` are; ``True`` and ``1`` are not)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def check_note(text: str, tags: Iterable[str] = ()) -> tuple[str, tuple[str, ...]]:
    """A note's text and tags, checked: BadInput naming the problem and the fix.

        >>> check_note("  cosine beats step decay ", ["pose", "pose", "lr"])
        ('cosine beats step decay', ('pose', 'lr'))
    """
    text = (text or "").strip()
    if not tokenize(text):
        raise BadInput('the note is empty; write the insight, e.g. '
                       'cq note "bone loss needs a warm-up epoch" --tag pose')
    if len(text) > NOTE_MAX_CHARS:
        raise BadInput(f"the note is {len(text)} characters long; keep it to {NOTE_MAX_CHARS} "
                       "(link a document for more)")
    kept: list[str] = []
    for tag in tags:
        if not _NOTE_TAG.fullmatch(tag or ""):
            raise BadInput(f"--tag {tag!r} is not a tag; use letters, digits and _ . : / + = - (at most 64), "
                           "e.g. --tag pose")
        if tag not in kept:
            kept.append(tag)
    return text, tuple(kept)


def _json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        value = json.loads(text)
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None
