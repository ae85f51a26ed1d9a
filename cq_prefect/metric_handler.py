"""A ``logging.Handler`` that turns ``@key=value`` in log messages into metric points.

One printed line's path to MLflow: the experiment flow reads the line from the process pipe → logs it
(coalesced with its neighbours) on the run logger → this handler parses every line of the record's
message (:mod:`cq_prefect.metric_syntax`) → hands the points to a sink (:class:`~cq_prefect.mlflow_sink.MlflowSink`),
whose background thread calls MLflow's ``log_batch``.

Two ways to use it:

- with a sink, for one run (what the experiment flow does)::

      handler = MetricLogHandler(sink=MlflowSink(run_id))
      logging.getLogger("prefect.flow_runs").addHandler(handler)

- from logging configuration, with no arguments: each record is routed by its Prefect ``flow_run_id`` to
  an MLflow run tagged ``cq.prefect.flow_run_id`` (found, or created in experiment ``CQ_MLFLOW_EXPERIMENT``,
  default ``cq``), or to ``MLFLOW_RUN_ID`` when that is set. So a plain Python flow with ``log_prints=True``
  that prints ``@loss=0.3`` gets metrics too; see ``deployments/logging.yml``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from cq_prefect.metric_syntax import BadToken, MetricParser
from cq_prefect.mlflow_sink import MetricSink, MlflowSink

BAD_TOKEN_WARNING = (
    'Ignored metric token "{text}": a metric is @KEY=NUMBER[unit] with KEY like [A-Za-z_][A-Za-z0-9_./-]* '
    "(the line is logged as text; further bad tokens for key '{key}' are counted silently)"
)


class MetricLogHandler(logging.Handler):
    """Parse every record's message (multi-line included) and send ``@key=value`` points to a sink.

    Args:
        sink: where points go. Without one, records are routed per Prefect flow run (see module doc).
        on_bad_token: called with a message once per key that breaks the syntax; default: a warning on
            the record's own logger.
        tracking_uri: MLflow tracking URI for routed mode (default ``MLFLOW_TRACKING_URI``).
        flush_timeout: seconds :meth:`close` waits for routed sinks to reach MLflow.
    """

    def __init__(
        self,
        sink: MetricSink | None = None,
        level: int | str = logging.NOTSET,
        *,
        on_bad_token: Callable[[str], None] | None = None,
        tracking_uri: str | None = None,
        flush_timeout: float = 60.0,
    ):
        super().__init__(level)
        self.sink = sink
        self.parser = MetricParser()
        self._on_bad_token = on_bad_token
        self._tracking_uri = tracking_uri
        self._flush_timeout = flush_timeout
        self._routes: dict[str, tuple[MetricParser, MetricSink]] = {}
        self._created_runs: list[tuple[str, str]] = []  # (tracking uri, run id) this handler opened

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if "@" not in message:
                return
            route = self._route(record)
            if route is None:
                return
            parser, sink = route
            parsed = parser.parse_text(message, int(record.created * 1000))
            tags = {f"cq.unit.{key}": unit for key, unit in parsed.new_units.items()}
            if parsed.points or tags:
                sink.put(parsed.points, tags)
            for bad in parsed.new_bad_tokens:
                self._warn(bad, record)
        except Exception:
            self.handleError(record)

    def _route(self, record: logging.LogRecord) -> tuple[MetricParser, MetricSink] | None:
        if self.sink is not None:
            return self.parser, self.sink
        run_id = os.environ.get("MLFLOW_RUN_ID")
        key = run_id or getattr(record, "flow_run_id", None)
        if not key:
            return None
        key = str(key)
        if key not in self._routes:
            tracking_uri = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            if not tracking_uri:
                return None
            if run_id is not None:
                sink: MetricSink = MlflowSink(run_id, tracking_uri)
            else:
                names = (getattr(record, "flow_run_name", None), getattr(record, "flow_name", None))
                sink = _FlowRunSink(tracking_uri, key, *names, on_created=self._created_runs.append)
            self._routes[key] = (MetricParser(), sink)
        return self._routes[key]

    def _warn(self, bad: BadToken, record: logging.LogRecord) -> None:
        message = BAD_TOKEN_WARNING.format(text=bad.text[:200], key=bad.key[:100])
        if self._on_bad_token is not None:
            self._on_bad_token(message)
            return
        extra = {name: getattr(record, name) for name in ("flow_run_id", "flow_run_name", "flow_name") if hasattr(record, name)}
        logging.getLogger(record.name).warning(message, extra=extra)

    def flush(self) -> None:
        for _, sink in list(self._routes.values()):
            sink.flush(timeout=0)

    def close(self) -> None:
        """Flush routed sinks into MLflow and end the MLflow runs this handler created."""
        for _, sink in list(self._routes.values()):
            sink.close(timeout=self._flush_timeout)
        self._routes.clear()
        for tracking_uri, run_id in self._created_runs:
            try:
                from cq_prefect.tracking import client

                client(tracking_uri).set_terminated(run_id, status="FINISHED")
            except Exception:  # at interpreter exit MLflow may be gone; the points are spooled
                pass
        self._created_runs.clear()
        super().close()


class _FlowRunSink:
    """A sink for a flow run whose MLflow run is found or created in the background.

    Finding the run is a network call; the logging call that first mentions a flow run must not wait on
    it (MLflow may be away), so points queue here until the run is known, then flow to an MlflowSink.
    """

    def __init__(self, tracking_uri, flow_run_id, flow_run_name, flow_name, on_created, retry_interval=2.0):
        self._args = (tracking_uri, flow_run_id, flow_run_name, flow_name)
        self._on_created = on_created
        self._retry_interval = retry_interval
        self._pending: list = []
        self._lock = threading.Lock()
        self._sink: MlflowSink | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._resolve, name="cq-flow-run-sink", daemon=True).start()

    def _resolve(self) -> None:
        from cq_prefect.tracking import ensure_flow_run_mlflow_run

        tracking_uri = self._args[0]
        while True:
            try:
                run_id, created = ensure_flow_run_mlflow_run(*self._args)
                break
            except Exception:
                time.sleep(self._retry_interval)
        if created:
            self._on_created((tracking_uri, run_id))
        sink = MlflowSink(run_id, tracking_uri)
        with self._lock:
            for points, tags in self._pending:
                sink.put(points, tags)
            self._pending.clear()
            self._sink = sink
        self._ready.set()

    def put(self, points, tags=None) -> None:
        with self._lock:
            if self._sink is None:
                self._pending.append((list(points), dict(tags or {})))
                return
        self._sink.put(points, tags)

    def _when_ready(self, timeout, action) -> bool:
        started = time.monotonic()
        if not self._ready.wait(timeout):
            return False
        return action(None if timeout is None else max(0.0, timeout - (time.monotonic() - started)))

    def flush(self, timeout=None) -> bool:
        return self._when_ready(timeout, lambda rest: self._sink.flush(rest))

    def close(self, timeout=None) -> bool:
        return self._when_ready(timeout, lambda rest: self._sink.close(rest))


def install(logger_names: tuple[str, ...] = ("prefect.flow_runs", "prefect.task_runs")) -> MetricLogHandler:
    """Attach one routed :class:`MetricLogHandler` to Prefect's run loggers (idempotent).

    Call it at the top of a flow script; afterwards ``print("@loss=0.3")`` in a flow with
    ``log_prints=True`` (or ``get_run_logger().info("@loss=0.3")``) becomes an MLflow metric.
    """
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, MetricLogHandler):
                return handler
    handler = MetricLogHandler()
    for name in logger_names:
        logging.getLogger(name).addHandler(handler)
    return handler
