"""DAG YAML compiled to a Prefect flow: nodes as experiments, in dependency order, independent ones at once.

    >>> text = open("deployments/dags/seed-pipeline.yaml").read()                  # doctest: +SKIP
    >>> pipeline = dag_from_yaml(text, base_dir="deployments/dags")                 # doctest: +SKIP
    >>> pipeline(max_parallel=4)                                                    # doctest: +SKIP

A node with ``gpu_count > 0`` or a ``pool:`` becomes a child run of the experiment deployment on its pool
(a subflow of the DAG run in the UI); any other node runs inside its task in the DAG flow's process, with
the same line streaming, ``@key=value`` metrics and MLflow record
(:func:`cq_prefect.experiment.run_in_task`). Each node sits in a task named after it. MLflow: one parent
run per DAG run (in an MLflow experiment named after the DAG), one nested run per node attempt.

Checking and planning live in :mod:`cq_prefect.dag_spec` (no Prefect); this module is the Prefect shell.
"""

from __future__ import annotations

import contextvars
import json
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cq_prefect import tracking
from cq_prefect.dag_spec import Condition, Dag, load_dag, parse_dag
from cq_prefect.errors import BadInput, CqError, DagFailed, UnknownRun

DEFAULT_PARALLEL = 8
DAG_ENTRYPOINT = "cq_prefect.dag:dag_pipeline"
TAG_DAG = "cq.dag"
TAG_DAG_NODE = "cq.dag.node"
TAG_DAG_STATUS = "cq.dag.status"
TAG_DAG_ATTEMPT = "cq.dag.attempt"
TAG_FINGERPRINT = "cq.dag.fingerprint"
TAG_REUSED_FROM = "cq.dag.reused_from"  # the MLflow run whose result a resumed DAG run reused
TAG_REUSED_FROM_DAG_RUN = "cq.dag.reused_from_dag_run"
TAG_RESUMED_FROM = "cq.dag.resumed_from"
TAG_DAG_RUN = "cq.dag.run_id"  # the DAG run (Prefect flow-run id) a node run belongs to

NodeStatus = Literal["succeeded", "failed", "not_run", "skipped", "reused"]


class NodeResult(BaseModel):
    """How one node of a DAG run ended."""

    node: str
    status: NodeStatus
    attempts: int = 0
    exp_id: str | None = None
    flow_run_id: str | None = None
    mlflow_run_id: str | None = None
    duration_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Final value of every metric.")
    reason: str | None = Field(None, description="Why it failed, did not run, or where its result came from.")


class DagResult(BaseModel):
    """The outcome of a DAG run, node by node (file order)."""

    name: str
    flow_run_id: str
    mlflow_run_id: str
    nodes: list[NodeResult]

    @property
    def ok(self) -> bool:
        return all(n.status in ("succeeded", "reused", "skipped") for n in self.nodes)

    def summary(self) -> str:
        failed = [n for n in self.nodes if n.status == "failed"]
        not_run = [n for n in self.nodes if n.status == "not_run"]
        parts = [f"DAG {self.name}: " + ", ".join(
            f"{sum(n.status == s for n in self.nodes)} {s.replace('_', ' ')}"
            for s in ("succeeded", "reused", "skipped", "failed", "not_run") if any(n.status == s for n in self.nodes)
        )]
        parts += [f"  failed: {n.node} — {n.reason}" for n in failed]
        parts += [f"  not run: {n.node} — {n.reason}" for n in not_run]
        return "\n".join(parts)


# -- the runnable flow ----------------------------------------------------------------------------


