"""Where metric points go: an MLflow run, written in batches from a background thread, journaled first.

The producer (the thread reading a training script's output) appends each item of points to the run's
journal, a local JSON-lines file (``$CQ_HOME/spool/RUN_ID.jsonl``: one ``write`` to the page cache, no
fsync), and to an in-memory queue, so it never waits on MLflow. A writer thread drains the queue into
``log_batch`` calls of up to 1,000 entities and moves a cursor (``RUN_ID.cursor``, a byte offset) past
what MLflow took. So whatever the process had parsed is on disk when it dies, even by SIGKILL with MLflow
lagging behind; a process that ends normally removes its journal.

When MLflow cannot be reached, the thread stops taking from the queue (its items are in the journal) and
sends from the journal instead, oldest first, every ``retry_interval`` seconds (fsyncing the journal, so
a long outage also survives a power cut); no point is dropped. A live sink holds an exclusive lock on its
journal; a journal nobody holds was left by a process that died, and :func:`replay_spools` (each new
experiment on the host, the crash reaper) or the next sink for the same run sends what it holds. MLflow
drops exact duplicate points, so a batch sent twice (the process died before it moved the cursor) is
harmless.

    >>> sink = MlflowSink(run_id, tracking_uri="http://127.0.0.1:5000")   # doctest: +SKIP
    >>> sink.put([MetricPoint("loss", 0.3, 0, 1700000000000)])            # doctest: +SKIP
    >>> sink.close(timeout=30)                                            # doctest: +SKIP
    True
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from cq_prefect.errors import CqError
from cq_prefect.metric_syntax import MetricPoint
from cq_prefect.niceness import deprioritize_current_thread

logger = logging.getLogger("cq.metrics")

MAX_BATCH_ENTITIES = 1000  # MLflow's log_batch limit (metrics + params + tags)
MAX_BATCH_TAGS = 100
JOURNAL_ROTATE_BYTES = 64 * 1024 * 1024  # a journal that MLflow has caught up with is emptied past this size
READ_CHUNK_BYTES = 1 << 20


class SpoolBusy(CqError):
    """Another live sink (in this or another process) holds the journal of this MLflow run."""


class MetricSink(Protocol):
    """Anything that accepts metric points and run tags; :class:`MlflowSink` is the real one."""

    def put(self, points: Sequence[MetricPoint], tags: Mapping[str, str] | None = None) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self, timeout: float | None = None) -> bool: ...


class BatchWriter(Protocol):
    """Writes one batch to a run; raises on any failure (the sink then spools and retries)."""

    def write(self, run_id: str, points: Sequence[MetricPoint], tags: Mapping[str, str]) -> None: ...


class RestBatchWriter:
    """``log_batch`` over MLflow's REST API, with no retries of its own and a short timeout.

    MLflow's client retries a failed request for minutes; the sink has its own retry (with a spool), so
    this writer fails fast and lets the sink decide.
    """

    def __init__(self, tracking_uri: str, timeout: float = 10.0):
        from mlflow.utils.credentials import get_default_host_creds

        self._creds = get_default_host_creds(tracking_uri.rstrip("/"))
        self._timeout = timeout

    def write(self, run_id: str, points: Sequence[MetricPoint], tags: Mapping[str, str]) -> None:
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = {
            "run_id": run_id,
            "metrics": [
                {"key": p.key, "value": _json_number(p.value), "timestamp": p.timestamp_ms, "step": p.step}
                for p in points
            ],
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        endpoint = "/api/2.0/mlflow/runs/log-batch"
        response = http_request(
            self._creds,
            endpoint,
            "POST",
            json=body,
            max_retries=0,
            backoff_factor=0,
            timeout=self._timeout,
        )
        verify_rest_response(response, endpoint)


class ClientBatchWriter:
    """``MlflowClient.log_batch`` for tracking URIs that are not HTTP (e.g. ``sqlite:////abs/path.db``)."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri)

    def write(self, run_id: str, points: Sequence[MetricPoint], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points]
        self._client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])


