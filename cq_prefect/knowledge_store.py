"""The knowledge base's I/O: cq's runs in MLflow, a local index of them under ``CQ_HOME``, and notes.

    >>> index = KnowledgeIndex.for_tracking_uri("http://127.0.0.1:5000")      # doctest: +SKIP
    >>> index.refresh(mlflow_runs("http://127.0.0.1:5000"))                     # doctest: +SKIP
    Refresh(read=3, indexed=2, removed=0, full=False, seconds=0.05)
    >>> [h.entry.exp_id for h in index.search("bone length loss", limit=3).hits]  # doctest: +SKIP
    ['pose-mpjpe-c1-s0', 'pose-mpjpe-c4-s0']

MLflow stays the one store of record; the index is a cache that can be deleted at any time. Reading 10,000
runs through MLflow's search API takes seconds, so the index (SQLite, ``CQ_HOME/knowledge/index-<uri
hash>.sqlite``, one per tracking URI) keeps every cq experiment and note with its words' postings, and each
command brings it up to date incrementally before it searches:

- which experiments exist: those created, renamed, deleted or restored since the last refresh (MLflow's
  ``last_update_time``), so a refresh does not list every experiment;
- experiments new to the index (or restored): all their runs;
- the others: runs started since the newest one indexed, less a 10-minute margin (runs created at that moment,
  hosts whose clocks run a little behind; a clock ahead only makes the margin re-read more);
- runs not yet settled (a loop experiment without its outcome, a plain experiment still running): read again
  by id until they are, and dropped when MLflow no longer has them;
- entries of deleted experiments are dropped. A single run deleted in MLflow stays until ``--rebuild``.

The fetch happens outside any write; the writes of one refresh are one SQLite transaction (WAL mode), so
concurrent commands never see half an update, and two refreshes that race both converge (an older snapshot
written last leaves its runs unsettled, so the next refresh reads them again). A damaged or older-schema
index file is rebuilt from MLflow.

Reading MLflow goes through a one-method-per-call source (:class:`RunSource`): :class:`RestRuns` speaks
MLflow's REST API (``runs/search``, ``experiments/search``) with the standard library, because importing the
mlflow package costs seconds per command; :class:`ClientRuns` uses ``MlflowClient`` for every other
tracking URI (``sqlite:///…``, ``databricks``…). Notes are written with ``MlflowClient``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cq_prefect import knowledge
from cq_prefect.errors import StackError
from cq_prefect.knowledge import Entry, Hit, LoopInfo
from cq_prefect.paths import cq_home

SCHEMA_VERSION = "3"  # 3: code loops' edits and branches in the entries
MARGIN_MS = 10 * 60 * 1000
PAGE_SIZE = 2000
ID_CHUNK = 100  # run ids per `attributes.run_id IN (…)` filter
EXPERIMENT_CHUNK = 500  # experiment ids per search request (bound parameters: SQLite allows 999 in old builds)

# Each command refreshes and searches from a cold page cache, so what it reads should not touch every entry's
# JSON (~18 MB for 10,000): entries_experiment tells a refresh which experiments have entries, entries_length
# gives a search the count and total length (BM25's mean) without reading the rows. Lengths are sums of field
# weights, multiples of 0.5, so their total is exact in the index's order as in any other.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loops (run_id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL UNIQUE, experiment_id TEXT NOT NULL, kind TEXT NOT NULL,
    settled INTEGER NOT NULL, improved INTEGER NOT NULL, start_time INTEGER NOT NULL, length REAL NOT NULL,
    terms TEXT NOT NULL, overrides TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS entries_unsettled ON entries (settled) WHERE settled = 0;
CREATE INDEX IF NOT EXISTS entries_experiment ON entries (experiment_id);
CREATE INDEX IF NOT EXISTS entries_length ON entries (length);
CREATE TABLE IF NOT EXISTS postings (
    term TEXT NOT NULL, entry INTEGER NOT NULL, tf REAL NOT NULL, length REAL NOT NULL, boost REAL NOT NULL,
    start INTEGER NOT NULL, PRIMARY KEY (term, entry)) WITHOUT ROWID;
"""


# -- reading MLflow -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentState:
    """An MLflow experiment as the index tracks it."""

    id: str
    active: bool
    updated: int  # last_update_time, ms


