"""``cq mcp``: cq's tools for AI assistants, over the Model Context Protocol.

    cq mcp                                   # stdio: an assistant on this machine starts it
    CQ_MCP_TOKEN=… cq mcp --http --port 8765 # streamable HTTP at http://127.0.0.1:8765/mcp, bearer token required

Tools (each also under the seed's ``c4_`` name; ``cq_metrics`` also as ``cq_hub_metrics`` and
``c4_hub_metrics``): ``cq_hub_submit``, ``cq_hub_watch``, ``cq_hub_status``, ``cq_hub_cancel``, ``cq_metrics``,
``cq_hub_dag_from_yaml``, ``cq_loop_start``, ``cq_loop_status``, ``cq_loop_stop``, ``cq_knowledge_search``,
``cq_pi``; a tool that takes a ``run`` also takes it as ``job_id``, the seed's name. They are thin: each calls
what the matching ``cq`` command calls (:mod:`cq_prefect.submission`, :mod:`cq_prefect.dag_submission`,
:mod:`cq_prefect.loop_submission`, :mod:`cq_prefect.knowledge_cli`) and answers with structured JSON and
links to the Prefect and MLflow UIs. Bad input comes back as a tool error (``isError``) carrying the CLI's
message — the problem and the fix — and the server keeps serving; so does any other failure (a 401 or 403
from Prefect or MLflow reads as the CLI's: the variable to set).

The server connects to the stack once, in the background, as it starts (``connect()``: the embedded stack is
started when none answers) and keeps one Prefect client and one MLflow client open; runs it has found once
are remembered, so polling ``cq_hub_status`` / ``cq_hub_watch`` costs one Prefect and one MLflow request.

Over HTTP every request needs ``Authorization: Bearer <token>`` (``CQ_MCP_TOKEN``, or a Prefect ``Secret``
block named by ``--token-block``); anything else gets 401 and reaches nothing. The token is never logged,
and ``CQ_MCP_TOKEN`` is taken out of the server's environment once read, so no process it starts (the embedded
stack, a worker, a loop run here) inherits it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import hmac
import importlib
import io
import json
import logging
import math
import os
import sys
import threading
import time
import typing
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from cq_prefect.errors import BadInput, CqError, StackError

logger = logging.getLogger("cq.mcp")

ALIAS_PREFIX = "c4_"  # the seed's tool names: c4_hub_submit, … (cq_ → c4_)
EXTRA_ALIASES = {"cq_metrics": ("cq_hub_metrics", "c4_hub_metrics")}  # the seed's names of its metrics tool
RUN_ALIAS = "job_id"  # the seed's name of the `run` argument (c4_hub_status(job_id=…), …)
LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")  # the Host headers mcp allows on a loopback bind
DEFAULT_PORT = 8765
TOKEN_ENV = "CQ_MCP_TOKEN"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
SETTLE_SECONDS = 3.0  # after a run ends, the engine's last log lines may still be on their way
READY_TIMEOUT = 300.0  # a first call waits this long for the stack (connect() may be starting it)
WARM_MODULES = ("cq_prefect.submission", "cq_prefect.dag_submission", "cq_prefect.dag", "cq_prefect.loop_submission",
                "cq_prefect.ledger", "prefect.client.schemas.filters", "prefect.states")
PAGE = 200  # Prefect's largest page of logs
LOOKBACK = timedelta(seconds=10)  # how late a log record may reach Prefect after records stamped later
MAX_SEEN = 200  # ids a watch cursor carries at most
RESOLVED_TTL = 30.0  # a name or exp id is looked up again after this long (a resubmission may reuse it)
INSTRUCTIONS = """\
cq runs ML experiments on Prefect (orchestration) and records every `@key=value` a script prints in MLflow.
- Experiment: cq_hub_submit(name, workdir, command) → ids; then cq_hub_watch(run) and again with
  since=<cursor> every few seconds until finished; cq_metrics(run) for final/min/max per metric.
- Pipeline: cq_hub_dag_from_yaml(yaml_content) validates a DAG and starts it; watch it like a run.
- Research loop: cq_loop_start(config) runs experiments until a goal or budget; cq_loop_status(loop).
- Knowledge: cq_knowledge_search(query) and cq_pi(text) (directions → an ideas file for a scripted loop).
A tool error's text names the problem and the fix. RUN is a flow-run id, flow-run name or exp id."""

Run = Annotated[str, Field(description="The run: its flow-run id, flow-run name or exp id (as cq_hub_submit "
                                       "returned them), e.g. 'exp-044'. Also accepted as `job_id` (the seed's "
                                       "name).")]
Loop = Annotated[str, Field(description="The loop's name (the config's `name`), e.g. 'pose-overnight'.")]


# -- the server's state ---------------------------------------------------------------------------