def dag_from_yaml(yaml_content: str, *, base_dir: str | Path | None = None, source: str = "<dag>"):
    """Check DAG YAML and return a Prefect flow named after the DAG; calling it runs the DAG here.

    ``base_dir`` (default: the current folder) anchors relative ``working_dir``s. Bad YAML raises
    :class:`~cq_prefect.errors.DagError` (every problem with its line) before anything is created. The
    flow's parameters: ``resume`` (a previous run of this DAG: re-run only what did not succeed or
    changed), ``max_parallel`` (nodes at once), ``pool`` (default pool of GPU nodes).
    """
    from prefect import flow

    dag = parse_dag(yaml_content, source)
    folder = str(Path(base_dir or os.getcwd()).expanduser().absolute())

    def run(resume: str | None = None, max_parallel: int = DEFAULT_PARALLEL, pool: str | None = None) -> DagResult:
        return run_dag(dag, yaml_content, folder, resume=resume, max_parallel=max_parallel, pool=pool)

    run.__doc__ = dag.description or f"The DAG {dag.name}"
    return flow(run, name=dag.name, description=dag.description, persist_result=False, log_prints=False)


def _pipeline(
    dag: str, base_dir: str | None = None, resume: str | None = None, max_parallel: int = DEFAULT_PARALLEL,
    pool: str | None = None,
) -> DagResult:
    """Run a DAG given as YAML text or as the path of a YAML file (on the host that runs the flow).

    Args:
        dag: the DAG's YAML, or the path of a DAG file.
        base_dir: folder that relative working_dirs are relative to (default: the DAG file's folder).
        resume: a previous run of this DAG (flow-run id or name): re-run only what did not succeed there.
        max_parallel: most nodes running at once.
        pool: default work pool of nodes with gpu_count > 0.
    """
    if "\n" not in dag and dag.strip().endswith((".yaml", ".yml")):
        path = Path(dag).expanduser()
        spec, content = load_dag(path), path.read_text(encoding="utf-8")
        base_dir = base_dir or str(path.absolute().parent)
    else:
        spec, content = parse_dag(dag), dag
    return run_dag(spec, content, str(Path(base_dir or os.getcwd()).absolute()), resume=resume,
                   max_parallel=max_parallel, pool=pool)


def _make_pipeline_flow():
    from prefect import flow

    return flow(_pipeline, name="cq-dag", persist_result=False, log_prints=False)


dag_pipeline = _make_pipeline_flow()  # the deployable entrypoint; deployments give its runs the DAG's flow


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class _Context:
    dag: Dag
    base_dir: str
    flow_run_id: str
    short: str
    parent_run_id: str
    tracking_uri: str
    pool: str | None
    endpoints: Any
    results: dict[str, NodeResult] = field(default_factory=dict)
    tails: list[threading.Thread] = field(default_factory=list)  # CPU nodes' subflows finishing their records
    remote: set[str] = field(default_factory=set)  # flow-run ids of child runs on pools, while they run


def _endpoints():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    from cq_prefect.stack import Endpoints

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise BadInput("MLFLOW_TRACKING_URI is not set; run the DAG with `cq dag run` (or export the MLflow URI)")
    return Endpoints(PREFECT_API_URL.value() or "", PREFECT_UI_URL.value() or "", uri, uri)


