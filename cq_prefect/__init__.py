"""cq-prefect: autonomous ML experimentation as a plugin on Prefect 3, with metrics in MLflow.

    >>> import cq_prefect
    >>> handle = cq_prefect.submit(name="baseline", workdir="/work/pose", command="python train.py")  # doctest: +SKIP
    >>> handle.wait().metric("mpjpe")                                                                 # doctest: +SKIP

Attributes load on first use, so ``import cq_prefect`` (and the ``cq`` CLI) start without importing
Prefect or MLflow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "submit": "cq_prefect.submission",
    "resolve": "cq_prefect.submission",
    "watch": "cq_prefect.submission",
    "ExperimentHandle": "cq_prefect.submission",
    "ExperimentSpec": "cq_prefect.spec",
    "ExperimentResult": "cq_prefect.spec",
    "MetricStats": "cq_prefect.spec",
    "experiment": "cq_prefect.experiment",
    "MetricParser": "cq_prefect.metric_syntax",
    "MetricPoint": "cq_prefect.metric_syntax",
    "MetricLogHandler": "cq_prefect.metric_handler",
    "MlflowSink": "cq_prefect.mlflow_sink",
    "CqError": "cq_prefect.errors",
    "BadInput": "cq_prefect.errors",
    "SpecError": "cq_prefect.errors",
    "UnknownRun": "cq_prefect.errors",
    "StackError": "cq_prefect.errors",
    "ExperimentFailed": "cq_prefect.errors",
    "ExperimentTimedOut": "cq_prefect.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from cq_prefect.errors import (BadInput, CqError, ExperimentFailed, ExperimentTimedOut, SpecError,
                                   StackError, UnknownRun)
    from cq_prefect.experiment import experiment
    from cq_prefect.metric_handler import MetricLogHandler
    from cq_prefect.metric_syntax import MetricParser, MetricPoint
    from cq_prefect.mlflow_sink import MlflowSink
    from cq_prefect.spec import ExperimentResult, ExperimentSpec, MetricStats
    from cq_prefect.submission import ExperimentHandle, resolve, submit, watch


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cq_prefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

