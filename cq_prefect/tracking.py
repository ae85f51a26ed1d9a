"""The MLflow side of an experiment: runs, their tags, and reading metrics back.

Tag names cq writes on every experiment run (users query them in the MLflow UI):

    cq.exp_id, cq.prefect.flow_run_id, cq.prefect.flow_run_name, cq.prefect.flow_run_url,
    cq.git.commit, cq.git.dirty, cq.host, cq.gpu_ids, cq.command, cq.workdir,
    cq.outcome, cq.exit_code, cq.duration_s, cq.unit.<KEY>
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cq_prefect.spec import ExperimentSpec, MetricStats

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TAG_EXP_ID = "cq.exp_id"
TAG_FLOW_RUN_ID = "cq.prefect.flow_run_id"
TAG_FLOW_RUN_NAME = "cq.prefect.flow_run_name"
TAG_FLOW_RUN_URL = "cq.prefect.flow_run_url"
TAG_OUTCOME = "cq.outcome"
TAG_EXIT_CODE = "cq.exit_code"
TAG_DURATION = "cq.duration_s"
TAG_GPU_IDS = "cq.gpu_ids"
UNIT_TAG_PREFIX = "cq.unit."
RESULT_ARTIFACT = "cq_result.json"  # the flow's ExperimentResult: reading a result needs no metric history


def client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


_EXPERIMENT_IDS: dict[tuple[str, str], str] = {}


def experiment_id(mlflow: MlflowClient, name: str, cached: bool = False) -> str:
    """The id of MLflow experiment ``name``, created when missing (``cached``: remembered per process, for
    callers that create many runs and retry once with ``cached=False`` when the experiment is gone)."""
    from mlflow.exceptions import MlflowException

    key = (mlflow.tracking_uri, name)
    if cached and key in _EXPERIMENT_IDS:
        return _EXPERIMENT_IDS[key]
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        _EXPERIMENT_IDS[key] = found.experiment_id
        return found.experiment_id
    try:
        _EXPERIMENT_IDS[key] = mlflow.create_experiment(name)
    except MlflowException:  # created concurrently by another process
        _EXPERIMENT_IDS[key] = mlflow.get_experiment_by_name(name).experiment_id
    return _EXPERIMENT_IDS[key]


def create_experiment_run(
    mlflow: MlflowClient, spec: ExperimentSpec, exp_id: str, extra_tags: dict[str, str] | None = None,
    scheduled: bool = True,
) -> str:
    """Create the MLflow run of an experiment with its params and user tags: status SCHEDULED, or RUNNING
    for a run that starts at once (``scheduled=False``: one MLflow request less before it starts).

    ``extra_tags`` are cq's own (e.g. ``mlflow.parentRunId`` to nest the run under a DAG's run)."""
    from mlflow.exceptions import MlflowException

    tags = {
        **spec.mlflow_tags(), TAG_EXP_ID: exp_id, "cq.command": spec.command[:5000], "cq.workdir": spec.workdir,
        **(extra_tags or {}),
    }
    try:
        run = mlflow.create_run(experiment_id(mlflow, spec.mlflow_experiment, cached=True), run_name=spec.name, tags=tags)
    except MlflowException:  # the remembered experiment was deleted meanwhile
        run = mlflow.create_run(experiment_id(mlflow, spec.mlflow_experiment), run_name=spec.name, tags=tags)
    from mlflow.entities import Param

    params = [Param(key, str(value)[:6000]) for key, value in spec.params.items()]
    for start in range(0, len(params), 100):
        mlflow.log_batch(run.info.run_id, params=params[start : start + 100])
    if scheduled:
        mlflow.update_run(run.info.run_id, status="SCHEDULED")
    return run.info.run_id


def find_run(mlflow: MlflowClient, tag: str, value: str, experiment_names: list[str] | None = None):
    """The newest MLflow run whose tag ``tag`` equals ``value``, or None."""
    from mlflow.entities import ViewType

    if experiment_names:
        ids = [e.experiment_id for e in (mlflow.get_experiment_by_name(n) for n in experiment_names) if e]
    else:
        ids = [e.experiment_id for e in mlflow.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not ids:
        return None
    quoted = value.replace("'", "\\'")
    runs = mlflow.search_runs(ids, filter_string=f"tags.`{tag}` = '{quoted}'", max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def ensure_flow_run_mlflow_run(
    tracking_uri: str, flow_run_id: str, flow_run_name: str | None = None, flow_name: str | None = None
) -> tuple[str, bool]:
    """The MLflow run recording Prefect flow run ``flow_run_id``: (run id, whether it was created now)."""
    mlflow = client(tracking_uri)
    found = find_run(mlflow, TAG_FLOW_RUN_ID, flow_run_id)
    if found is not None:
        return found.info.run_id, False
    name = os.environ.get("CQ_MLFLOW_EXPERIMENT", "cq")
    tags = {TAG_FLOW_RUN_ID: flow_run_id}
    if flow_run_name:
        tags[TAG_FLOW_RUN_NAME] = flow_run_name
    if flow_name:
        tags["cq.prefect.flow_name"] = flow_name
    run = mlflow.create_run(experiment_id(mlflow, name), run_name=flow_run_name or flow_run_id, tags=tags)
    return run.info.run_id, True


def git_state(workdir: str | Path) -> dict[str, str]:
    """The workdir's git commit and dirty flag as tags (empty outside a git repository)."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=workdir, capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"cq.git.commit": commit, "cq.git.dirty": str(dirty).lower(), "mlflow.source.git.commit": commit}


def host_tags() -> dict[str, str]:
    gpu_ids = os.environ.get("CQ_GPU_IDS", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    return {"cq.host": socket.gethostname(), TAG_GPU_IDS: gpu_ids}


def read_metrics(mlflow: MlflowClient, run_id: str, history: bool = False) -> dict[str, dict[str, Any]]:
    """Every metric of a run: final (value at the highest step), min, max, count, unit [, history]."""
    run = mlflow.get_run(run_id)
    units = {k[len(UNIT_TAG_PREFIX) :]: v for k, v in run.data.tags.items() if k.startswith(UNIT_TAG_PREFIX)}
    result: dict[str, dict[str, Any]] = {}
    for key in sorted(run.data.metrics):
        points = mlflow.get_metric_history(run_id, key)
        points.sort(key=lambda m: (m.step, m.timestamp))
        values = [m.value for m in points if not math.isnan(m.value)]
        entry: dict[str, Any] = {
            "final": points[-1].value if points else math.nan,
            "min": min(values) if values else math.nan,
            "max": max(values) if values else math.nan,
            "count": len(points),
            "unit": units.get(key),
        }
        if history:
            entry["history"] = [[m.step, m.value] for m in points]
        result[key] = entry
    return result


def metric_stats(metrics: dict[str, dict[str, Any]]) -> dict[str, MetricStats]:
    return {
        key: MetricStats(final=m["final"], min=m["min"], max=m["max"], count=m["count"], unit=m["unit"])
        for key, m in metrics.items()
    }


def json_safe(value: Any) -> Any:
    """Replace NaN / ±inf (not valid JSON) by the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
