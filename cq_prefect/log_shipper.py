"""Output lines to the Prefect run log, durably: kept while the Prefect API is away, sent in order.

Prefect's own ``APILogHandler`` posts batches from a background worker and drops a batch the server does
not take. An experiment's output is its record, so its lines take this path instead:

- :class:`LogShipperHandler` (a ``logging.Handler``) turns a record into a ``LogCreate`` payload and hands
  it to :class:`LogShipper`, which only appends it to a list: the thread reading the training script's
  pipe never waits on the server;
- the shipper's thread posts batches with ``create_logs``, oldest first. When the server does not answer
  it keeps the batch and tries again every ``retry_interval`` seconds; records arriving meanwhile wait in
  memory, and past ``memory_limit`` bytes they go to a spool file (``$CQ_HOME/spool/logs/FLOW_RUN_ID-….jsonl``,
  one per shipper, locked while it lives), which is sent before anything newer;
- :meth:`LogShipper.close` waits (bounded) until the server has taken everything; what it has not taken by
  then stays in the spool, and the next experiment on this host sends it (:func:`replay_log_spools`).

    >>> shipper = LogShipper(flow_run_id)                                  # doctest: +SKIP
    >>> logging.getLogger("cq.output.x").addHandler(LogShipperHandler(shipper))   # doctest: +SKIP
    >>> shipper.close(timeout=60)                                          # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from cq_prefect.niceness import deprioritize_current_thread

logger = logging.getLogger("cq.logs")

MEMORY_LIMIT_BYTES = 8 * 1024 * 1024  # records kept in memory while the server is away, then spooled
MAX_BATCH_BYTES = 2 * 1024 * 1024  # one create_logs request (Prefect's own batches stay under 4 MB)
MAX_BATCH_RECORDS = 1000
MAX_MESSAGE_CHARS = 1_000_000  # Prefect's PREFECT_LOGGING_TO_API_MAX_LOG_SIZE default
REQUEST_TIMEOUT = 10.0  # one attempt; the shipper, not the HTTP client, decides when to try again
RETRYABLE_STATUS = {408, 429}  # 4xx worth retrying; every other 4xx means the batch itself is refused


class LogWriter(Protocol):
    """Posts one batch of ``LogCreate`` payloads; raises on any failure (the shipper keeps and retries)."""

    def write(self, logs: Sequence[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class PrefectLogWriter:
    """``create_logs`` through Prefect's client, one attempt per call (the client's own retries are off).

    The client is made on first use, in the shipper's thread, from the Prefect settings of the process.
    """

    def __init__(self, timeout: float = REQUEST_TIMEOUT):
        self._timeout = timeout
        self._client = None

    def write(self, logs: Sequence[dict[str, Any]]) -> None:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        # Prefect's client waits 2, 4, 8 … s between its own retries; the shipper retries every second
        # instead, so the run log catches up as soon as the server is back.
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
            if self._client is None:
                self._client = get_client(httpx_settings={"timeout": self._timeout}, sync_client=True)
                self._client.__enter__()
            self._client.create_logs(list(logs))

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.__exit__(None, None, None)
            self._client = None


def log_payload(record: logging.LogRecord, message: str, flow_run_id: str,
                task_run_id: str | None = None) -> dict[str, Any]:
    """A record as the JSON ``LogCreate`` payload the Prefect API takes."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 20] + "... [truncated]"
    return {
        "name": record.name,
        "level": record.levelno,
        "message": message,
        "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
        "flow_run_id": flow_run_id,
        "task_run_id": task_run_id,
    }


class LogShipperHandler(logging.Handler):
    """A ``logging.Handler`` that hands every record to a :class:`LogShipper` (never blocks on the API)."""

    def __init__(self, shipper: LogShipper, level: int | str = logging.NOTSET):
        super().__init__(level)
        self.shipper = shipper

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.shipper.put(log_payload(record, self.format(record), self.shipper.flow_run_id,
                                         self.shipper.task_run_id))
        except Exception:
            self.handleError(record)


def default_spool_dir() -> Path:
    from cq_prefect.paths import cq_home

    return cq_home() / "spool" / "logs"