def run_dag(dag: Dag, content: str, base_dir: str, *, resume: str | None = None,
            max_parallel: int = DEFAULT_PARALLEL, pool: str | None = None) -> DagResult:
    """The body of a DAG flow run (callable only inside one)."""
    from prefect import get_run_logger
    from prefect.context import FlowRunContext

    from cq_prefect.crash import heartbeats

    if max_parallel < 1:
        raise BadInput(f"max_parallel {max_parallel}: give at least 1 (nodes at once)")
    logger = get_run_logger()
    flow_run = FlowRunContext.get().flow_run
    endpoints = _endpoints()
    mlflow = tracking.client(endpoints.mlflow_tracking_uri)
    previous = _previous_run(mlflow, dag, resume, endpoints) if resume else None
    parent_run_id, recording = _parent_run(mlflow, dag, content, flow_run, previous)
    if recording is None and previous is None:  # this DAG run is retried: what it finished stands
        previous = _records(mlflow, tracking.experiment_id(mlflow, dag.name), parent_run_id, str(flow_run.id))
        logger.info("DAG %s: retry %d of this run; nodes that succeeded before are not run again", dag.name,
                    flow_run.run_count - 1)
    ctx = _Context(dag, base_dir, str(flow_run.id), str(flow_run.id)[:6], parent_run_id,
                   endpoints.mlflow_tracking_uri, pool, endpoints)
    logger.info("DAG %s → MLflow run %s\n%s", dag.name, parent_run_id, dag.plan_text())
    with heartbeats():  # the DAG run, too, is Crashed when its process dies (cq_prefect.crash)
        try:
            _schedule(ctx, previous or {}, max_parallel, logger)
        except BaseException:  # cancelled or crashing: children must not run on unobserved
            for flow_run_id in list(ctx.remote):
                _cancel(flow_run_id)
            _close_parent(mlflow, ctx, "KILLED")
            raise  # CPU nodes' command trees die with this process (cq_prefect.supervisor)
        result = DagResult(name=dag.name, flow_run_id=ctx.flow_run_id, mlflow_run_id=parent_run_id,
                           nodes=[ctx.results[n.name] for n in dag.nodes])
        _publish(result)  # while the last nodes finish their records
        logger.info("%s", result.summary())
        for thread in [*ctx.tails, *([recording] if recording else [])]:
            thread.join()
    _close_parent(mlflow, ctx, "FINISHED" if result.ok else "FAILED")
    if not result.ok:
        raise DagFailed(result.summary())
    return result


def _schedule(ctx: _Context, previous: dict[str, dict], max_parallel: int, logger) -> None:
    """Start every node whose sources are done, at most ``max_parallel`` at once, until all have ended."""
    dag = ctx.dag
    reuse = _reusable(dag, ctx.base_dir, previous)
    done: queue.Queue[str] = queue.Queue()
    running: dict[str, Any] = {}
    order = [n.name for n in dag.nodes]
    while len(ctx.results) < len(order):
        progressed = False
        for name in order:
            if name in ctx.results or name in running:
                continue
            verdict = _readiness(ctx, name)
            if verdict is None:
                continue  # a source is still pending or running
            progressed = True
            status, reason = verdict
            if status != "ready":
                ctx.results[name] = NodeResult(node=name, status=status, reason=reason)
                logger.warning("%s: not run — %s", name, reason) if status == "not_run" else logger.info(
                    "%s: skipped — %s", name, reason)
                continue
            if name in reuse:
                ctx.results[name] = _record_reuse(ctx, name, reuse[name])
                logger.info("%s: unchanged and succeeded in %s — reused (MLflow run %s)", name,
                            reuse[name]["dag_run"], ctx.results[name].reason)
                continue
            if len(running) >= max_parallel:
                continue
            future = node_task.with_options(task_run_name=name).submit(ctx, name)
            future.add_done_callback(lambda _f, name=name: done.put(name))
            running[name] = future
        if len(ctx.results) == len(order):
            break
        if not running:
            if not progressed:  # cannot happen for a checked DAG; never spin
                raise CqError(f"DAG {dag.name}: nothing can run and nothing is running")
            continue
        finished = done.get()
        future = running.pop(finished)
        future.wait()  # the task's final state from its thread (the server hears of it a little later)
        state = future.state
        if state.is_completed():
            ctx.results[finished] = future.result()
        else:  # the task itself broke (not the command: that is a NodeResult)
            ctx.results[finished] = NodeResult(node=finished, status="failed", reason=f"{state.name}: {state.message}")


def _readiness(ctx: _Context, name: str) -> tuple[str, str] | None:
    """None while a source has not ended; else ("ready", "") or (not_run|skipped, why)."""
    for edge in ctx.dag.sources(name):
        source = ctx.results.get(edge.source)
        if source is None:
            return None
        if source.status in ("failed", "not_run"):
            return "not_run", f"upstream {edge.source} {'failed' if source.status == 'failed' else 'did not run'}"
        if source.status == "skipped":
            return "skipped", f"upstream {edge.source} was skipped"
    for edge in ctx.dag.sources(name):
        if edge.when:
            holds, why = Condition(edge.when).holds(ctx.results[edge.source].metrics)
            if not holds:
                return "skipped", f"when: on {edge.source}: {why}"
    return "ready", ""