class Hub:
    """What every tool call shares: the stack's endpoints, warm clients, runs already found.

    The tool methods are plain Python (bad input raises :class:`~cq_prefect.errors.BadInput`); the MCP
    layer (:func:`build_server`) turns their results and errors into tool results.
    """

    def __init__(self, connect=None):
        self._connect = connect  # injectable; default cq_prefect.stack.connect
        self._ready = threading.Event()
        self._started = False
        self._warm_lock = threading.Lock()
        self._error: BaseException | None = None
        self.endpoints = None
        self.prefect = None  # one SyncPrefectClient, entered once, shared by the tool threads
        self.mlflow = None
        self._resolved: dict[str, tuple[float, Any]] = {}
        self._experiment_ids: dict[str, str] = {}
        self._capture_lock = threading.Lock()
        self._parser = None

    # -- connecting ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and warm up in the background: the MCP handshake is answered at once."""
        if self._started:
            return
        self._started = True
        threading.Thread(target=self._warm, name="cq-mcp-warm-up", daemon=True).start()

    def _warm(self) -> None:
        with self._warm_lock:
            if self.prefect is not None:
                return
            try:
                from cq_prefect.stack import connect, prefect_settings

                endpoints = (self._connect or connect)()
                # Prefect reads its settings once: point it here before it is first imported.
                os.environ["PREFECT_API_URL"] = endpoints.prefect_api_url
                os.environ["MLFLOW_TRACKING_URI"] = endpoints.mlflow_tracking_uri
                with prefect_settings(endpoints):
                    from prefect.client.orchestration import get_client

                    prefect = get_client(sync_client=True)
                    prefect.__enter__()
                from cq_prefect import tracking

                self.mlflow = tracking.client(endpoints.mlflow_tracking_uri)
                # What the tools import on first use, imported now, beside the handshake.
                for module in WARM_MODULES:
                    importlib.import_module(module)

                prefect.api_healthcheck()  # opens the connection the first call would open
                self.endpoints, self.prefect, self._error = endpoints, prefect, None
            except BaseException as exc:  # noqa: BLE001 - kept for the tool calls to report
                self._error = exc
                logger.warning("cq mcp: could not reach the stack: %s", exc)
            finally:
                self._ready.set()

    def ready(self) -> None:
        """Wait for the warm-up; after a failed one, try once more (the stack may be up by now)."""
        if not self._ready.wait(READY_TIMEOUT):
            raise StackError(f"the stack did not answer within {READY_TIMEOUT:.0f} s of `cq mcp` starting; "
                             "check it with `cq status`, then call the tool again")
        if self.prefect is None:
            self._warm()
        if self.prefect is None:
            from cq_prefect.auth import refusal

            error = self._error
            if isinstance(error, CqError):
                raise error
            refused = refusal(error) if error is not None else None  # credentials refused: name the variable
            if refused is not None:
                raise refused from error
            raise StackError(f"cannot reach the cq stack ({type(error).__name__}: {error}); check it with "
                             "`cq status` (or start it with `cq up`), then call the tool again") from error

    def close(self) -> None:
        if self.prefect is not None:
            with contextlib.suppress(Exception):
                self.prefect.__exit__(None, None, None)
            self.prefect = None

    # -- finding runs ----------------------------------------------------------------------------

    def resolve(self, run: str):
        """The run's ExperimentHandle (:func:`cq_prefect.submission.resolve`), remembered once found."""
        run = (run or "").strip()
        if not run:
            raise BadInput("run is empty; give a flow-run id, flow-run name or exp id (as cq_hub_submit returned)")
        self.ready()
        cached = self._resolved.get(run)
        if cached and (cached[0] is None or time.monotonic() < cached[0]):
            return cached[1]
        from cq_prefect.submission import resolve

        handle, own = self._flow_runs_own(run, resolve(run, self.endpoints))
        self._remember(run, handle, own)
        return handle

    def _flow_runs_own(self, key: str, handle):
        """(the handle with the flow run's own MLflow run, whether it is the flow run's own).

        :func:`~cq_prefect.submission.resolve` takes the newest MLflow run tagged with the flow-run id. A DAG's
        CPU nodes run inside the DAG's flow run and carry its id, so for a DAG that is mostly a node's run; the
        node's run names the DAG's own (``mlflow.parentRunId``). Asked for by the node's exp id, the node's run
        is the answer (and not the flow run's own)."""
        if handle.mlflow_run_id is None:
            return handle, True
        try:
            mlflow_run = self.mlflow.get_run(handle.mlflow_run_id)
        except Exception:  # noqa: BLE001 - MLflow away for a moment: the handle as found (looked up again later)
            return handle, False
        self._experiment_ids[handle.mlflow_run_id] = mlflow_run.info.experiment_id  # for the links
        from cq_prefect import tracking
        from cq_prefect.dag import TAG_DAG_NODE, TAG_DAG_RUN

        tags = mlflow_run.data.tags
        if not (tags.get(TAG_DAG_NODE) and tags.get(TAG_DAG_RUN) == handle.flow_run_id):
            return handle, True
        if key == tags.get(tracking.TAG_EXP_ID) or not tags.get("mlflow.parentRunId"):
            return handle, False
        return dataclasses.replace(handle, exp_id=handle.flow_run_name, mlflow_run_id=tags["mlflow.parentRunId"]), True

    def _remember(self, key: str, handle, own: bool = True) -> None:
        if handle.mlflow_run_id is None:  # not started yet: its MLflow run appears later, so look again next time
            return
        # A flow-run id always names the same run; a name or exp id may be reused by a later submission.
        exact = key == handle.flow_run_id and own
        self._resolved[key] = (None if exact else time.monotonic() + RESOLVED_TTL, handle)
        if own:
            self._resolved[handle.flow_run_id] = (None, handle)

    # -- links -----------------------------------------------------------------------------------

    def links(self, flow_run_id: str | None, mlflow_run_id: str | None = None,
              experiment_id: str | None = None) -> dict[str, str | None]:
        """UI pages: the Prefect flow run and the MLflow run (as `cq demo` prints them)."""
        endpoints = self.endpoints
        prefect = f"{endpoints.prefect_ui_url}/runs/flow-run/{flow_run_id}" if flow_run_id else None
        mlflow = None
        if mlflow_run_id and endpoints.mlflow_ui_url:
            experiment_id = experiment_id or self._experiment_id(mlflow_run_id)
            if experiment_id:
                mlflow = f"{endpoints.mlflow_ui_url}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"
        return {"prefect_flow_run": prefect, "mlflow_run": mlflow}

    def _experiment_id(self, mlflow_run_id: str, run=None) -> str | None:
        if mlflow_run_id not in self._experiment_ids:
            try:
                run = run or self.mlflow.get_run(mlflow_run_id)
            except Exception:  # noqa: BLE001 - MLflow away for a moment: no link, the answer still comes
                return None
            self._experiment_ids[mlflow_run_id] = run.info.experiment_id
        return self._experiment_ids[mlflow_run_id]

    def _ids(self, handle) -> dict[str, Any]:
        return {"flow_run_id": handle.flow_run_id, "flow_run_name": handle.flow_run_name, "exp_id": handle.exp_id,
                "mlflow_run_id": handle.mlflow_run_id}

    # -- experiments -----------------------------------------------------------------------------

    def submit(
        self,
        name: Annotated[str, Field(description="Experiment name (the MLflow run name), e.g. 'baseline'.")],
        workdir: Annotated[str, Field(description="Absolute path of the folder the command runs in (on the "
                                                  "worker's host; it must exist unless remote_workdir).")],
        command: Annotated[str, Field(description="Shell command, e.g. 'python train.py --lr=0.1'. Every "
                                                  "`@key=value` it prints becomes an MLflow metric.")],
        gpu_count: Annotated[int, Field(description="GPUs the command needs (0: CPU only).")] = 0,
        exp_id: Annotated[str | None, Field(description="A stable id such as 'exp-044' (default: generated).")] = None,
        pool: Annotated[str | None, Field(description="Work pool (default: CQ_POOL, i.e. 'local').")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Environment variables for the command.")] = None,
        timeout_sec: Annotated[float | None, Field(description="Kill the command's process tree after this many "
                                                               "seconds.")] = None,
        tags: Annotated[list[str] | None, Field(description="Tags: 'key=value' or labels.")] = None,
        params: Annotated[dict[str, str | int | float | bool] | None,
                          Field(description="MLflow params to record, e.g. {\"lr\": 0.1}.")] = None,
        remote_workdir: Annotated[bool, Field(description="The workdir exists only on the GPU host: do not check "
                                                          "it here.")] = False,
    ) -> dict[str, Any]:
        """Run a shell command as an experiment (one Prefect flow run, one MLflow run) on a work pool.

        Returns at once with its ids (flow_run_id, flow_run_name, exp_id, mlflow_run_id), UI links and
        `warnings` (what `cq submit` prints as `cq: warning: …`, e.g. no worker polls the pool: the run waits
        until one starts); follow it with cq_hub_watch(run=exp_id), read its metrics with cq_metrics(run=exp_id).
        Same as `cq submit`."""
        from cq_prefect.submission import make_spec, submit

        spec = make_spec(name=name, workdir=workdir, command=command, gpu_count=gpu_count, exp_id=exp_id,
                         env=env or {}, tags=tags or [], timeout=timeout_sec, params=params or {})
        self.ready()
        warnings: list[str] = []
        handle = submit(spec, pool=pool, check_workdir=not remote_workdir, endpoints=self.endpoints,
                        warn=warnings.append)
        self._remember(handle.flow_run_id, handle)
        self._remember(handle.exp_id, handle)
        return {**self._ids(handle), "state": "SCHEDULED", "warnings": warnings,
                "links": self.links(handle.flow_run_id, handle.mlflow_run_id),
                "next": f"cq_hub_watch(run='{handle.exp_id}') — then again with since=<its cursor> until finished"}

    def status(self, run: Run) -> dict[str, Any]:
        """The run's state now: Prefect state, outcome, exit code, duration, latest metric values, UI links.

        `finished` is true once the run has ended (COMPLETED, FAILED, CANCELLED or CRASHED)."""
        handle = self.resolve(run)
        flow_run = self.prefect.read_flow_run(uuid.UUID(handle.flow_run_id))
        state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
        result: dict[str, Any] = {
            **self._ids(handle), "state": state, "state_name": flow_run.state.name if flow_run.state else "Scheduled",
            "finished": state in TERMINAL, "message": flow_run.state.message if flow_run.state else None,
            "outcome": _OUTCOMES.get(state, "scheduled"), "exit_code": None, "duration_s": None, "metrics": {},
        }
        experiment_id = None
        if handle.mlflow_run_id:
            from cq_prefect import tracking

            mlflow_run = self.mlflow.get_run(handle.mlflow_run_id)
            experiment_id = self._experiment_id(handle.mlflow_run_id, mlflow_run)
            tags = mlflow_run.data.tags
            if state in TERMINAL and state not in ("CANCELLED", "CRASHED") and tags.get(tracking.TAG_OUTCOME):
                result["outcome"] = tags[tracking.TAG_OUTCOME]
            exit_code, duration = tags.get(tracking.TAG_EXIT_CODE), tags.get(tracking.TAG_DURATION)
            result["exit_code"] = int(exit_code) if exit_code not in (None, "") else None
            result["duration_s"] = float(duration) if duration else None
            result["metrics"] = _metric_values(mlflow_run)
        result["links"] = self.links(handle.flow_run_id, handle.mlflow_run_id, experiment_id)
        return _json_safe(result)

    def watch(
        self,
        run: Run,
        since: Annotated[str | None, Field(description="The cursor the previous cq_hub_watch call returned; leave "
                                                       "it out to start from the run's first line.")] = None,
        limit: Annotated[int, Field(description="Most log records to return in one call (1-5000; a record holds "
                                                "one or more output lines); `more` says when there are more.")] = 500,
    ) -> dict[str, Any]:
        """New output lines and metric updates of a run since a cursor, like `cq watch` in steps: poll it.

        Returns `lines` (the command's output as printed; cq's own messages as `[LEVEL] text`), `metrics` (each
        key with a new latest point since the cursor: {KEY: {value, unit, step}}; points logged between two
        calls show as the latest of them — every point is in cq_metrics(run, history=true)), `cursor` (pass it
        as `since` next time), `state`, and `finished` (the run ended and every line has been returned: stop
        polling)."""
        if not 1 <= limit <= 5000:
            raise BadInput(f"limit {limit}: give 1 to 5000 (log records per call)")
        handle = self.resolve(run)
        window, seen, shown = _read_cursor(since, handle.flow_run_id)
        flow_run = self.prefect.read_flow_run(uuid.UUID(handle.flow_run_id))  # the state before the logs
        state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
        logs, window, seen, more = self._new_logs(handle.flow_run_id, window, seen, limit)
        lines: list[str] = []
        for log in logs:
            if log.name.startswith("cq.output"):
                lines.extend(log.message.split("\n"))
            else:
                lines.append(f"[{_LEVELS.get(log.level, str(log.level))}] {log.message}")
        metrics: dict[str, Any] = {}
        if handle.mlflow_run_id:
            try:
                mlflow_run = self.mlflow.get_run(handle.mlflow_run_id)
            except Exception:  # noqa: BLE001 - MLflow away for a moment: metrics catch up later
                mlflow_run = None
            if mlflow_run is not None:
                from cq_prefect.tracking import UNIT_TAG_PREFIX

                tags = mlflow_run.data.tags
                for key, point in _latest_points(mlflow_run).items():
                    seen_point = [point.step, point.timestamp, _json_safe(point.value)]
                    before = shown.get(key)
                    # A cursor from before steps were kept holds the value alone: compare that, keep the point.
                    if before != (seen_point if isinstance(before, list) else seen_point[2]):
                        metrics[key] = {"value": point.value, "unit": tags.get(UNIT_TAG_PREFIX + key),
                                        "step": point.step}
                    shown[key] = seen_point
        ended = flow_run.end_time.timestamp() if state in TERMINAL and flow_run.end_time else None
        settled = state in TERMINAL and (ended is None or time.time() - ended >= SETTLE_SECONDS)
        finished = settled and not more
        result = {
            **self._ids(handle), "state": state, "finished": finished, "lines": lines, "metrics": metrics,
            "cursor": _write_cursor(handle.flow_run_id, window, seen, shown), "more": more,
            "outcome": _OUTCOMES.get(state, "scheduled"),
            "message": flow_run.state.message if flow_run.state and state not in ("RUNNING", "COMPLETED") else None,
        }
        if finished:
            result["links"] = self.links(handle.flow_run_id, handle.mlflow_run_id)
        return _json_safe(result)

    def _new_logs(self, flow_run_id: str, window: str | None, seen: list[str], limit: int):
        """The run's log records not returned yet (at most ``limit``), and the cursor's next window and ids.

        Prefect gets a run's records from several senders (the worker, the engine's batches, cq's log
        shipper), so one may arrive after records stamped later. Reading from an offset or from the last
        timestamp would skip it; instead each call reads from ``window`` — LOOKBACK seconds before the last
        record returned — and leaves out the records returned already, known by (short) id."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
        from prefect.client.schemas.sorting import LogSort

        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]),
                               timestamp=LogFilterTimestamp(after_=datetime.fromisoformat(window)) if window else None)
        known = set(seen)
        new, passed, read, more = [], [], 0, False  # passed: (timestamp, id) of every record gone through
        while not more:
            page = self.prefect.read_logs(log_filter=log_filter, limit=PAGE, offset=read, sort=LogSort.TIMESTAMP_ASC)
            read += len(page)
            for log in page:
                log_id = log.id.hex[-12:]  # the random end (Prefect ids start with a timestamp)
                if log_id not in known:
                    if len(new) == limit:
                        more = True
                        break
                    new.append(log)
                passed.append((log.timestamp, log_id))
            if len(page) < PAGE:
                break
        if not passed:
            return new, window, seen, more
        keep = [(stamp, log_id) for stamp, log_id in passed if stamp >= passed[-1][0] - LOOKBACK]
        if len(keep) > MAX_SEEN:  # a chatty run: a shorter window, still every id in it
            keep = [(stamp, log_id) for stamp, log_id in keep if stamp >= keep[-MAX_SEEN][0]]
        ids = [log_id for _, log_id in keep]
        gone_through = {log_id for _, log_id in passed}
        ids += [log_id for log_id in seen if log_id not in gone_through]  # returned before, after where this stopped
        return new, keep[0][0].isoformat(), ids, more

    def cancel(self, run: Run) -> dict[str, Any]:
        """Cancel a run: a running command's whole process tree is stopped; a DAG's nodes are cancelled too.

        A run that has not started is cancelled at once; a finished run is left as it is (cancelled: false)."""
        from prefect.states import Cancelled, Cancelling

        handle = self.resolve(run)
        flow_run_id = uuid.UUID(handle.flow_run_id)
        flow_run = self.prefect.read_flow_run(flow_run_id)
        state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
        if state in TERMINAL or state == "CANCELLING":
            return {**self._ids(handle), "cancelled": state == "CANCELLING", "state": state,
                    "message": f"the run is already {state.lower()}; nothing to cancel"}
        message = "cancelled through cq mcp"
        # Not started yet: nothing to stop, so Cancelled; started: the worker stops it on Cancelling.
        new = Cancelled(message=message) if state in ("SCHEDULED", "PAUSED") else Cancelling(message=message)
        outcome = self.prefect.set_flow_run_state(flow_run_id, new, force=True)
        accepted = str(getattr(outcome.status, "value", outcome.status)).upper() == "ACCEPT"
        return {**self._ids(handle), "cancelled": accepted, "state": new.type.value,
                "message": "cancelling: the worker stops the command (check with cq_hub_status)" if accepted else
                f"Prefect refused: {getattr(outcome.details, 'reason', None)}",
                "links": self.links(handle.flow_run_id, handle.mlflow_run_id)}

    def metrics(
        self,
        run: Run,
        history: Annotated[bool, Field(description="Also return every [step, value] of each metric.")] = False,
    ) -> dict[str, Any]:
        """A run's metrics from MLflow, as `cq metrics RUN --json`: {KEY: {final, min, max, count, unit}}.

        `final` is the value at the highest step; NaN and infinities are the strings "nan", "inf", "-inf"."""
        handle = self.resolve(run)
        if handle.mlflow_run_id is None:
            raise CqError(f"run '{run}' has no MLflow run yet (it has not started); try again once it runs")
        return _json_safe({**self._ids(handle), "metrics": handle.metrics(history=history),
                           "links": self.links(handle.flow_run_id, handle.mlflow_run_id)})

    # -- DAGs ------------------------------------------------------------------------------------

    def dag_from_yaml(
        self,
        yaml_content: Annotated[str, Field(description="The DAG as YAML text: name, nodes (name, command, "
                                                       "gpu_count, depends_on, working_dir, environment, …), "
                                                       "dependencies (source, target).")],
        run: Annotated[bool, Field(description="Start it (detached) after validating; false: validate only.")] = True,
        pool: Annotated[str | None, Field(description="Pool of the DAG run and of its GPU nodes (default "
                                                      "CQ_POOL, i.e. 'local').")] = None,
        base_dir: Annotated[str | None, Field(description="Folder that relative working_dirs are relative to "
                                                          "(default: the server's current folder).")] = None,
        max_parallel: Annotated[int | None, Field(description="Most nodes at once (default 8).")] = None,
    ) -> dict[str, Any]:
        """Validate a DAG pipeline (YAML) and, with run=true, start it as one Prefect flow run.

        Returns its execution plan (stages of nodes that run together) and, when started, its flow_run_id and
        links; follow it with cq_hub_watch(run=flow_run_id). Every problem (unknown keys, duplicate names,
        missing nodes, cycles, bad YAML) comes back as an error naming its line, before anything runs."""
        from cq_prefect.dag_spec import parse_dag

        dag = parse_dag(yaml_content, "yaml_content")
        if max_parallel is not None and max_parallel < 1:
            raise BadInput(f"max_parallel {max_parallel}: give at least 1 (nodes at once)")
        result: dict[str, Any] = {"valid": True, "dag": dag.name, "stages": dag.stages(),
                                  "nodes": [node.name for node in dag.nodes], "plan": dag.plan_text()}
        if not run:
            return result
        from cq_prefect.dag_submission import submit_dag

        self.ready()
        folder = str(Path(base_dir or os.getcwd()).expanduser().absolute())
        if not Path(folder).is_dir():
            raise BadInput(f"base_dir {folder} does not exist; give the folder the DAG's working_dirs are "
                           "relative to")
        handle = submit_dag(dag, yaml_content, folder, pool=pool, max_parallel=max_parallel, endpoints=self.endpoints)
        self._remember(handle.flow_run_id, handle)
        return {**result, "flow_run_id": handle.flow_run_id, "flow_run_name": handle.flow_run_name,
                "links": self.links(handle.flow_run_id),
                "next": f"cq_hub_watch(run='{handle.flow_run_id}') until finished"}

    # -- research loops --------------------------------------------------------------------------

    def loop_start(
        self,
        config: Annotated[dict[str, Any] | str, Field(description=(
            "The loop config, as a mapping or as YAML text (or the path of a loop YAML file): name, goal, metric, "
            "direction, target, budget, parallel, experiment {workdir, command, gpu_count, pool, env, params}, "
            "proposer {kind: scripted, ideas: [{title, rationale, overrides}] | kind: optuna, space: {…} | "
            "kind: claude}, as `cq loop start FILE.yaml` reads it. E.g. {\"name\": \"lr-loop\", \"goal\": "
            "\"loss below 0.1\", \"metric\": \"loss\", \"budget\": 4, \"experiment\": {\"workdir\": \"/abs/project\", "
            "\"command\": \"python train.py\"}, \"proposer\": {\"kind\": \"scripted\", \"ideas\": [{\"title\": "
            "\"higher lr\", \"overrides\": {\"lr\": 0.1}}]}}"))],
        name: Annotated[str | None, Field(description="Override the config's loop name.")] = None,
        budget: Annotated[int | None, Field(description="Override the budget (most experiments, baseline "
                                                        "included).")] = None,
        base_dir: Annotated[str | None, Field(description="Folder relative paths in YAML text are taken from "
                                                          "(default: the server's current folder).")] = None,
    ) -> dict[str, Any]:
        """Start a research loop, detached: it proposes, runs and judges experiments until the goal, the budget
        or too many failures. Returns its name and flow run; follow it with cq_loop_status(loop=name)."""
        from cq_prefect.errors import LoopConfigError
        from cq_prefect.loop_config import LoopConfig

        if isinstance(config, str):
            config_obj = LoopConfig.from_yaml(config, base_dir=base_dir)
        elif isinstance(config, dict):
            config_obj = LoopConfig.parse(config, source="config")
        else:
            raise LoopConfigError("config: give a loop config mapping or its YAML text")
        overrides = {k: v for k, v in (("name", name), ("budget", budget)) if v is not None}
        if overrides:
            config_obj = LoopConfig.parse({**config_obj.model_dump(mode="json"), **overrides}, source="config")
        from cq_prefect.loop_submission import check_can_start, start_loop

        self.ready()
        check_can_start(config_obj, self.endpoints)
        started = start_loop(config_obj, endpoints=self.endpoints)
        return {"name": started.name, "flow_run_id": started.flow_run_id, "flow_run_name": started.flow_run_name,
                "running_here": started.pid is not None, "pid": started.pid, "log_path": started.log_path,
                "links": self.links(started.flow_run_id),
                "next": f"cq_loop_status(loop='{started.name}') every half a minute or so"}

    def loop_status(
        self,
        loop: Annotated[str | None, Field(description="The loop's name; leave it out to list every loop.")] = None,
    ) -> dict[str, Any]:
        """A loop's status as `cq loop status LOOP --json`: status (running, finished, stopped, crashed, …),
        reason, best, target, budget and budget_left, running experiments, and each experiment's cycle,
        hypothesis, outcome and value; without a name, every loop with its status and best."""
        self.ready()
        if loop is None:
            return {"loops": self._cli_json(["loop", "status", "--json"])}
        from cq_prefect import tracking
        from cq_prefect.errors import UnknownRun
        from cq_prefect.ledger import Ledger, status_json

        try:
            ledger = Ledger.require(tracking.client(self.endpoints.mlflow_tracking_uri), loop)
        except UnknownRun:
            starting = self._loop_flow_run(loop)  # started a moment ago: its ledger is not written yet
            if starting is None:
                raise
            return starting
        status = status_json(ledger)
        newest = self._loop_flow_run(loop)
        if newest and newest["status"] == "starting" and newest["flow_run_id"] != status.get("flow_run_id"):
            # Started (or resumed) a moment ago under this name: the ledger still shows the run before it.
            return {**newest, "previous": {k: status.get(k) for k in ("status", "reason", "best", "flow_run_id")}}
        status["links"] = self.links(status.get("flow_run_id"), ledger.run_id, ledger.experiment_id)
        return status

    def _loop_flow_run(self, name: str) -> dict[str, Any] | None:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
        from prefect.client.schemas.sorting import FlowRunSort

        runs = self.prefect.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"cq.loop={name}"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
        if not runs:
            return None
        flow_run = runs[0]
        state = flow_run.state.type.value if flow_run.state else "SCHEDULED"
        return {"name": name, "status": "starting" if state not in TERMINAL else "failed",
                "reason": None if state not in TERMINAL else (flow_run.state.message or state.lower()),
                "flow_run_id": str(flow_run.id), "state": state, "experiments": [],
                "links": self.links(str(flow_run.id))}

    def loop_stop(
        self,
        loop: Loop,
        wait: Annotated[float, Field(description="Seconds to wait for the loop to stop (default 60).")] = 60.0,
    ) -> dict[str, Any]:
        """Stop a loop: its running experiments are cancelled and it ends with reason 'stopped'. Returns its
        status (as cq_loop_status)."""
        from cq_prefect.loop_submission import stop_loop

        deadline = time.monotonic() + max(0.0, min(wait, 600.0))
        # A loop started a moment ago has no ledger of its own yet (stopping now would find the one before it):
        # wait until it has.
        while (status := self.loop_status(loop))["status"] == "starting":
            if time.monotonic() > deadline:
                return {**status, "message": f"loop '{loop}' is still starting; call cq_loop_stop again in a moment"}
            time.sleep(0.5)
        return stop_loop(loop, endpoints=self.endpoints, wait=max(0.0, deadline - time.monotonic()))

    # -- knowledge -------------------------------------------------------------------------------

    def knowledge_search(
        self,
        query: Annotated[str, Field(description="Words to look for in hypotheses, rationales, changes, outcomes "
                                                "and notes, e.g. 'bone length loss'.")],
        limit: Annotated[int, Field(description="Most results (1-1000).")] = 10,
    ) -> dict[str, Any]:
        """Every past experiment and note ranked by relevance, improvements first, as `cq knowledge search
        --json`: {query, total, matched, hits: [{kind, score, exp_id, loop, cycle, hypothesis, rationale,
        change, outcome, improved, value, delta, metric, unit, text, mlflow_run_id, …}]}."""
        self.ready()
        return self._cli_json(["knowledge", "search", "--json", "--limit", str(limit), "--", query])

    def pi(
        self,
        text: Annotated[str, Field(description="The goal, e.g. 'improve 3D pose accuracy, MPJPE 48mm, target "
                                               "<25mm'.")],
        space: Annotated[str | None, Field(description="Path of a search-space YAML: also propose its unexplored "
                                                       "regions.")] = None,
        out: Annotated[str | None, Field(description="Ideas file to write (default: a new file under "
                                                      "CQ_HOME/ideas).")] = None,
        force: Annotated[bool, Field(description="Replace `out` when it exists.")] = False,
        limit: Annotated[int, Field(description="Related experiments and notes to return (1-50).")] = 5,
        claude: Annotated[bool | None, Field(description="true: brainstorm with Claude (needs a key); false: "
                                                         "derive the directions from the knowledge only; "
                                                         "default: Claude when ANTHROPIC_API_KEY is set.")] = None,
    ) -> dict[str, Any]:
        """Related knowledge and directions for a goal, as `cq pi --json`: {goal, total, matched, hits, ideas:
        [{title, rationale, overrides, kind, sources}], out}. The ideas file at `out` runs as is in a loop:
        cq_loop_start with proposer {kind: scripted, ideas: <out>}."""
        self.ready()
        if out is None:
            from cq_prefect.paths import cq_home

            folder = cq_home() / "ideas"
            folder.mkdir(parents=True, exist_ok=True)
            out = str(folder / f"pi-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}.yaml")
        argv = ["pi", "--json", "--out", out, "--limit", str(limit)]
        argv += ["--space", space] if space else []
        argv += ["--force"] if force else []
        argv += [] if claude is None else (["--claude"] if claude else ["--no-claude"])
        result = self._cli_json([*argv, "--", text])
        if result.get("out"):
            proposer = json.dumps({"kind": "scripted", "ideas": result["out"]})
            result["next"] = f"cq_loop_start(config={{…, \"proposer\": {proposer}}})"
        return result

    def _cli_json(self, argv: list[str]) -> Any:
        """Run a `cq … --json` command in this process (the CLI's own code and messages); its JSON."""
        if self._parser is None:
            from cq_prefect.cli import build_parser

            self._parser = build_parser()
        with self._capture_lock:  # stdout is the process's: one captured command at a time
            out, err = io.StringIO(), io.StringIO()
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    args = self._parser.parse_args(argv)
            except SystemExit:
                raise BadInput(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else
                               f"bad arguments: {argv}") from None
            with contextlib.redirect_stdout(out):
                code = int(args.func(args) or 0)
        if code != 0:
            raise CqError(f"`cq {' '.join(argv[:2])}` ended with exit code {code}")
        return json.loads(out.getvalue())


_OUTCOMES = {"COMPLETED": "success", "FAILED": "failed", "CANCELLED": "cancelled", "CRASHED": "crashed",
             "RUNNING": "running", "CANCELLING": "running", "PENDING": "scheduled", "SCHEDULED": "scheduled"}
_LEVELS = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}


def _metric_values(mlflow_run) -> dict[str, dict[str, Any]]:
    """The latest value of each metric (the value at its highest step) with its unit."""
    from cq_prefect.tracking import UNIT_TAG_PREFIX

    tags = mlflow_run.data.tags
    return {key: {"value": value, "unit": tags.get(UNIT_TAG_PREFIX + key)}
            for key, value in sorted(mlflow_run.data.metrics.items())}


def _latest_points(mlflow_run) -> dict[str, Any]:
    """Each metric's latest point ({KEY: Metric with value, step, timestamp}), as MLflow's get_run answers.

    get_run sends one point per key (MLflow's latest metric: the highest step, then the newest timestamp).
    ``RunData.metrics`` keeps only their values; the points with their steps are in ``RunData._metric_objs``
    (mlflow 2 and 3). Should that go, each key still comes, without a step (None)."""
    latest: dict[str, Any] = {}
    for point in getattr(mlflow_run.data, "_metric_objs", None) or ():
        known = latest.get(point.key)
        if known is None or (point.step, point.timestamp) > (known.step, known.timestamp):
            latest[point.key] = point
    missing = [key for key in mlflow_run.data.metrics if key not in latest]
    if missing:
        from mlflow.entities import Metric

        latest.update({key: Metric(key, mlflow_run.data.metrics[key], timestamp=None, step=None) for key in missing})
    return dict(sorted(latest.items()))


def _json_safe(value: Any) -> Any:
    # cq_prefect.tracking.json_safe (NaN and ±inf as "nan", "inf", "-inf"), for tuples too.
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_cursor(flow_run_id: str, window: str | None, seen: list[str], shown: dict[str, Any]) -> str:
    data = json.dumps({"r": flow_run_id, "w": window, "s": seen, "m": shown}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")


def _read_cursor(since: str | None, flow_run_id: str) -> tuple[str | None, list[str], dict[str, Any]]:
    """(where to read from, ids of the records returned from there on, latest metric points shown) of a cursor.

    A point shown is [step, timestamp, value]; cursors written before steps were kept hold the value alone."""
    if not since:
        return None, [], {}
    try:
        data = json.loads(base64.urlsafe_b64decode(since + "=" * (-len(since) % 4)))
        window, seen, shown, run = data["w"], [str(i) for i in data["s"]], dict(data["m"]), data["r"]
        if window is not None:
            datetime.fromisoformat(window)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BadInput("since: that is not a cursor cq_hub_watch returned; pass the `cursor` of the previous call, "
                       "or leave since out to start from the run's first line") from None
    if run != flow_run_id:
        raise BadInput("since: that cursor belongs to another run; pass the cursor this run's last cq_hub_watch "
                       "returned, or leave since out to start from the first line")
    return window, seen, shown


# -- the MCP server -------------------------------------------------------------------------------

TOOLS = (  # (tool name, Hub method)
    ("cq_hub_submit", "submit"),
    ("cq_hub_watch", "watch"),
    ("cq_hub_status", "status"),
    ("cq_hub_cancel", "cancel"),
    ("cq_metrics", "metrics"),
    ("cq_hub_dag_from_yaml", "dag_from_yaml"),
    ("cq_loop_start", "loop_start"),
    ("cq_loop_status", "loop_status"),
    ("cq_loop_stop", "loop_stop"),
    ("cq_knowledge_search", "knowledge_search"),
    ("cq_pi", "pi"),
)


def aliases(tool: str) -> tuple[str, ...]:
    """The seed's names of a cq tool: its c4_ name, and any other the seed uses.

        >>> aliases("cq_metrics")
        ('c4_metrics', 'cq_hub_metrics', 'c4_hub_metrics')
    """
    return (ALIAS_PREFIX + tool.removeprefix("cq_"), *EXTRA_ALIASES.get(tool, ()))


def tool_names() -> list[str]:
    """Every tool name the server lists: the cq_ names and their aliases."""
    return [name for tool, _ in TOOLS for name in (tool, *aliases(tool))]


def _takes_a_run(method) -> bool:
    """Whether a tool's ``run`` argument is a run (``Run``): cq_hub_dag_from_yaml's is a flag."""
    return typing.get_type_hints(method, include_extras=True).get("run") == Run


def _error_result(message: str, kind: str, exit_code: int = 2):
    from mcp.types import CallToolResult, TextContent

    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True,
                          structured_content={"error": message, "kind": kind, "exit_code": exit_code})


def _guarded(name: str, method):
    """The Hub method as a tool: its result, or a tool error with the message the CLI would print."""

    @functools.wraps(method)
    def call(**arguments):
        try:
            return method(**arguments)
        except CqError as exc:
            return _error_result(str(exc), type(exc).__name__, exc.exit_code)
        except Exception as exc:  # a tool error, never a crashed server
            from cq_prefect.auth import refusal

            refused = refusal(exc)  # a 401/403 from inside Prefect's or MLflow's client: as `cq` says it
            if refused is not None:
                return _error_result(str(refused), type(refused).__name__, refused.exit_code)
            logger.exception("cq mcp: %s failed", name)
            return _error_result(f"{name} failed unexpectedly: {type(exc).__name__}: {exc}. The server goes on; if "
                                 "it persists, check the stack with `cq status`", type(exc).__name__, 1)

    return call


def build_server(hub: Hub):
    """The MCP server with every tool (and its c4_ alias) bound to ``hub``."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.server.mcpserver.tools import Tool
    from pydantic import ValidationError

    tools: dict[str, Any] = {}
    takes_a_run: set[str] = set()
    for name, attr in TOOLS:
        method = getattr(hub, attr)
        fn = _guarded(name, method)
        doc = " ".join((method.__doc__ or "").split())
        tools[name] = Tool.from_function(fn, name=name, description=doc)
        for alias in aliases(name):
            tools[alias] = Tool.from_function(fn, name=alias, description=f"Alias of {name} (the seed's name). {doc}")
        if _takes_a_run(getattr(Hub, attr)):  # the tool's interface is Hub's (a subclass may leave out hints)
            takes_a_run.update((name, *aliases(name)))

    class CqServer(MCPServer):
        async def call_tool(self, name, arguments, context=None):
            tool = tools.get(name)
            if tool is None:
                return _error_result(f"no tool '{name}'; cq's tools are: {', '.join(n for n, _ in TOOLS)} "
                                     f"(and each as {ALIAS_PREFIX}…)", "UnknownTool")
            if name in takes_a_run and RUN_ALIAS in (arguments or {}):
                arguments = dict(arguments)
                job_id = arguments.pop(RUN_ALIAS)
                if "run" in arguments and arguments["run"] != job_id:
                    return _error_result(f"{name}: run {arguments['run']!r} and job_id {job_id!r} name two runs; "
                                         "give one of them (job_id is the seed's name of run)", "BadInput")
                arguments["run"] = job_id
            known = tool.parameters.get("properties", {})
            unknown = sorted(set(arguments or {}) - set(known))
            if unknown:
                return _error_result(f"{name}: unknown argument{'s' if len(unknown) > 1 else ''} "
                                     f"{', '.join(repr(u) for u in unknown)}; its arguments are: {', '.join(known)}",
                                     "BadInput")
            try:
                return await super().call_tool(name, arguments, context)
            except ToolError as exc:
                if isinstance(exc.__cause__, ValidationError):
                    return _error_result(_describe_arguments(name, exc.__cause__, known), "BadInput")
                raise

    @contextlib.asynccontextmanager
    async def lifespan(_server):
        # Entered once the transport is up (stdio: after stdout is claimed for the protocol, so nothing the
        # warm-up prints can reach it; HTTP: as the app starts).
        hub.start()
        yield {}

    return CqServer(name="cq", instructions=INSTRUCTIONS, tools=list(tools.values()), log_level="WARNING",
                    lifespan=lifespan)


def _describe_arguments(tool: str, exc, properties: dict[str, Any]) -> str:
    """Pydantic's argument errors as one line an assistant can act on."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        top = str(error["loc"][0]) if error["loc"] else ""
        hint = properties.get(top, {}).get("description", "")
        if error["type"] == "missing":
            problems.append(f"'{where}' is required" + (f" — {hint}" if hint else ""))
        else:
            got = repr(error.get("input"))
            problems.append(f"{where}: {error['msg']} (got {got if len(got) <= 80 else got[:79] + '…'})")
    return f"{tool}: invalid arguments: " + "; ".join(problems)


# -- transports -----------------------------------------------------------------------------------


class BearerTokenAuth:
    """ASGI middleware: an HTTP request without ``Authorization: Bearer <token>`` gets 401 and reaches nothing.

    The token is compared with :func:`hmac.compare_digest` and never logged."""

    def __init__(self, app, token: str):
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: the session manager starts and stops with the server
            return await self.app(scope, receive, send)
        supplied = next((value for key, value in scope.get("headers", ()) if key == b"authorization"), b"")
        scheme, _, credentials = supplied.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token):
            return await self.app(scope, receive, send)
        reason = "no bearer token" if not supplied else "a wrong bearer token"
        client = scope.get("client") or ("?", 0)
        print(f"cq mcp: 401 for {scope.get('method')} {scope.get('path')} from {client[0]}: {reason}",
              file=sys.stderr, flush=True)
        body = json.dumps({"error": "unauthorized", "error_description": (
            "send the header `Authorization: Bearer <token>` with the token the server was started with "
            f"({TOKEN_ENV} or its --token-block)")}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="cq"')]})
        await send({"type": "http.response.body", "body": body})


def http_token(token_block: str | None) -> tuple[str, str]:
    """(the bearer token, where it came from): ``--token-block NAME`` or ``CQ_MCP_TOKEN``; bad input without.

    ``CQ_MCP_TOKEN`` leaves this process's environment here, before anything is started: the embedded stack,
    its worker and a loop run on this host inherit the environment, and a command can print it."""
    env_token = os.environ.pop(TOKEN_ENV, "").strip()
    if token_block:
        from cq_prefect.stack import connect, prefect_settings

        with prefect_settings(connect()):
            from prefect.blocks.system import Secret

            try:
                secret = Secret.load(token_block)
            except (ValueError, KeyError) as exc:
                raise BadInput(f"--token-block {token_block}: no Secret block of that name ({exc}); create it: "
                               f"python -c \"from prefect.blocks.system import Secret; Secret(value='…')"
                               f".save('{token_block}')\", or set {TOKEN_ENV} instead") from None
        token = str(secret.get()).strip()
        source = f"Secret block '{token_block}'"
    else:
        token, source = env_token, TOKEN_ENV
    if not token:
        raise BadInput(f"cq mcp --http needs a bearer token that clients must send: set {TOKEN_ENV}=<token> (e.g. "
                       f"`export {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`), or "
                       "give --token-block NAME, a Prefect Secret block holding it")
    if len(token) < 16:
        print(f"cq mcp: warning: the bearer token from {source} is short ({len(token)} characters); use 32 or more "
              "random characters", file=sys.stderr)
    return token, source


def transport_security(allowed_hosts: Sequence[str] = ()):
    """The Host/Origin check of the HTTP transport: None (the mcp package's own) or one allowing ``allowed_hosts``.

    The mcp package guards a server bound to 127.0.0.1, localhost or ::1 against DNS rebinding: a request whose
    Host header is not ``127.0.0.1:PORT``, ``localhost:PORT`` or ``[::1]:PORT`` gets 421, one with an Origin
    header other than ``http://`` those gets 403 (bound to any other address it checks neither). A reverse
    proxy that passes the public name as Host (``mcp.example.com``) is refused unless that name is allowed:
    ``cq mcp --allowed-host mcp.example.com`` (a Host header value: ``NAME``, ``NAME:PORT`` or ``NAME:*``).
    Given allowed hosts, the check is on whatever the bind address, and lets through the loopback names and those.

        >>> transport_security(["mcp.example.com"]).allowed_hosts
        ['127.0.0.1:*', 'localhost:*', '[::1]:*', 'mcp.example.com']
    """
    if not allowed_hosts:
        return None
    for name in allowed_hosts:
        if not name or "/" in name or any(c.isspace() for c in name):
            raise BadInput(f"--allowed-host {name!r}: give a Host header value such as mcp.example.com, "
                           "mcp.example.com:8443 or mcp.example.com:* (any port), without scheme or path")
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = [*LOOPBACK_HOSTS, *allowed_hosts]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=[f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")])


def serve(*, http: bool = False, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token_block: str | None = None,
          allowed_hosts: Sequence[str] = (), hub: Hub | None = None) -> int:
    """Serve the tools over stdio (default) or streamable HTTP at ``http://HOST:PORT/mcp``; returns an exit code."""
    security = transport_security(allowed_hosts) if http else None
    token, source = http_token(token_block) if http else (None, None)
    if http:
        _check_port(host, port)
    hub = hub or Hub()
    server = build_server(hub)  # its lifespan starts the hub's warm-up
    try:
        if not http:
            import anyio

            anyio.run(server.run_stdio_async)
            return 0
        import uvicorn

        app = BearerTokenAuth(server.streamable_http_app(host=host, transport_security=security), token)
        print(f"cq mcp: {len(tool_names())} tools at http://{host}:{port}/mcp (bearer token from {source})",
              file=sys.stderr, flush=True)
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)).run()
        return 0
    finally:
        hub.close()


def _check_port(host: str, port: int) -> None:
    import socket

    if not 0 < port < 65536:
        raise BadInput(f"--port {port}: give a port from 1 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BadInput(f"cannot listen on {host}:{port} ({exc.strerror or exc}); give another --port "
                           "(or --host)") from None
