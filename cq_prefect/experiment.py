"""The ``experiment`` flow: run one shell command as one Prefect flow run and one MLflow run.

Follow a printed line: :class:`~cq_prefect.command.CommandRun` reads it from the pipe →
:class:`OutputLog` coalesces it with its neighbours into one log record on the run's output logger →
that logger's handlers send it to :class:`~cq_prefect.log_shipper.LogShipper` (→ the Prefect run log, kept
and retried while the server is away) and to
:class:`~cq_prefect.metric_handler.MetricLogHandler`, which parses ``@key=value`` into points for
:class:`~cq_prefect.mlflow_sink.MlflowSink` → MLflow ``log_batch``.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import CancelledRun

from cq_prefect.command import CommandRun
from cq_prefect.crash import heartbeats
from cq_prefect.errors import CqError, ExperimentFailed, ExperimentTimedOut, SpecError
from cq_prefect.log_shipper import LogShipper, LogShipperHandler, replay_log_spools
from cq_prefect.metric_handler import MetricLogHandler
from cq_prefect.metric_syntax import MetricSummarizer
from cq_prefect.mlflow_sink import MlflowSink, replay_spools
from cq_prefect.niceness import deprioritize_current_thread
from cq_prefect import prestart, tracking
from cq_prefect.paths import cq_home
from cq_prefect.spec import ExperimentResult, ExperimentSpec, MetricStats

COALESCE_SECONDS = 0.2  # one log record per this many seconds of output at most…
COALESCE_MAX_LINES = 2000  # …or per this many lines
COALESCE_MAX_BYTES = 512 * 1024  # …or bytes (Prefect refuses single logs over 1 MB)
TAIL_LINES = 20
STARTED_AT_CLAIM = "; the command started as the worker claimed the run"


class OutputLog:
    """Collects output lines and logs them in batches, so a chatty script cannot flood the Prefect API.

    Also keeps the last lines (for failure messages) and a full copy on disk (the run's ``output.log``).
    """

    def __init__(self, logger: logging.Logger, extra: dict[str, str], path: Path):
        self._logger = logger
        self._extra = extra
        self._lines: list[str] = []
        self._bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.line_count = 0
        self.path = path
        self._file = path.open("w", encoding="utf-8", errors="replace")
        self._thread = threading.Thread(target=self._run, name="cq-output-log", daemon=True)
        self._thread.start()

    def add(self, stream: str, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._bytes += len(line) + 1
            self.tail.append(line)
            self.line_count += 1
            full = len(self._lines) >= COALESCE_MAX_LINES or self._bytes >= COALESCE_MAX_BYTES
        if full:
            self._wake.set()

    def _run(self) -> None:
        deprioritize_current_thread()  # parsing and log shipping may lag; the pipe readers may not
        while not self._closed:
            self._wake.wait(COALESCE_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._lines, self._bytes = self._lines, [], 0
        if lines:
            text = "\n".join(lines)
            self._file.write(text + "\n")
            self._logger.info(text, extra=self._extra)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()
        self._file.close()


class SummarizingSink:
    """Passes points on to a sink and summarises them as they pass, so the flow needs no MLflow read."""

    def __init__(self, sink: MlflowSink):
        self.sink = sink
        self.summarizer = MetricSummarizer()

    def put(self, points, tags=None) -> None:
        self.summarizer.add(points)
        self.sink.put(points, tags)

    def flush(self, timeout=None) -> bool:
        return self.sink.flush(timeout)

    def close(self, timeout=None) -> bool:
        return self.sink.close(timeout)


def _flow_run_url(flow_run_id: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    base = PREFECT_UI_URL.value()
    return f"{base.rstrip('/')}/runs/flow-run/{flow_run_id}" if base else ""


def _tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise SpecError(
            "MLFLOW_TRACKING_URI is not set on this worker; start it with `cq worker start` "
            "(or export MLFLOW_TRACKING_URI=http://HOST:5000 before `prefect worker start`)"
        )
    return uri


def _devices_free() -> None:
    """Tell a cq-gpu worker the command's process tree is gone: its GPUs can go to the next run now,
    not after this run's bookkeeping (log and metric flush, artifacts, states: about a second)."""
    path = os.environ.get("CQ_DEVICES_FREE_FILE")
    if path:
        try:
            Path(path).touch()
        except OSError:
            pass  # the worker releases them when this process ends, as without the file


command_ended: contextvars.ContextVar[Callable[[ExperimentResult], None] | None] = contextvars.ContextVar(
    "cq_command_ended", default=None
)
"""Set by code that runs experiments in its own process (a DAG's CPU nodes): called with the result as soon
as the command has ended and its lines are parsed, before the run's bookkeeping (log and metric flush,
artifacts, states), so a DAG slot frees as a GPU does."""


run_started: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "cq_run_started", default=None
)
"""Called when the experiment's flow run exists and runs (its body starts): a DAG starts its CPU nodes'
subflows one at a time up to here, because concurrent flow-run creation on a SQLite Prefect server is
refused (HTTP 503, retried after ~2 s)."""