def _experiment_query(updated_since: int | None) -> tuple[str, str]:
    """(view type, filter) of an experiments search."""
    if updated_since is None:
        return "ACTIVE_ONLY", ""
    return "ALL", f"last_update_time >= {int(updated_since)}"


class RunSource(Protocol):
    """Where the index reads runs from. A run is a plain mapping (see :func:`cq_prefect.knowledge.entry_from_run`)."""

    def experiments(self, updated_since: int | None = None) -> list[ExperimentState]:
        """Every active experiment; or, with ``updated_since`` (ms, the server's clock), every experiment
        created, renamed, deleted or restored since then, deleted ones included."""
        ...

    def runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> Iterator[dict[str, Any]]:
        """Every active run of those experiments that matches the MLflow filter, oldest first."""
        ...


class RestRuns:
    """MLflow's REST API over the standard library: an http(s) tracking server (``cq up``'s, or any other).

    Honours ``CQ_MLFLOW_AUTH`` and, as MLflow's client does, ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (basic), ``MLFLOW_TRACKING_TOKEN`` (bearer) and ``MLFLOW_TRACKING_INSECURE_TLS``.
    ``opener`` is the injectable transport: a function ``(urllib Request, timeout) → response`` (default
    ``urllib.request.urlopen``).
    """

    def __init__(self, uri: str, *, timeout: float = 120.0, opener=None):
        self.uri = uri.rstrip("/")
        self.timeout = timeout
        self._opener = opener

    def _post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        from cq_prefect.auth import mlflow_header

        headers = {"Content-Type": "application/json"}
        authorization = mlflow_header()
        if authorization:
            headers["Authorization"] = authorization
        request = urllib.request.Request(f"{self.uri}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            if self._opener is not None:
                response = self._opener(request, self.timeout)
            elif os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
                import ssl

                response = urllib.request.urlopen(request, timeout=self.timeout,  # noqa: S310 (the tracking URI)
                                                  context=ssl._create_unverified_context())  # noqa: S323
            else:
                response = urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 (the tracking URI)
            with response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code == 401 or (exc.code == 403 and "Permission denied" in detail):
                from cq_prefect.auth import mlflow_refused

                raise mlflow_refused(self.uri, exc.code) from exc  # names the variable to set
            raise StackError(f"MLflow at {self.uri} answered {exc.code} to {endpoint} ({detail}); check "
                             f"MLFLOW_TRACKING_URI and its credentials (`cq status` shows the stack's)") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise StackError(f"MLflow at {self.uri} does not answer ({exc}); start it with `cq up` or point "
                             f"MLFLOW_TRACKING_URI at a running server") from exc

    def experiments(self, updated_since: int | None = None) -> list[ExperimentState]:
        view, filter_string = _experiment_query(updated_since)
        found, token = [], None
        while True:
            body: dict[str, Any] = {"max_results": 1000, "view_type": view, "filter": filter_string}
            if token:
                body["page_token"] = token
            page = self._post("experiments/search", body)
            found += [ExperimentState(str(e["experiment_id"]), e.get("lifecycle_stage", "active") == "active",
                                      int(e.get("last_update_time") or e.get("creation_time") or 0))
                      for e in page.get("experiments", [])]
            token = page.get("next_page_token")
            if not token:
                return found

    def runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> Iterator[dict[str, Any]]:
        for start in range(0, len(experiment_ids), EXPERIMENT_CHUNK):
            token = None
            while True:
                body: dict[str, Any] = {
                    "experiment_ids": list(experiment_ids[start:start + EXPERIMENT_CHUNK]), "filter": filter_string,
                    "run_view_type": "ACTIVE_ONLY", "max_results": PAGE_SIZE, "order_by": ["attributes.start_time ASC"],
                }
                if token:
                    body["page_token"] = token
                page = self._post("runs/search", body)
                for run in page.get("runs", []):
                    yield _rest_run(run)
                token = page.get("next_page_token")
                if not token:
                    break


def _rest_run(run: Mapping[str, Any]) -> dict[str, Any]:
    info, data = run.get("info") or {}, run.get("data") or {}
    return {
        "run_id": info["run_id"], "experiment_id": str(info.get("experiment_id", "")),
        "run_name": info.get("run_name") or "", "status": info.get("status") or "",
        "start_time": int(info.get("start_time") or 0),
        "tags": {t["key"]: t.get("value", "") for t in data.get("tags", [])},
        "params": {p["key"]: p.get("value", "") for p in data.get("params", [])},
        "metrics": {m["key"]: float(m.get("value", "nan")) for m in data.get("metrics", [])},
    }


class ClientRuns:
    """MLflow's own client: any tracking URI (a ``sqlite:///`` file, databricks…)."""

    def __init__(self, uri_or_client: Any):
        if isinstance(uri_or_client, str):
            from mlflow.tracking import MlflowClient

            uri_or_client = MlflowClient(uri_or_client)
        self.client = uri_or_client

    def experiments(self, updated_since: int | None = None) -> list[ExperimentState]:
        from mlflow.entities import ViewType

        view, filter_string = _experiment_query(updated_since)
        found, token = [], None
        while True:
            page = self.client.search_experiments(view_type=ViewType.from_string(view.lower()), max_results=1000,
                                                  filter_string=filter_string or None, page_token=token)
            found += [ExperimentState(str(e.experiment_id), e.lifecycle_stage == "active",
                                      int(e.last_update_time or e.creation_time or 0)) for e in page]
            token = page.token
            if not token:
                return found

    def runs(self, experiment_ids: Sequence[str], filter_string: str = "") -> Iterator[dict[str, Any]]:
        from mlflow.entities import ViewType

        for start in range(0, len(experiment_ids), EXPERIMENT_CHUNK):
            token = None
            while True:
                page = self.client.search_runs(list(experiment_ids[start:start + EXPERIMENT_CHUNK]), filter_string,
                                               run_view_type=ViewType.ACTIVE_ONLY, max_results=PAGE_SIZE,
                                               order_by=["attributes.start_time ASC"], page_token=token)
                for run in page:
                    yield {
                        "run_id": run.info.run_id, "experiment_id": str(run.info.experiment_id),
                        "run_name": run.info.run_name or "", "status": run.info.status or "",
                        "start_time": int(run.info.start_time or 0), "tags": dict(run.data.tags),
                        "params": dict(run.data.params), "metrics": dict(run.data.metrics),
                    }
                token = page.token
                if not token:
                    break


def mlflow_runs(tracking_uri: str) -> RunSource:
    """The run source for a tracking URI: the REST API for http(s), MLflow's client otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return RestRuns(tracking_uri)
    return ClientRuns(tracking_uri)


# -- the index --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refresh:
    """What one refresh did: runs read from MLflow, entries indexed anew or changed, entries removed, and
    whether it read everything (the first refresh)."""

    read: int
    indexed: int
    removed: int
    full: bool
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    matched: int  # entries that contain at least one of the words
    total: int  # entries in the index


class KnowledgeIndex:
    """The local index of one tracking URI's experiments and notes (a SQLite file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError:
            # Damaged or not an index: it is only a cache of MLflow, so start it again.
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self.db = self._open()

    @classmethod
    def for_tracking_uri(cls, tracking_uri: str, home: Path | None = None) -> KnowledgeIndex:
        """The index of ``tracking_uri`` under ``CQ_HOME/knowledge``."""
        digest = hashlib.sha1(tracking_uri.rstrip("/").encode()).hexdigest()[:12]
        return cls((home or cq_home()) / "knowledge" / f"index-{digest}.sqlite")

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = None
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            version = row[0] if row else None
        if version != SCHEMA_VERSION:
            with _transaction(db):
                for table in ("meta", "loops", "entries", "postings"):
                    db.execute(f"DROP TABLE IF EXISTS {table}")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        return db

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> KnowledgeIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- state --

    def _meta(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def empty(self) -> bool:
        """Whether nothing was ever read into this index (the first refresh reads everything)."""
        return not self._meta("experiments")

    def clear(self) -> None:
        """Forget everything: the next refresh reads every run again (``--rebuild``)."""
        with _transaction(self.db):
            for table in ("loops", "entries", "postings"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("DELETE FROM meta WHERE key != 'schema'")

    # -- refreshing --

    def refresh(self, source: RunSource, now_ms: int | None = None) -> Refresh:
        """Bring the index up to date with ``source`` (see the module docstring)."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        first = not self._meta("experiments")
        known = set(json.loads(self._meta("experiments", "[]")))
        watermark = int(self._meta("watermark", "0"))
        changes_mark = int(self._meta("experiments_watermark", "0"))
        # Only the experiments that changed since the last refresh (their last_update_time, the server's clock).
        changed = source.experiments(None if first else max(0, changes_mark - MARGIN_MS))
        active_set = (known - {e.id for e in changed if not e.active}) | {e.id for e in changed if e.active}
        fresh = sorted(e for e in active_set if e not in known)
        seen = sorted(active_set & known)
        runs: dict[str, dict[str, Any]] = {}
        for run in source.runs(fresh) if fresh else ():
            runs[run["run_id"]] = run
        if seen:
            for run in source.runs(seen, f"attributes.start_time >= {max(0, watermark - MARGIN_MS)}"):
                runs[run["run_id"]] = run
        # MLflow run ids are hex: only those go into the filter text (the others stay pending).
        pending = [run_id for run_id, experiment in self.db.execute(
            "SELECT run_id, experiment_id FROM entries WHERE settled = 0")
            if experiment in active_set and run_id not in runs and run_id.isalnum()]
        gone: list[str] = []
        for start in range(0, len(pending), ID_CHUNK):
            chunk = pending[start:start + ID_CHUNK]
            quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
            found = {run["run_id"]: run for run in source.runs(seen, f"attributes.run_id IN ({quoted})")}
            runs.update(found)
            gone.extend(run_id for run_id in chunk if run_id not in found)
        newest = max((run["start_time"] for run in runs.values()), default=0)
        meta = {"experiments": json.dumps(sorted(active_set)), "watermark": str(max(watermark, min(newest, now_ms))),
                "experiments_watermark": str(max([changes_mark, *(e.updated for e in changed)]))}
        indexed, removed = self._write(runs.values(), gone, active_set, meta)
        return Refresh(read=len(runs), indexed=indexed, removed=removed, full=first,
                       seconds=time.perf_counter() - started)

    def _write(self, runs: Any, gone: Sequence[str], active: set[str], meta: Mapping[str, str]) -> tuple[int, int]:
        """One transaction: the runs read, the runs gone, entries of deleted experiments, and the new state."""
        runs = list(runs)
        indexed = removed = 0
        with _transaction(self.db):
            db = self.db
            for run in runs:
                loop = knowledge.loop_from_run(run)
                if loop is not None:
                    db.execute("INSERT OR REPLACE INTO loops VALUES (?, ?, ?)",
                               (run["run_id"], str(run.get("experiment_id", "")), loop.to_json()))
            loops = self._loops_of(runs)
            for run in runs:
                entry = knowledge.entry_from_run(run, loops)
                if entry is None:
                    removed += self._delete(run["run_id"])
                else:
                    indexed += self._upsert(entry, knowledge.settled(run))
            for run_id in gone:
                removed += self._delete(run_id)
            stale = [row for row in db.execute("SELECT DISTINCT experiment_id FROM entries") if row[0] not in active]
            for (experiment,) in stale:
                query = "SELECT run_id FROM entries WHERE experiment_id = ?"
                for (run_id,) in db.execute(query, (experiment,)).fetchall():
                    removed += self._delete(run_id)
            loop_experiments = db.execute("SELECT DISTINCT experiment_id FROM loops").fetchall()
            db.executemany("DELETE FROM loops WHERE experiment_id = ?",
                           [row for row in loop_experiments if row[0] not in active])
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
        return indexed, removed

    def _upsert(self, entry: Entry, is_settled: bool) -> bool:
        """Index an entry (again); False when it is there unchanged."""
        db = self.db
        data = entry.to_json()
        row = db.execute("SELECT id, terms, settled, data FROM entries WHERE run_id = ?", (entry.run_id,)).fetchone()
        if row is not None and row[2] == int(is_settled) and row[3] == data:
            return False  # read again (the margin, or still pending) but unchanged
        terms = knowledge.weighted_terms(entry)
        length = sum(terms.values())
        boost = knowledge.boost(entry)
        values = (entry.experiment_id, entry.kind, int(is_settled), int(entry.improved), entry.start_time, length,
                  json.dumps(sorted(terms)), json.dumps(dict(entry.overrides), sort_keys=True), data)
        if row is None:
            doc = db.execute("INSERT INTO entries (experiment_id, kind, settled, improved, start_time, length, terms, "
                             "overrides, data, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*values, entry.run_id)).lastrowid
        else:
            doc = row[0]
            db.executemany("DELETE FROM postings WHERE term = ? AND entry = ?", [(t, doc) for t in json.loads(row[1])])
            db.execute("UPDATE entries SET experiment_id = ?, kind = ?, settled = ?, improved = ?, start_time = ?, "
                       "length = ?, terms = ?, overrides = ?, data = ? WHERE id = ?", (*values, doc))
        db.executemany("INSERT INTO postings VALUES (?, ?, ?, ?, ?, ?)",
                       [(term, doc, tf, length, boost, entry.start_time) for term, tf in terms.items()])
        return True

    def _delete(self, run_id: str) -> int:
        row = self.db.execute("SELECT id, terms FROM entries WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return 0
        self.db.executemany("DELETE FROM postings WHERE term = ? AND entry = ?",
                            [(term, row[0]) for term in json.loads(row[1])])
        self.db.execute("DELETE FROM entries WHERE id = ?", (row[0],))
        return 1

    def _loops_of(self, runs: Sequence[Mapping[str, Any]]) -> dict[str, LoopInfo]:
        """The indexed loops these runs belong to, by parent run id (not all of them: a refresh of a few runs
        should not parse every loop)."""
        ledgers = sorted({(run.get("tags") or {}).get(knowledge.TAG_LEDGER) or "" for run in runs} - {""})
        found: dict[str, LoopInfo] = {}
        for start in range(0, len(ledgers), ID_CHUNK):
            chunk = ledgers[start:start + ID_CHUNK]
            found.update((run_id, LoopInfo.from_json(data)) for run_id, data in self.db.execute(
                f"SELECT run_id, data FROM loops WHERE run_id IN ({', '.join('?' * len(chunk))})", chunk))
        return found

    # -- reading --

    def loops(self) -> dict[str, LoopInfo]:
        """Every indexed loop by its parent run id."""
        return {run_id: LoopInfo.from_json(data) for run_id, data in self.db.execute("SELECT run_id, data FROM loops")}

    def search(self, query: str, limit: int = 10) -> SearchResult:
        """The entries that best match ``query`` (BadInput when it has no words to search for)."""
        terms = knowledge.query_terms(query)
        total, length = self.db.execute("SELECT count(*), total(length) FROM entries").fetchone()
        # One query per word: its rows come back as the Posting tuples, with no Python loop over them.
        postings = {term: self.db.execute("SELECT entry, tf, length, boost, start FROM postings WHERE term = ?",
                                          (term,)).fetchall() for term in terms}
        scores = knowledge.score(terms, postings, total, length / total if total else 0.0)
        starts = {doc: start for hits in postings.values() for doc, _, _, _, start in hits}
        top = knowledge.best(scores, starts, limit)
        data = dict(self.db.execute(f"SELECT id, data FROM entries WHERE id IN ({', '.join('?' * len(top))})", top)) \
            if top else {}
        return SearchResult([Hit(Entry.from_json(data[doc]), scores[doc]) for doc in top], len(scores), total)

    def tried(self) -> list[dict[str, Any]]:
        """The overrides every indexed experiment ran with (what has been tried, for ``cq pi``)."""
        return [json.loads(text) for (text,) in self.db.execute(
            "SELECT overrides FROM entries WHERE kind = 'experiment' AND overrides != '{}'")]

    def improvements(self, limit: int = 50) -> list[Entry]:
        """The newest experiments that improved their metric."""
        return [Entry.from_json(text) for (text,) in self.db.execute(
            "SELECT data FROM entries WHERE improved = 1 ORDER BY start_time DESC, id LIMIT ?", (limit,))]


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, exc, tb) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


# -- notes ------------------------------------------------------------------------------------------


def write_note(mlflow: Any, text: str, tags: Sequence[str] = ()) -> str:
    """Record an insight as a finished MLflow run in the experiment ``cq-knowledge``; returns its run id.

        >>> write_note(MlflowClient(uri), "bone loss needs a warm-up epoch", ["pose"])  # doctest: +SKIP
        '5f0c…'
    """
    from cq_prefect.tracking import experiment_id

    text, tags = knowledge.check_note(text, tags)
    first_line = text.splitlines()[0]
    run = mlflow.create_run(experiment_id(mlflow, knowledge.NOTES_EXPERIMENT),
                            run_name="note: " + (first_line[:60] + ("…" if len(first_line) > 60 else "")), tags={
        knowledge.TAG_KIND: knowledge.KIND_NOTE, knowledge.TAG_NOTE_TEXT: text,
        knowledge.TAG_NOTE_TAGS: json.dumps(list(tags)), "mlflow.note.content": text,
    })
    mlflow.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