def _node_env(ctx: _Context, name: str) -> dict[str, str]:
    upstream = {
        e.source: ctx.results[e.source].metrics for e in ctx.dag.sources(name) if e.kind == "data_dependency"
    }
    env = {"CQ_DAG_NAME": ctx.dag.name, "CQ_DAG_RUN_ID": ctx.flow_run_id, "CQ_DAG_NODE": name}
    if upstream:
        env["CQ_UPSTREAM_METRICS"] = json.dumps(upstream, sort_keys=True)
    return env


def _run_node(ctx: _Context, name: str) -> NodeResult:
    """The body of a node's task: every attempt of the node as an experiment; never raises for a bad run."""
    from prefect import get_run_logger

    from cq_prefect.spec import ExperimentSpec

    logger = get_run_logger()
    dag, settings = ctx.dag, ctx.dag.effective(name, ctx.base_dir)
    pool = settings["pool"] or (ctx.pool if settings["gpu_count"] > 0 else None)
    remote = settings["gpu_count"] > 0 or pool is not None
    attempts = settings["max_retries"] + 1
    result = None
    for attempt in range(1, attempts + 1):
        exp_id = f"{name}-{ctx.short}" + (f"-a{attempt}" if attempt > 1 else "")
        spec = ExperimentSpec(
            name=f"{name}" + (f" (attempt {attempt})" if attempt > 1 else ""),
            workdir=settings["workdir"],
            command=settings["command"],
            gpu_count=settings["gpu_count"],
            exp_id=exp_id,
            env={**settings["env"], **_node_env(ctx, name)},
            tags=list(dag.tags),
            timeout=settings["timeout"],
            mlflow_experiment=dag.name,
        )
        tags = {
            "mlflow.parentRunId": ctx.parent_run_id, TAG_DAG: dag.name, TAG_DAG_NODE: name,
            TAG_DAG_ATTEMPT: str(attempt), TAG_FINGERPRINT: dag.fingerprint(name, ctx.base_dir),
            TAG_DAG_RUN: ctx.flow_run_id,
        }
        logger.info("%s: attempt %d/%d as %s%s", name, attempt, attempts, exp_id,
                    f" on pool {pool or 'default'} ({spec.gpu_count} GPUs)" if remote else " in this process")
        started = time.monotonic()
        experiment = _run_remote(ctx, spec, pool, tags) if remote else _run_local(ctx, spec, tags)
        ok = experiment.outcome == "success"
        status = "succeeded" if ok else "failed"
        mlflow = tracking.client(ctx.tracking_uri)
        try:
            mlflow.set_tag(experiment.mlflow_run_id, TAG_DAG_STATUS, status)
        except Exception:  # the run's own record stands; the DAG's view of it is a convenience
            logger.warning("Could not tag MLflow run %s", experiment.mlflow_run_id)
        metrics = {k: m.final for k, m in experiment.metrics.items()}
        reason = None if ok else _failure(experiment, attempt)
        result = NodeResult(
            node=name, status=status, attempts=attempt, exp_id=exp_id, flow_run_id=experiment.flow_run_id,
            mlflow_run_id=experiment.mlflow_run_id, duration_s=round(time.monotonic() - started, 3),
            metrics=metrics, reason=reason,
        )
        if ok:
            logger.info("%s: succeeded%s", name, "".join(f" @{k}={v:g}" for k, v in sorted(metrics.items())))
            return result
        logger.warning("%s: attempt %d failed — %s", name, attempt, _first_line(reason))
    return result