def writer_for(tracking_uri: str) -> BatchWriter:
    """The fast writer for a tracking URI: REST for http(s), the MLflow client otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        return RestBatchWriter(tracking_uri)
    return ClientBatchWriter(tracking_uri)


def default_spool_dir() -> Path:
    from cq_prefect.paths import cq_home

    return cq_home() / "spool"


# One item of points and tags, the journal generation it was written in, and the byte offset where it
# ends there; generation UNJOURNALED (the journal could not be written, e.g. a full disk): its size.
_Item = tuple[list[MetricPoint], dict[str, str], int, int]
UNJOURNALED = -1


class MlflowSink:
    """Writes metric points to one MLflow run from a background thread; every point is journaled first.

    Args:
        run_id: the MLflow run to write to.
        tracking_uri: where MLflow is; defaults to ``MLFLOW_TRACKING_URI``.
        writer: the batch writer (injected in tests); defaults to :func:`writer_for`.
        spool_dir: where the journal lives; defaults to ``$CQ_HOME/spool``.
        retry_interval: seconds between attempts to reach MLflow again.

    The journal is ``RUN_ID.jsonl``; when another live sink holds it (two processes of one flow run log
    metrics), this sink journals to ``RUN_ID.PID-XXXXXXXX.jsonl`` instead. When the journal cannot be
    written (no spool folder, a full disk), points still go to MLflow, kept in memory only (with a warning).
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        writer: BatchWriter | None = None,
        spool_dir: Path | None = None,
        retry_interval: float = 1.0,
        _journal: _Journal | None = None,
    ):
        if writer is None:
            tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not tracking_uri:
                raise ValueError("MlflowSink needs a tracking_uri or MLFLOW_TRACKING_URI")
        self.run_id = run_id
        self._journal = _journal or _journal_for(Path(spool_dir or default_spool_dir()), run_id)
        try:
            self._writer = writer or writer_for(tracking_uri)
        except BaseException:
            self._journal.close(remove=False)
            raise
        self._retry_interval = retry_interval
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # journal appends and queue puts happen in the same order
        self._progress = threading.Condition()
        # Bytes of journal owed to MLflow (a dead process's leftovers count too) and bytes it has taken.
        self._owed = self._journal.backlog()
        self._sent = 0
        self._from_journal = self._owed > 0  # sending from the journal instead of the queue
        self._stranded: list[_Item] = []  # unjournaled items MLflow did not take yet
        self._journal_broken = False
        self._closed = False
        self._stopping = threading.Event()
        self.points_written = 0
        self.write_failures = 0
        self._thread = threading.Thread(target=self._run, name=f"cq-mlflow-sink-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- producer side: never blocks on MLflow ------------------------------------------------------
    def put(self, points: Sequence[MetricPoint], tags: Mapping[str, str] | None = None) -> None:
        if not points and not tags:
            return
        if self._closed:
            raise RuntimeError("MlflowSink is closed")
        points, tags = list(points), dict(tags or {})
        with self._lock:
            try:
                generation, start, end = self._journal.append(points, tags)
            except OSError as exc:
                if not self._journal_broken:
                    self._journal_broken = True
                    logger.warning(
                        "Cannot write the metrics journal %s (%s): points go to MLflow but would not survive "
                        "a crash of this process", self._journal.path, exc,
                    )
                generation, start, end = UNJOURNALED, 0, 1
            self._owed += end - start
            self._queue.put((points, tags, generation, end))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point put so far is in MLflow; False if the timeout came first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._owed
        with self._progress:
            while self._sent < target:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._progress.wait(timeout=0.2 if remaining is None else min(0.2, remaining))
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. False if points are still only in the journal (they stay on disk)."""
        self.flush(timeout)
        self._closed = True
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        with self._lock:
            done = self._sent >= self._owed
            self._journal.close(remove=done)
        return done

    @property
    def spooled(self) -> bool:
        """Whether points wait in the journal because MLflow was away (or a dead process left them)."""
        return self._from_journal

    # -- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        deprioritize_current_thread()
        if self._from_journal:
            logger.info("Replaying spooled metrics for MLflow run %s", self.run_id)
        while True:
            try:
                if self._from_journal:
                    if self._send_from_journal():
                        continue
                    if self._stopping.is_set():
                        return  # closing while MLflow is away: the journal keeps the rest
                    self._journal.sync()
                    self._stopping.wait(self._retry_interval)
                    continue
                try:
                    first = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._stopping.is_set():
                        return
                    continue
                items = [first]
                try:
                    while len(items) < MAX_BATCH_ENTITIES:
                        items.append(self._queue.get_nowait())
                except queue.Empty:
                    pass
                closing = any(item is None for item in items)  # close()'s wake-up: no 0.5 s wait for it
                items = [item for item in items if item is not None]
                if items and not self._send(items):
                    self._stranded += [item for item in items if item[2] == UNJOURNALED]
                    self._from_journal = True
                elif closing and self._stopping.is_set():
                    return
            except _JournalClosed:
                return
            except Exception:  # a bug must not stop the thread: flush() would wait for nothing
                logger.exception("Unexpected error in the metrics thread of MLflow run %s", self.run_id)
                self._stopping.wait(self._retry_interval)

    def _send(self, items: list[_Item]) -> bool:
        """Send items (journaled ones MLflow already has are skipped); True when MLflow took them all."""
        generation, delivered = self._journal.position()
        items = [item for item in items if item[2] == UNJOURNALED or (item[2] == generation and item[3] > delivered)]
        if not items:
            return True
        for points, tags in _batches([(points, tags) for points, tags, _, _ in items]):
            try:
                self._writer.write(self.run_id, points, tags)
            except Exception as exc:  # any failure: the items stay in the journal, sent again later
                self.write_failures += 1
                if self.write_failures == 1 or not self._from_journal:
                    logger.warning(
                        "MLflow unreachable (%s); metrics wait in %s, retried every %.1f s",
                        _short(exc), self._journal.path, self._retry_interval,
                    )
                return False
            self.points_written += len(points)
        journaled = [item for item in items if item[2] != UNJOURNALED]
        self._advance(generation, journaled[-1][3] if journaled else 0, len(items) - len(journaled))
        return True

    def _send_from_journal(self) -> bool:
        """Send what the journal holds beyond the cursor, oldest first (then unjournaled items kept in
        memory); True once MLflow has it all."""
        while True:
            while True:  # journaled items of the queue are sent from the journal: drop them from memory
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[2] == UNJOURNALED:
                    self._stranded.append(item)
            with self._lock:
                generation, delivered = self._journal.position()
                end = self._journal.appended
            if delivered >= end:
                break
            group: list[_Item] = []
            size = 0
            for points, tags, record_end in self._journal.read(delivered, end):
                group.append((points, tags, generation, record_end))
                size += len(points) + len(tags)
                if size >= MAX_BATCH_ENTITIES:
                    if not self._send(group):
                        return False
                    group, size = [], 0
            if group and not self._send(group):
                return False
            self._advance(generation, end, 0)  # past unreadable records too (read logs them)
        for start in range(0, len(self._stranded), MAX_BATCH_ENTITIES):
            if not self._send(self._stranded[start : start + MAX_BATCH_ENTITIES]):
                del self._stranded[:start]
                return False
        self._stranded.clear()
        self._from_journal = False
        logger.info("MLflow is back; spooled metrics for run %s replayed", self.run_id)
        return True

    def _advance(self, generation: int, offset: int, unjournaled: int) -> None:
        with self._lock:
            moved = self._journal.advance(generation, offset) + unjournaled
            if self._sent + moved >= self._owed:
                self._journal.rotate_if_large()
        with self._progress:
            self._sent += moved
            self._progress.notify_all()


def _batches(items: list[tuple[list[MetricPoint], dict[str, str]]]):
    """Regroup queued items into log_batch-sized batches, keeping their order."""
    points: list[MetricPoint] = []
    tags: dict[str, str] = {}
    for item_points, item_tags in items:
        if len(tags) + len(item_tags) > MAX_BATCH_TAGS:
            yield points, tags
            points, tags = [], {}
        tags.update(item_tags)
        points.extend(item_points)
        while len(points) + len(tags) >= MAX_BATCH_ENTITIES:
            room = MAX_BATCH_ENTITIES - len(tags)
            yield points[:room], tags
            points, tags = points[room:], {}
    if points or tags:
        yield points, tags


class _JournalClosed(Exception):
    pass


class _Journal:
    """A run's append-only JSON-lines file of items plus a byte-offset cursor file, locked while in use.

    One line per item (:func:`_encode`). Appends are plain
    ``write`` calls (they survive the death of the process; :meth:`sync` makes them survive the machine's).
    The cursor says how far MLflow has taken the file. Every method is safe to call from two threads.
    """

    def __init__(self, path: Path, lock_timeout: float = 0.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._cursor_path = path.with_suffix(".cursor")
        self._mutex = threading.Lock()
        self._fd = _open_locked(path, lock_timeout)
        self._cursor_fd = os.open(self._cursor_path, os.O_RDWR | os.O_CREAT, 0o644)
        self.generation = 0
        self.appended = self._trim_torn_record()
        try:
            self.delivered = min(int(os.pread(self._cursor_fd, 64, 0).strip() or 0), self.appended)
        except ValueError:
            self.delivered = 0

    def _trim_torn_record(self) -> int:
        """Cut a last line that a kill left without its newline, so the next append starts a fresh line."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0
        tail_start = max(0, size - READ_CHUNK_BYTES)
        tail = os.pread(self._fd, size - tail_start, tail_start)
        if tail.endswith(b"\n"):
            return size
        cut = tail.rfind(b"\n")
        if cut < 0 and tail_start > 0:
            # a torn record longer than one chunk: scan back to its start
            offset = tail_start
            while offset > 0 and cut < 0:
                start = max(0, offset - READ_CHUNK_BYTES)
                cut = os.pread(self._fd, offset - start, start).rfind(b"\n")
                if cut >= 0:
                    cut += start - tail_start
                offset = start
        keep = tail_start + cut + 1 if cut >= 0 else 0
        os.ftruncate(self._fd, keep)
        return keep

    def _check(self) -> None:
        if self._fd < 0:
            raise _JournalClosed

    def backlog(self) -> int:
        with self._mutex:
            return self.appended - self.delivered

    def position(self) -> tuple[int, int]:
        with self._mutex:
            self._check()
            return self.generation, self.delivered

    def append(self, points: list[MetricPoint], tags: dict[str, str]) -> tuple[int, int, int]:
        """Write one item; returns (generation, start offset, end offset)."""
        data = _encode(points, tags)
        with self._mutex:
            self._check()
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):  # no half record: the next append starts a fresh line
                    os.ftruncate(self._fd, self.appended)
                raise
            start = self.appended
            self.appended += len(data)
            return self.generation, start, self.appended

    def read(self, start: int, end: int) -> Iterator[tuple[list[MetricPoint], dict[str, str], int]]:
        """Items between byte offsets ``start`` and ``end`` as (points, tags, end offset of the item)."""
        offset = start
        pending = b""
        while offset < end:
            with self._mutex:
                self._check()
                chunk = os.pread(self._fd, min(READ_CHUNK_BYTES, end - offset), offset)
            if not chunk:
                return
            offset += len(chunk)
            data = pending + chunk
            lines = data.split(b"\n")
            pending = lines.pop()
            position = offset - len(data)
            for line in lines:
                position += len(line) + 1
                try:
                    points, tags = _decode(line)
                except (ValueError, KeyError, TypeError, IndexError):
                    logger.warning("Skipping an unreadable record in %s at byte %d", self.path, position)
                    continue
                yield points, tags, position

    def advance(self, generation: int, offset: int) -> int:
        """Move the cursor to ``offset`` (MLflow has everything before it); returns how many bytes it moved."""
        with self._mutex:
            self._check()
            if generation != self.generation or offset <= self.delivered:
                return 0
            moved = offset - self.delivered
            self.delivered = offset
            os.pwrite(self._cursor_fd, f"{offset:<20d}".encode(), 0)
            return moved

    def rotate_if_large(self) -> None:
        """Empty a journal that MLflow has fully taken once it passes JOURNAL_ROTATE_BYTES."""
        with self._mutex:
            if self._fd < 0 or self.delivered != self.appended or self.appended < JOURNAL_ROTATE_BYTES:
                return
            # Cursor first: dying between the two steps resends old items (duplicates), never skips new ones.
            os.pwrite(self._cursor_fd, f"{0:<20d}".encode(), 0)
            os.ftruncate(self._fd, 0)
            self.appended = self.delivered = 0
            self.generation += 1

    def sync(self) -> None:
        with self._mutex:
            self._check()
            os.fsync(self._fd)
            os.fsync(self._cursor_fd)

    def close(self, remove: bool) -> None:
        """Release the journal; ``remove`` deletes it (MLflow has it all), still under the lock."""
        with self._mutex:
            if self._fd < 0:
                return
            if remove:
                self.path.unlink(missing_ok=True)
                self._cursor_path.unlink(missing_ok=True)
            else:
                os.fsync(self._fd)
                os.fsync(self._cursor_fd)
            os.close(self._cursor_fd)
            os.close(self._fd)  # releases the lock
            self._fd = self._cursor_fd = -1


def _encode(points: list[MetricPoint], tags: dict[str, str]) -> bytes:
    """One journal line: ``{"k": keys, "n": N, "b": base64 columns, "t": tags}``.

    The columns (key index u32, value f64, step i64, timestamp i64, in this machine's byte order: a
    journal never leaves its host) cost a fraction of a microsecond per point, some five times less than
    JSON numbers, whose float formatting would dominate: the journal is written for every point.
    """
    keys: dict[str, int] = {}
    try:
        columns = (
            array("I", [keys.setdefault(p.key, len(keys)) for p in points]).tobytes()
            + array("d", [p.value for p in points]).tobytes()
            + array("q", [p.step for p in points]).tobytes()
            + array("q", [p.timestamp_ms for p in points]).tobytes()
        )
    except OverflowError:  # a step beyond 64 bits (MLflow will refuse it, but the journal keeps it)
        record = {"p": [[p.key, _json_number(p.value), p.step, p.timestamp_ms] for p in points], "t": tags}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()
    # Base64 needs no JSON escaping: the line is assembled around it rather than scanned by json.dumps.
    head = json.dumps({"k": list(keys), "n": len(points), "t": tags}, separators=(",", ":"))
    return head[:-1].encode() + b',"b":"' + base64.b64encode(columns) + b'"}\n'


def _decode(line: bytes) -> tuple[list[MetricPoint], dict[str, str]]:
    record = json.loads(line)
    if "p" in record:
        return [MetricPoint(k, _from_json_number(v), step, ts) for k, v, step, ts in record["p"]], record["t"]
    if "m" in record:  # a spool written by cq-prefect 0.1.0
        return [MetricPoint(k, _from_json_number(v), step, ts) for k, v, ts, step in record["m"]], record["t"]
    n, keys, raw = record["n"], record["k"], base64.b64decode(record["b"])
    columns = []
    for code, size, start in (("I", 4, 0), ("d", 8, 4 * n), ("q", 8, 12 * n), ("q", 8, 20 * n)):
        column = array(code)
        column.frombytes(raw[start : start + size * n])
        columns.append(column)
    if len(raw) != 28 * n or any(len(column) != n for column in columns):
        raise ValueError("columns of the wrong length")
    return [MetricPoint(keys[i], v, step, ts) for i, v, step, ts in zip(*columns)], record["t"]


def _journal_for(spool_dir: Path, run_id: str) -> _Journal | _NoJournal:
    try:
        try:
            return _Journal(spool_dir / f"{run_id}.jsonl")
        except SpoolBusy:  # another live sink writes this run: journal beside it
            return _Journal(spool_dir / f"{run_id}.{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl")
    except OSError as exc:
        logger.warning(
            "Cannot open a metrics journal in %s (%s): points go to MLflow but would not survive a crash of "
            "this process", spool_dir, exc,
        )
        return _NoJournal(spool_dir / f"{run_id}.jsonl")


class _NoJournal:
    """Stands in for a journal that cannot be opened: every append fails, so items stay in memory."""

    generation = 0
    appended = 0

    def __init__(self, path: Path):
        self.path = path

    def append(self, points, tags):
        raise OSError(f"no journal at {self.path}")

    def backlog(self) -> int:
        return 0

    def position(self) -> tuple[int, int]:
        return 0, 0

    def read(self, start, end):
        return iter(())

    def advance(self, generation: int, offset: int) -> int:
        return 0

    def rotate_if_large(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self, remove: bool) -> None:
        pass


def _open_locked(path: Path, timeout: float) -> int:
    """Open ``path`` for appending with an exclusive lock (:class:`SpoolBusy` after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise SpoolBusy(
                    f"{path} is in use by a live process that writes the same MLflow run; "
                    "wait for it to end (or stop it) before replaying the run's metrics"
                ) from None
            time.sleep(0.05)
            continue
        try:  # the previous holder may have removed the file just before we got the lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _json_number(value: float) -> float | str:
    # Protobuf's JSON mapping (which MLflow's server parses) spells non-finite doubles as strings.
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def _from_json_number(value: float | str) -> float:
    return float(value) if not isinstance(value, str) else float(value.replace("Infinity", "inf"))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 200 else text[:200] + "…"


def journal_paths(run_id: str, spool_dir: Path | None = None) -> list[Path]:
    """The journals of MLflow run ``run_id`` on this host (live or left by dead processes)."""
    spool_dir = Path(spool_dir or default_spool_dir())
    if not spool_dir.is_dir():
        return []
    paths = [spool_dir / f"{run_id}.jsonl", *sorted(spool_dir.glob(f"{run_id}.*.jsonl"))]
    return [path for path in paths if path.exists()]


def replay_spool(run_id: str, tracking_uri: str, spool_dir: Path | None = None, timeout: float = 30.0) -> bool | None:
    """Send what dead processes left in the journals of MLflow run ``run_id`` on this host.

    True when MLflow has everything (or there was nothing), False when MLflow did not take it all within
    ``timeout`` (the rest stays on disk), None when a live process still holds one of the run's journals.
    """
    outcome: bool | None = True
    for path in journal_paths(run_id, spool_dir):
        try:
            journal = _Journal(path)
        except SpoolBusy:
            outcome = outcome and None
            continue
        if not MlflowSink(run_id, tracking_uri, _journal=journal).close(timeout=timeout):
            outcome = False
    return outcome


def replay_spools(tracking_uri: str, spool_dir: Path | None = None, timeout: float = 30.0) -> int:
    """Replay journals left behind by dead processes (live ones are skipped); returns how many runs are done."""
    spool_dir = Path(spool_dir or default_spool_dir())
    run_ids = sorted({path.name.split(".")[0] for path in spool_dir.glob("*.jsonl")}) if spool_dir.is_dir() else []
    return sum(1 for run_id in run_ids if replay_spool(run_id, tracking_uri, spool_dir, timeout))
