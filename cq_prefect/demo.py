"""``cq demo``: the whole chain on the embedded stack, with a small real training run."""

from __future__ import annotations

import sys
from pathlib import Path

from cq_prefect.errors import SpecError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_demo(quick: bool = False) -> int:
    from cq_prefect.stack import connect
    from cq_prefect.submission import submit, watch

    workdir = EXAMPLES / "quickstart"
    if not (workdir / "train.py").exists():
        raise SpecError(f"the demo needs {workdir}/train.py; run cq demo from a checkout installed with `pip install -e .`")
    endpoints = connect()
    epochs = 15 if quick else 60
    print(f"cq demo: submitting a logistic-regression run ({epochs} epochs) to pool 'local'")
    handle = submit(
        name="demo-logreg",
        workdir=str(workdir),
        command=f"{sys.executable} train.py --epochs={epochs} --lr=0.5",
        params={"epochs": epochs, "lr": 0.5},
        tags=["demo"],
        endpoints=endpoints,
    )
    code = watch(handle)
    result = handle.result()
    print("\nMetrics (from MLflow):")
    for key, m in sorted(result.metrics.items()):
        print(f"  {key:12} final {m.final:8.4f}{m.unit or ''}  min {m.min:8.4f}  max {m.max:8.4f}  ({m.count} points)")
    print(f"\nPrefect UI: {endpoints.prefect_ui_url}/runs/flow-run/{handle.flow_run_id}")
    print(f"MLflow UI:  {endpoints.mlflow_ui_url}/#/experiments (run {handle.mlflow_run_id})")
    return code
