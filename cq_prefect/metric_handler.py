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
            if run_id is None:
                from cq_prefect.tracking import ensure_flow_run_mlflow_run

                run_id, created = ensure_flow_run_mlflow_run(
                    tracking_uri, key, getattr(record, "flow_run_name", None), getattr(record, "flow_name", None)
                )
                if created:
                    self._created_runs.append((tracking_uri, run_id))
            self._routes[key] = (MetricParser(), MlflowSink(run_id, tracking_uri))
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