def _failure(experiment, attempt: int) -> str:
    if experiment.outcome == "failed" and experiment.exit_code is not None:
        why = f"exited with code {experiment.exit_code}"
    elif experiment.outcome == "timeout":
        why = _first_line(experiment.message).split(": ")[-1] or "timed out"
    else:
        why = experiment.outcome + (f": {_first_line(experiment.message)}" if experiment.message else "")
    return why + (f" (attempt {attempt})" if attempt > 1 else "") + f"; see `cq watch {experiment.exp_id}`"


def _first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]


def _run_local(ctx: _Context, spec, tags: dict[str, str]):
    """The node as an experiment inside its task, in this process (CPU nodes): the same line streaming,
    ``@key=value`` metrics and MLflow record as the ``experiment`` flow, its lines in the DAG run's log
    under the node's task (:func:`cq_prefect.experiment.run_in_task`).

    Returns as soon as the command has ended and its output is parsed (outcome and final metrics are
    known then); the bookkeeping (flushes, artifacts, MLflow status) goes on in its thread, so the node's
    slot and its downstream nodes do not wait for it. :func:`run_dag` joins those threads.
    """
    from cq_prefect.experiment import command_ended, run_in_task
    from cq_prefect.spec import ExperimentResult

    mlflow = tracking.client(ctx.tracking_uri)
    run_id = tracking.create_experiment_run(mlflow, spec, spec.exp_id, tags, scheduled=False)
    ended: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def body() -> None:
        command_ended.set(ended.put)
        try:
            box["result"] = run_in_task(spec, run_id)
        except BaseException as exc:  # a failed command arrives as its early result; this is what precedes it
            box["error"] = exc
        finally:
            ended.put(None)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(body,), name=f"cq-dag-{spec.exp_id}",
                              daemon=True)
    thread.start()
    early = ended.get()
    if early is not None:
        ctx.tails.append(thread)
        return early
    thread.join()
    if "result" in box:
        return box["result"]
    error = box.get("error")
    outcome = "failed" if isinstance(error, CqError) else "crashed"
    try:
        mlflow.set_tag(run_id, tracking.TAG_OUTCOME, outcome)
        mlflow.set_terminated(run_id, status="FAILED")
    except Exception:
        pass  # the node's result below is what the DAG goes on
    return ExperimentResult(exp_id=spec.exp_id, name=spec.name, outcome=outcome, mlflow_run_id=run_id,
                            message=f"{type(error).__name__}: {error}")


def _run_remote(ctx: _Context, spec, pool: str | None, tags: dict[str, str]):
    """The node as a child run of the experiment deployment on its pool (GPU nodes, pool: nodes)."""
    from prefect.context import TaskRunContext

    from cq_prefect.submission import submit

    task_run = TaskRunContext.get().task_run
    handle = submit(spec, pool=pool, endpoints=ctx.endpoints, mlflow_tags=tags, parent_task_run_id=task_run.id)
    ctx.remote.add(handle.flow_run_id)
    try:
        return handle.wait(poll_interval=1.0)
    except BaseException:  # the DAG run is going away (cancelled): its child must not run on unobserved
        _cancel(handle.flow_run_id)
        raise
    finally:
        ctx.remote.discard(handle.flow_run_id)


