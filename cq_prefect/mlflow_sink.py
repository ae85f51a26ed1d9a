"""Where metric points go: an MLflow run, written in batches from a background thread.

The producer (the thread reading a training script's output) only appends to an in-memory queue, so it
never waits on MLflow. A writer thread drains the queue into ``log_batch`` calls of up to 1,000 entities.
When MLflow cannot be reached, every batch goes to a local spool file (JSON lines) in order, and the
thread replays the spool, oldest first, as soon as MLflow answers again; no point is dropped, and a spool
left behind by a crashed process is replayed by the next sink for the same run.

    >>> sink = MlflowSink(run_id, tracking_uri="http://127.0.0.1:5000")   # doctest: +SKIP
    >>> sink.put([MetricPoint("loss", 0.3, 0, 1700000000000)])            # doctest: +SKIP
    >>> sink.close(timeout=30)                                            # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from cq_prefect.metric_syntax import MetricPoint
from cq_prefect.niceness import deprioritize_current_thread

logger = logging.getLogger("cq.metrics")

MAX_BATCH_ENTITIES = 1000  # MLflow's log_batch limit (metrics + params + tags)
MAX_BATCH_TAGS = 100


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


class MlflowSink:
    """Writes metric points to one MLflow run from a background thread, spooling while MLflow is away.

    Args:
        run_id: the MLflow run to write to.
        tracking_uri: where MLflow is; defaults to ``MLFLOW_TRACKING_URI``.
        writer: the batch writer (injected in tests); defaults to :func:`writer_for`.
        spool_dir: where the spool file lives; defaults to ``$CQ_HOME/spool``.
        retry_interval: seconds between attempts to reach MLflow again.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        *,
        writer: BatchWriter | None = None,
        spool_dir: Path | None = None,
        retry_interval: float = 1.0,
    ):
        if writer is None:
            tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not tracking_uri:
                raise ValueError("MlflowSink needs a tracking_uri or MLFLOW_TRACKING_URI")
            writer = writer_for(tracking_uri)
        self.run_id = run_id
        self._writer = writer
        self._retry_interval = retry_interval
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._spool = _Spool(Path(spool_dir or default_spool_dir()) / f"{run_id}.jsonl")
        self._idle = threading.Condition()
        self._queued = 0  # items put and not yet written or spooled
        self._closed = False
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
        with self._idle:
            self._queued += 1
        self._queue.put((list(points), dict(tags or {})))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point put so far is in MLflow; False if the timeout came first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._queued or self._spool.pending():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(timeout=0.2 if remaining is None else min(0.2, remaining))
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. False if points are still spooled (they stay on disk)."""
        done = self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)
        return done

    @property
    def spooled(self) -> bool:
        return self._spool.pending()

    # -- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        deprioritize_current_thread()
        if self._spool.pending():
            logger.info("Replaying spooled metrics for MLflow run %s", self.run_id)
        stop = False
        while not stop:
            if self._spool.pending():
                self._replay_spool()
            try:
                first = self._queue.get(timeout=self._retry_interval if self._spool.pending() else None)
            except queue.Empty:
                continue
            items = [first]
            try:
                while len(items) < MAX_BATCH_ENTITIES:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if None in items:
                stop = True
                items = [item for item in items if item is not None]
            for points, tags in _batches(items):
                self._deliver(points, tags)
            with self._idle:
                self._queued -= len(items)
                self._idle.notify_all()
        while self._spool.pending() and self._replay_spool():  # last chance before the thread ends
            pass

    def _deliver(self, points: list[MetricPoint], tags: dict[str, str]) -> None:
        if not self._spool.pending():
            try:
                self._writer.write(self.run_id, points, tags)
                self.points_written += len(points)
                return
            except Exception as exc:  # any failure: keep the batch on disk and retry later
                self.write_failures += 1
                logger.warning(
                    "MLflow unreachable (%s); spooling metrics to %s and retrying every %.1f s",
                    _short(exc),
                    self._spool.path,
                    self._retry_interval,
                )
        self._spool.append(points, tags)

    def _replay_spool(self) -> bool:
        """Send spooled batches oldest first; True if the spool is now empty."""
        for points, tags in self._spool.read_pending():
            try:
                self._writer.write(self.run_id, points, tags)
            except Exception:
                time.sleep(self._retry_interval)
                return False
            self.points_written += len(points)
            self._spool.advance()
        self._spool.clear()
        logger.info("MLflow is back; spooled metrics for run %s replayed", self.run_id)
        with self._idle:
            self._idle.notify_all()
        return True


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


class _Spool:
    """An append-only JSON-lines file of batches plus a cursor file; survives a crash of the process."""

    def __init__(self, path: Path):
        self.path = path
        self._cursor_path = path.with_suffix(".cursor")
        self._lines_done = int(self._cursor_path.read_text()) if self._cursor_path.exists() else 0
        self._has_data = path.exists() and path.stat().st_size > 0

    def pending(self) -> bool:
        return self._has_data

    def append(self, points: list[MetricPoint], tags: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"m": [[p.key, _json_number(p.value), p.timestamp_ms, p.step] for p in points], "t": tags}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._has_data = True

    def read_pending(self):
        with self.path.open(encoding="utf-8") as fh:
            for index, line in enumerate(fh):
                if index < self._lines_done or not line.strip():
                    continue
                record = json.loads(line)
                points = [MetricPoint(k, _from_json_number(v), step, ts) for k, v, ts, step in record["m"]]
                yield points, record["t"]

    def advance(self) -> None:
        self._lines_done += 1
        self._cursor_path.write_text(str(self._lines_done))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._cursor_path.unlink(missing_ok=True)
        self._lines_done = 0
        self._has_data = False


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


def replay_spools(tracking_uri: str, spool_dir: Path | None = None, timeout: float = 30.0) -> int:
    """Replay spool files left behind by crashed processes; returns how many runs were completed."""
    spool_dir = Path(spool_dir or default_spool_dir())
    done = 0
    for path in sorted(spool_dir.glob("*.jsonl")) if spool_dir.exists() else []:
        sink = MlflowSink(path.stem, tracking_uri, spool_dir=spool_dir)
        if sink.close(timeout=timeout):
            done += 1
    return done