class LogShipper:
    """Sends one flow run's log records to the Prefect API in order, keeping them while it is away.

    Args:
        flow_run_id: the flow run the records belong to (also names the spool file).
        task_run_id: the task run within it, for records of a task (a DAG's CPU node).
        writer: posts a batch (injected in tests); default :class:`PrefectLogWriter`.
        spool_dir: where the spool lives; default ``$CQ_HOME/spool/logs``.
        retry_interval: seconds between attempts while the server does not answer.
        memory_limit: bytes of records kept in memory before they go to the spool.
    """

    def __init__(
        self,
        flow_run_id: str,
        *,
        task_run_id: str | None = None,
        writer: LogWriter | None = None,
        spool_dir: Path | None = None,
        retry_interval: float = 1.0,
        memory_limit: int = MEMORY_LIMIT_BYTES,
        _adopt: tuple[Path, Any] | None = None,
    ):
        self.flow_run_id = str(flow_run_id)
        self.task_run_id = None if task_run_id is None else str(task_run_id)
        self._writer = writer or PrefectLogWriter()
        self._retry_interval = retry_interval
        self._memory_limit = memory_limit
        if _adopt is None:  # a spool of its own: no other shipper ever writes or sends it
            name = f"{self.flow_run_id}-{os.getpid()}-{time.time_ns()}.jsonl"
            path = Path(spool_dir or default_spool_dir()) / name
            self._lock_file = _lock(path.with_suffix(".lock"))
        else:  # a spool an ended process left behind, whose lock the caller holds
            path, self._lock_file = _adopt
        self._spool = _LogSpool(path)
        self._cond = threading.Condition()
        self._incoming: list[dict[str, Any]] = []  # producer → thread, under _cond
        self._pending: deque[tuple[dict[str, Any], int]] = deque()  # the thread's: (record, size), oldest first
        self._pending_bytes = 0
        self._idle = not self._spool.pending()  # nothing incoming, pending or spooled (read under _cond)
        self._stopping = False
        self._closed = False
        self._away_since: float | None = None
        self._spool_failed = False
        self.records_sent = 0
        self.records_dropped = 0
        self.write_failures = 0
        self._thread = threading.Thread(target=self._run, name=f"cq-log-shipper-{self.flow_run_id[:8]}", daemon=True)
        self._thread.start()

    # -- producer side: never blocks on the server -------------------------------------------------
    def put(self, log: dict[str, Any]) -> None:
        """Queue one ``LogCreate`` payload (see :func:`log_payload`)."""
        if self._closed:
            raise RuntimeError("LogShipper is closed")
        with self._cond:
            self._incoming.append(log)
            self._idle = False
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the server has taken every record put so far; False if the timeout came first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._idle and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(timeout=remaining)
            return self._idle

    def close(self, timeout: float | None = None) -> bool:
        """Flush (bounded), then stop; what the server has not taken stays in the spool. True if all sent."""
        if self._closed:
            return self._idle
        done = self.flush(timeout)
        self._closed = True
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=REQUEST_TIMEOUT + 5)
        self._writer.close()
        if not done:
            logger.warning(
                "The Prefect API did not take every output line of flow run %s in time; the rest is in %s and "
                "is sent by the next experiment on this host",
                self.flow_run_id,
                self._spool.path,
            )
        _unlock(self._lock_file, None if self._spool.pending() else self._spool.path.with_suffix(".lock"))
        return done

    @property
    def spooled(self) -> bool:
        return self._spool.pending()

    # -- the shipping thread ------------------------------------------------------------------------
    def _run(self) -> None:
        deprioritize_current_thread()  # the run log may lag; the training script may not
        try:
            self._ship()
        except Exception:  # a bug here must not hang the experiment's end: flush() sees the thread gone
            logger.exception("The log shipper of flow run %s stopped", self.flow_run_id)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _ship(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._pending or self._spool.pending() or self._stopping):
                    self._idle = True
                    self._cond.notify_all()
                    self._cond.wait()
                incoming, self._incoming = self._incoming, []
                stopping = self._stopping
            for log in incoming:
                size = len(log["message"]) + 200
                self._pending.append((log, size))
                self._pending_bytes += size
            if stopping:  # close() gave up waiting: keep the rest on disk for the next experiment here
                self._spill()
                return
            if self._pending_bytes > self._memory_limit:
                self._spill()
            if not self._send_next():  # the server is away: wait (new lines do not wake us; close() does)
                deadline = time.monotonic() + self._retry_interval
                with self._cond:
                    while not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                        self._cond.wait(remaining)

    def _send_next(self) -> bool:
        """Send the oldest batch (spool first, then memory); False if the server did not take it."""
        from_spool = self._spool.pending()
        batch = self._spool.peek() if from_spool else self._oldest_batch()
        if batch and not self._write(batch):
            return False
        if from_spool:
            self._spool.advance()
        else:
            for _ in batch:
                self._pending_bytes -= self._pending.popleft()[1]
        with self._cond:
            self._cond.notify_all()
        return True

    def _write(self, batch: list[dict[str, Any]]) -> bool:
        """True when the batch is done with: taken, or refused for good (then dropped, with a warning)."""
        try:
            self._writer.write(batch)
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is not None and 400 <= status < 500 and status not in RETRYABLE_STATUS:
                self.records_dropped += len(batch)
                logger.warning("The Prefect API refused %d log records (%s); they are dropped", len(batch), _short(exc))
                return True
            self.write_failures += 1
            if self._away_since is None:
                self._away_since = time.monotonic()
                logger.warning(
                    "The Prefect API does not take output lines of flow run %s (%s); keeping them and retrying "
                    "every %.1f s",
                    self.flow_run_id,
                    _short(exc),
                    self._retry_interval,
                )
            return False
        self.records_sent += len(batch)
        if self._away_since is not None:
            logger.info(
                "The Prefect API takes output lines again after %.0f s; sending the ones kept meanwhile",
                time.monotonic() - self._away_since,
            )
            self._away_since = None
        return True

    def _oldest_batch(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        size = 0
        for log, log_size in self._pending:
            if batch and (len(batch) >= MAX_BATCH_RECORDS or size + log_size > MAX_BATCH_BYTES):
                break
            batch.append(log)
            size += log_size
        return batch

    def _spill(self) -> None:
        """Move the records held in memory to the end of the spool, in order (memory keeps them if it can't)."""
        while self._pending:
            batch = self._oldest_batch()
            try:
                self._spool.append(batch)
            except OSError as exc:
                if not self._spool_failed:
                    self._spool_failed = True
                    logger.warning("Cannot write the log spool %s (%s); keeping lines in memory", self._spool.path, exc)
                return
            for _ in batch:
                self._pending_bytes -= self._pending.popleft()[1]


class _LogSpool:
    """Batches as JSON lines plus a byte-offset cursor file; only the shipping thread touches it."""

    def __init__(self, path: Path):
        self.path = path
        self._cursor_path = path.with_suffix(".cursor")
        try:
            self._offset = int(self._cursor_path.read_text())
        except (OSError, ValueError):
            self._offset = 0
        self._size = path.stat().st_size if path.exists() else 0
        self._next_line: bytes | None = None

    def pending(self) -> bool:
        return self._offset < self._size

    def append(self, batch: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"logs": batch}) + "\n").encode()
        with self.path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._size += len(line)

    def peek(self) -> list[dict[str, Any]]:
        """The oldest batch not yet sent."""
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            self._next_line = fh.readline()
        try:
            return json.loads(self._next_line)["logs"]
        except (ValueError, KeyError):  # a line cut short by a crash: nothing to send
            return []

    def advance(self) -> None:
        self._offset += len(self._next_line or b"")
        self._next_line = None
        if self._offset >= self._size:
            self.path.unlink(missing_ok=True)
            self._cursor_path.unlink(missing_ok=True)
            self._offset = self._size = 0
        else:
            self._cursor_path.write_text(str(self._offset))


def _lock(path: Path):
    """An exclusive lock on ``path`` (None if another process holds it): marks a spool as in use."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError:
        return None  # no spool folder: lines wait in memory only
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _unlock(handle, remove: Path | None) -> None:
    if handle is None:
        return
    if remove is not None:
        remove.unlink(missing_ok=True)  # still under the lock, so no replayer is reading the spool
    handle.close()


def replay_log_spools(spool_dir: Path | None = None, timeout: float = 10.0, writer: LogWriter | None = None) -> int:
    """Send spools that ended processes left behind (not those of live shippers); returns how many were emptied."""
    spool_dir = Path(spool_dir or default_spool_dir())
    done = 0
    for path in sorted(spool_dir.glob("*.jsonl")) if spool_dir.exists() else []:
        lock = _lock(path.with_suffix(".lock"))
        if lock is None:
            continue  # a live shipper (or another replayer) owns it
        if not path.exists():  # sent by the replayer that held the lock before us
            _unlock(lock, path.with_suffix(".lock"))
            continue
        shipper = LogShipper(path.stem, _adopt=(path, lock), **({"writer": writer} if writer else {}))
        if shipper.close(timeout=timeout):
            done += 1
    return done


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 200 else text[:200] + "…"