def _cancel(flow_run_id: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(uuid.UUID(flow_run_id), Cancelling(message="its DAG run ended"), force=True)
    except Exception:
        pass  # the server's cancellation clean-up cancels children of a cancelled run as well


def _make_node_task():
    from prefect import task

    from prefect.cache_policies import NO_CACHE

    return task(_run_node, name="dag-node", persist_result=False, log_prints=False, retries=0, cache_policy=NO_CACHE)


node_task = _make_node_task()


# -- MLflow records and resume ----------------------------------------------------------------------


def _parent_run(mlflow, dag: Dag, content: str, flow_run, previous) -> tuple[str, threading.Thread | None]:
    """The DAG run's MLflow run (found again when the flow run is retried), and the thread uploading dag.yaml."""
    from mlflow.entities import Param, RunTag

    flow_run_id, flow_run_name = str(flow_run.id), flow_run.name
    experiment_ids = [tracking.experiment_id(mlflow, dag.name)]
    if flow_run.run_count > 1:  # a retry of this DAG run: its MLflow run exists
        found = mlflow.search_runs(experiment_ids, max_results=1, filter_string=(
            f"tags.`{tracking.TAG_FLOW_RUN_ID}` = '{flow_run_id}' and tags.`{TAG_DAG}` = '{dag.name}' "
            "and tags.`cq.kind` = 'dag'"))
        if found:
            mlflow.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id, None
    tags = {
        TAG_DAG: dag.name, "cq.kind": "dag", tracking.TAG_FLOW_RUN_ID: flow_run_id,
        tracking.TAG_FLOW_RUN_NAME: flow_run_name, **{t: "true" for t in dag.tags},
    }
    if dag.description:
        tags["mlflow.note.content"] = dag.description
    if previous is not None:
        tags[TAG_RESUMED_FROM] = previous.get("__dag_run__", "")
    run = mlflow.create_run(experiment_ids[0], run_name=f"{dag.name} ({flow_run_name})", tags=tags)
    def record() -> None:  # off the path to the first node's start
        mlflow.log_batch(run.info.run_id, params=[Param("nodes", str(len(dag.nodes))),
                                                  Param("dependencies", str(len(dag.edges())))],
                         tags=[RunTag(TAG_DAG_STATUS, "running")])
        mlflow.log_text(run.info.run_id, content, "dag.yaml")

    thread = threading.Thread(target=record, name="cq-dag-record", daemon=True)
    thread.start()
    return run.info.run_id, thread


def _close_parent(mlflow, ctx: _Context, status: str) -> None:
    from mlflow.entities import RunTag

    counts: dict[str, int] = {}
    for result in ctx.results.values():
        counts[result.status] = counts.get(result.status, 0) + 1
    tags = [RunTag(TAG_DAG_STATUS, {"FINISHED": "succeeded", "FAILED": "failed"}.get(status, "cancelled"))]
    tags += [RunTag(f"cq.dag.nodes_{k}", str(v)) for k, v in counts.items()]
    try:
        mlflow.log_batch(ctx.parent_run_id, tags=tags)
        mlflow.set_terminated(ctx.parent_run_id, status=status)
    except Exception:
        pass  # the nodes' runs hold the results; the parent's status is a summary


def _previous_run(mlflow, dag: Dag, run: str, endpoints) -> dict[str, dict]:
    """What a previous run of this DAG left: per node, its last record (status, fingerprint, metrics, origin)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from cq_prefect.stack import prefect_settings

    flow_run_id = None
    with prefect_settings(endpoints), get_client(sync_client=True) as client:
        try:
            flow_run_id = str(client.read_flow_run(uuid.UUID(run)).id)
        except Exception:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run])), limit=1)
            flow_run_id = str(runs[0].id) if runs else None
    experiment = mlflow.get_experiment_by_name(dag.name)
    parents = []
    if experiment is not None and flow_run_id:
        parents = mlflow.search_runs([experiment.experiment_id], max_results=1, filter_string=(
            f"tags.`{tracking.TAG_FLOW_RUN_ID}` = '{flow_run_id}' and tags.`{TAG_DAG}` = '{dag.name}' "
            "and tags.`cq.kind` = 'dag'"))
    if not parents:
        raise UnknownRun(
            f"--resume {run}: no run of DAG '{dag.name}' with that flow-run id or name; list them with "
            f"`prefect flow-run ls --flow-name {dag.name}`"
        )
    return _records(mlflow, experiment.experiment_id, parents[0].info.run_id, flow_run_id)


def _records(mlflow, experiment_id: str, parent_run_id: str, flow_run_id: str) -> dict[str, dict]:
    """Per node, the last record under DAG run ``parent_run_id``."""
    children = mlflow.search_runs([experiment_id], max_results=5000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    records: dict[str, dict] = {"__dag_run__": flow_run_id}
    for child in children:
        tags = child.data.tags
        node = tags.get(TAG_DAG_NODE)
        if not node:
            continue
        attempt = int(tags.get(TAG_DAG_ATTEMPT, "0") or 0)
        if node in records and records[node]["attempt"] > attempt:
            continue
        records[node] = {
            "attempt": attempt,
            "status": tags.get(TAG_DAG_STATUS, ""),
            "fingerprint": tags.get(TAG_FINGERPRINT, ""),
            "metrics": dict(child.data.metrics),
            "origin": tags.get(TAG_REUSED_FROM) or child.info.run_id,
            "dag_run": tags.get(TAG_REUSED_FROM_DAG_RUN) or flow_run_id,
            "exp_id": tags.get(tracking.TAG_EXP_ID),
            "flow_run_id": tags.get(tracking.TAG_FLOW_RUN_ID),
        }
    return records


def _reusable(dag: Dag, base_dir: str, previous: dict[str, dict]) -> dict[str, dict]:
    """Nodes whose previous result stands: they succeeded, their spec is unchanged, and so are all upstream."""
    rerun = {
        n.name for n in dag.nodes
        if previous.get(n.name, {}).get("status") not in ("succeeded", "reused")
        or previous[n.name]["fingerprint"] != dag.fingerprint(n.name, base_dir)
    }
    rerun = dag.downstream(rerun)
    return {n.name: previous[n.name] for n in dag.nodes if n.name not in rerun}


def _record_reuse(ctx: _Context, name: str, record: dict) -> NodeResult:
    """A nested run that points at the result it reuses (and carries its final metrics, for conditions)."""
    from mlflow.entities import Metric, RunTag

    mlflow = tracking.client(ctx.tracking_uri)
    tags = {
        "mlflow.parentRunId": ctx.parent_run_id, TAG_DAG: ctx.dag.name, TAG_DAG_NODE: name, TAG_DAG_ATTEMPT: "0",
        TAG_FINGERPRINT: record["fingerprint"], TAG_DAG_STATUS: "reused", TAG_REUSED_FROM: record["origin"],
        TAG_REUSED_FROM_DAG_RUN: record["dag_run"], TAG_DAG_RUN: ctx.flow_run_id,
        tracking.TAG_EXP_ID: record.get("exp_id") or "",
    }
    run = mlflow.create_run(tracking.experiment_id(mlflow, ctx.dag.name), run_name=f"{name} (reused)", tags=tags)
    now = int(time.time() * 1000)
    metrics = {k: float(v) for k, v in record["metrics"].items()}
    mlflow.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(tracking.TAG_OUTCOME, "reused")])
    mlflow.set_terminated(run.info.run_id, status="FINISHED")
    return NodeResult(node=name, status="reused", exp_id=record.get("exp_id"), flow_run_id=record.get("flow_run_id"),
                      mlflow_run_id=record["origin"], metrics=metrics,
                      reason=f"reused from MLflow run {record['origin']} (DAG run {record['dag_run']})")


def _publish(result: DagResult) -> None:
    """The DAG run's node table as a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {
            "node": n.node, "status": n.status, "attempts": n.attempts, "exp_id": n.exp_id or "",
            "duration_s": "" if n.duration_s is None else f"{n.duration_s:.1f}",
            "metrics": " ".join(f"{k}={v:.6g}" for k, v in sorted(n.metrics.items())),
            "note": _first_line(n.reason), "mlflow_run_id": n.mlflow_run_id or "",
        }
        for n in result.nodes
    ]
    key = "dag-" + "".join(c if c.isalnum() else "-" for c in result.name.lower())
    try:
        create_table_artifact(rows, key=key[:100], description=f"DAG {result.name}: one row per node")
    except Exception:
        pass  # the UI table must never fail the DAG