def _notify_command_ended(result: ExperimentResult) -> None:
    notify = command_ended.get()
    if notify is not None:
        try:
            notify(result)
        except Exception:  # the listener's problem must not become the experiment's
            logging.getLogger(__name__).exception("command_ended listener failed")


class _Background:
    """Run ``call`` in a thread now, in this context (so Prefect's run context goes along); :meth:`join`
    says whether it succeeded and keeps its return value in ``value``."""

    def __init__(self, call, name: str = "cq-background") -> None:
        self.error: BaseException | None = None
        self.value = None

        def run() -> None:
            try:
                self.value = call()
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.error = exc

        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True)
        self._thread.start()

    def join(self) -> bool:
        self._thread.join()
        return self.error is None


def _mark_running(mlflow, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    mlflow.update_run(run_id, status="RUNNING")


@dataclass(frozen=True)
class RunIdentity:
    """Where an experiment's output goes: its own flow run (the ``experiment`` flow), or a task of another
    flow run (a DAG's CPU node: :func:`run_in_task`)."""

    flow_run_id: str
    flow_run_name: str
    flow_name: str = "experiment"
    task_run_id: str | None = None

    @property
    def own_flow(self) -> bool:
        return self.task_run_id is None


def run_experiment(spec: ExperimentSpec, mlflow_run_id: str | None = None) -> ExperimentResult:
    """The body of the experiment flow (callable only inside a Prefect flow run)."""
    started = run_started.get()
    if started is not None:
        started()
    flow_run = FlowRunContext.get().flow_run
    return _execute(spec, mlflow_run_id, RunIdentity(str(flow_run.id), flow_run.name), get_run_logger())


def run_in_task(spec: ExperimentSpec, mlflow_run_id: str) -> ExperimentResult:
    """Run an experiment inside the current Prefect task (a DAG's CPU node): the same streaming, metrics and
    MLflow record as the ``experiment`` flow, with its lines in this flow run's log under the task, and no
    flow run of its own (none to create, start and finish: about half a second per node on a busy server).
    The caller's flow run sends the heartbeats and replays what crashed runs left on this host."""
    from prefect.context import TaskRunContext

    flow_context, task_context = FlowRunContext.get(), TaskRunContext.get()
    flow_run = flow_context.flow_run
    identity = RunIdentity(str(flow_run.id), flow_run.name, flow_context.flow.name if flow_context.flow else "",
                           str(task_context.task_run.id))
    return _execute(spec, mlflow_run_id, identity, get_run_logger())


def _at_commit(workdir: Path, commit: str) -> bool:
    from cq_prefect.code_changes import workdir_at_commit

    return workdir_at_commit(workdir, commit)


def _execute(spec: ExperimentSpec, mlflow_run_id: str | None, run: RunIdentity, logger) -> ExperimentResult:
    flow_run_id = run.flow_run_id
    workdir = Path(spec.workdir)
    exp_id = prestart.experiment_id(spec, flow_run_id)
    # A cq-gpu worker's warm engine may have started the command already (cq_prefect.prestart); then
    # everything below runs beside it, and its first lines wait in order for the output log.
    early = prestart.adopt(flow_run_id, spec, mlflow_run_id) if run.own_flow else None

    uri = _tracking_uri()
    if run.own_flow:
        replay_spools(uri, timeout=10)  # points a crashed run on this host left behind
        replay_log_spools(timeout=10)  # …and output lines
    mlflow = tracking.client(uri)
    problem = None
    if spec.source is not None and not _at_commit(workdir, spec.source.commit):
        try:  # a worker on another host: the experiment's commit, cloned or fetched once per host
            workdir = spec.source.workdir(cq_home() / "checkouts")
        except CqError as exc:
            problem = f"the code of {exp_id} could not be checked out on host {os.uname().nodename}: {exc}"
        else:
            logger.info("Code: %s at %s (checked out in %s)", spec.source.url, spec.source.commit[:12], workdir)
    elif not workdir.is_dir():
        problem = f"workdir {spec.workdir} does not exist on host {os.uname().nodename}; create it or fix --workdir"
    if problem:
        if mlflow_run_id is not None:  # the run cq submit made must not stay SCHEDULED forever
            mlflow.set_tag(mlflow_run_id, tracking.TAG_OUTCOME, "failed")
            mlflow.set_tag(mlflow_run_id, "cq.error", problem)
            mlflow.set_terminated(mlflow_run_id, status="FAILED")
        raise SpecError(problem)
    if mlflow_run_id is None:
        found = tracking.find_run(mlflow, tracking.TAG_FLOW_RUN_ID, flow_run_id, [spec.mlflow_experiment])
        mlflow_run_id = found.info.run_id if found else tracking.create_experiment_run(mlflow, spec, exp_id)
    tags = {
        tracking.TAG_EXP_ID: exp_id,
        tracking.TAG_FLOW_RUN_ID: flow_run_id,
        tracking.TAG_FLOW_RUN_NAME: run.flow_run_name,
        tracking.TAG_FLOW_RUN_URL: _flow_run_url(flow_run_id),
        **tracking.git_state(workdir),
        **tracking.host_tags(),
    }
    # Tag the run and mark it RUNNING beside the command's start, not before it: two MLflow writes
    # (~0.1 s each on SQLite) stay off the path from claim to the command's first line.
    mark_running = _Background(lambda: _mark_running(mlflow, mlflow_run_id, tags), "cq-mark-running")
    gpu_ids = [g for g in tags[tracking.TAG_GPU_IDS].split(",") if g]
    logger.info(
        "Experiment %s: %s (workdir %s, GPUs %s) → MLflow run %s%s", exp_id, spec.command, spec.workdir,
        ",".join(gpu_ids) or "none", mlflow_run_id, STARTED_AT_CLAIM if early is not None else "",
    )

    sink = SummarizingSink(MlflowSink(mlflow_run_id, uri))
    handler = MetricLogHandler(sink=sink, on_bad_token=logger.warning)
    output_logger = logging.getLogger(f"cq.output.{flow_run_id}.{exp_id}")
    output_logger.propagate = False
    output_logger.setLevel(logging.INFO)
    shipper = LogShipper(flow_run_id, task_run_id=run.task_run_id)
    api_handler = LogShipperHandler(shipper)
    output_logger.addHandler(api_handler)
    output_logger.addHandler(handler)
    extra = {"flow_run_id": flow_run_id, "flow_run_name": run.flow_run_name, "flow_name": run.flow_name}
    run_dir = Path(tempfile.mkdtemp(prefix=f"cq-{exp_id}-"))
    output = OutputLog(output_logger, extra, run_dir / "output.log")

    if early is not None:
        command = early.command
        early.lines.attach(output.add)
    else:
        env = prestart.command_environment(spec, tracking_uri=uri, mlflow_run_id=mlflow_run_id, exp_id=exp_id)
        command = CommandRun(spec.command, workdir, env=env, on_line=output.add, kill_grace=prestart.kill_grace())
    outcome, exit_code, message = "success", None, None
    started = time.monotonic()
    try:
        if early is None:
            command.start()
        started = command.started_monotonic  # timeout and duration count from the command's real start
        try:
            exit_code = command.wait(timeout=None if spec.timeout is None else
                                     max(0.0, spec.timeout - (time.monotonic() - started)))
        except TimeoutError:
            exit_code = command.stop()
            outcome, message = "timeout", f"timed out after {spec.timeout:g} s; the process tree was killed"
        else:
            if exit_code != 0:
                outcome = "failed"
    except BaseException as exc:  # cancellation (TerminationSignal), KeyboardInterrupt, a crash: kill the tree
        outcome = "crashed" if isinstance(exc, Exception) and not isinstance(exc, CancelledRun) else "cancelled"
        if command.process is not None:
            exit_code = command.stop()
        raise
    finally:
        duration = time.monotonic() - started
        if run.own_flow:  # a task's command holds no devices of its own
            _devices_free()
        output.close()
        output_logger.removeHandler(handler)
        output_logger.removeHandler(api_handler)
        _notify_command_ended(ExperimentResult(
            exp_id=exp_id, name=spec.name, outcome=outcome, exit_code=exit_code,
            duration_s=round(time.monotonic() - started, 3), flow_run_id=flow_run_id, mlflow_run_id=mlflow_run_id,
            gpu_ids=gpu_ids, message=message, metrics={
                key: MetricStats.from_summary(s) for key, s in sink.summarizer.summaries(handler.parser.units).items()
            },
        ))
        # The two flushes wait on different servers: side by side, the run ends one round trip sooner.
        lines_sent = _Background(lambda: shipper.close(timeout=float(os.environ.get("CQ_LOG_FLUSH_TIMEOUT", "600"))),
                                 "cq-log-flush")
        flushed = sink.close(timeout=float(os.environ.get("CQ_MLFLOW_FLUSH_TIMEOUT", "600")))
        if not (lines_sent.join() and lines_sent.value):
            logger.warning(
                "The Prefect API did not take every output line in time; the rest is spooled on this host and "
                "is sent by the next experiment here"
            )
        if not flushed:
            logger.warning(
                "MLflow did not take every metric point in time; the rest is spooled on this host and is "
                "replayed by the next experiment here (or `cq up`)"
            )
        summaries = sink.summarizer.summaries(handler.parser.units)
        result = ExperimentResult(
            exp_id=exp_id,
            name=spec.name,
            outcome=outcome,
            exit_code=exit_code,
            duration_s=round(duration, 3),
            flow_run_id=flow_run_id,
            mlflow_run_id=mlflow_run_id,
            gpu_ids=gpu_ids,
            metrics={key: MetricStats.from_summary(s) for key, s in summaries.items()},
            message=message,
        )
        (run_dir / tracking.RESULT_ARTIFACT).write_text(result.model_dump_json(indent=2))
        summary = _Background(lambda: _publish_summary(result, output.line_count), "cq-summary")  # beside MLflow's
        if not mark_running.join():  # MLflow refused it meanwhile: once more, now, before the run is closed
            _mark_running(mlflow, mlflow_run_id, tags)
        _finish_mlflow_run(mlflow, mlflow_run_id, outcome, exit_code, duration, run_dir, logger)
        shutil.rmtree(run_dir, ignore_errors=True)
        summary.join()

    if outcome == "timeout":
        raise ExperimentTimedOut(f"{exp_id} {message}", exit_code)
    if outcome == "failed":
        tail = "\n".join(output.tail)
        raise ExperimentFailed(f"{exp_id} exited with code {exit_code}; last {len(output.tail)} lines:\n{tail}", exit_code)
    return result


def _finish_mlflow_run(mlflow, run_id, outcome, exit_code, duration, run_dir: Path, logger) -> None:
    """Outcome tags, the artifacts (output.log, cq_result.json), then the run's terminal status."""
    from mlflow.entities import RunTag

    status = {"success": "FINISHED", "cancelled": "KILLED"}.get(outcome, "FAILED")
    tags = {tracking.TAG_OUTCOME: outcome, tracking.TAG_DURATION: f"{duration:.3f}"}
    if exit_code is not None:
        tags[tracking.TAG_EXIT_CODE] = str(exit_code)
    try:
        mlflow.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        try:
            mlflow.log_artifacts(run_id, str(run_dir))
        except Exception as exc:  # artifacts are a convenience; the run's status is not
            logger.warning("Could not upload output.log / %s to MLflow: %s", tracking.RESULT_ARTIFACT, exc)
        mlflow.set_terminated(run_id, status=status)
    except Exception as exc:
        logger.error("Could not record the end of MLflow run %s: %s", run_id, exc)


def _publish_summary(result: ExperimentResult, line_count: int) -> None:
    """A markdown artifact on the flow run: the metrics table the Prefect UI shows."""
    from prefect.artifacts import create_markdown_artifact

    rows = "\n".join(
        f"| `{key}` | {m.final:.6g} | {m.min:.6g} | {m.max:.6g} | {m.count} | {m.unit or ''} |"
        for key, m in sorted(result.metrics.items())
    )
    markdown = (
        f"# {result.exp_id}: {result.outcome}\n\nexit code {result.exit_code}, {result.duration_s:.1f} s, "
        f"{line_count} output lines, MLflow run `{result.mlflow_run_id}`\n\n"
        "| metric | final | min | max | points | unit |\n|---|---|---|---|---|---|\n" + rows
    )
    try:
        create_markdown_artifact(markdown, key=f"metrics-{result.exp_id.lower().replace('_', '-').replace('.', '-')}", description="cq experiment metrics")
    except Exception:
        pass  # the UI summary must never fail an experiment


@flow(name="experiment", persist_result=False, log_prints=False)
def experiment(spec: ExperimentSpec, mlflow_run_id: str | None = None) -> ExperimentResult:
    """Run ``spec.command`` in ``spec.workdir``: every line to the run log, every ``@key=value`` to MLflow."""
    with heartbeats():  # while they come, the crash automation knows this process is alive (cq_prefect.crash)
        return run_experiment(spec, mlflow_run_id)
