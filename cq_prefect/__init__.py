"""cq-prefect: autonomous ML experimentation as a plugin on Prefect 3, with metrics in MLflow.

    >>> import cq_prefect
    >>> handle = cq_prefect.submit(name="baseline", workdir="/work/pose", command="python train.py")  # doctest: +SKIP
    >>> handle.wait().metric("mpjpe")                                                                 # doctest: +SKIP

Attributes load on first use, so ``import cq_prefect`` (and the ``cq`` CLI) start without importing
Prefect or MLflow.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "dag_from_yaml": "cq_prefect.dag",
    "DagResult": "cq_prefect.dag",
    "DagFailed": "cq_prefect.errors",
    "parse_dag": "cq_prefect.dag_spec",
    "load_dag": "cq_prefect.dag_spec",
    "Dag": "cq_prefect.dag_spec",
    "DagError": "cq_prefect.errors",
    "MetricParser": "cq_prefect.metric_syntax",
    "MetricPoint": "cq_prefect.metric_syntax",
    "MetricLogHandler": "cq_prefect.metric_handler",
    "MlflowSink": "cq_prefect.mlflow_sink",
    "research_loop": "cq_prefect.loop",
    "LoopResult": "cq_prefect.loop",
    "LoopConfig": "cq_prefect.loop_config",
    "LoopConfigError": "cq_prefect.errors",
    "MetricNeverPrinted": "cq_prefect.errors",
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
    from cq_prefect.dag import DagResult, dag_from_yaml
    from cq_prefect.dag_spec import Dag, load_dag, parse_dag
    from cq_prefect.errors import (BadInput, CqError, DagError, DagFailed, ExperimentFailed, ExperimentTimedOut, SpecError,
                                   StackError, UnknownRun)
    from cq_prefect.errors import LoopConfigError, MetricNeverPrinted
    from cq_prefect.experiment import experiment
    from cq_prefect.loop import LoopResult, research_loop
    from cq_prefect.loop_config import LoopConfig
    from cq_prefect.metric_handler import MetricLogHandler
    from cq_prefect.metric_syntax import MetricParser, MetricPoint
    from cq_prefect.mlflow_sink import MlflowSink
    from cq_prefect.spec import ExperimentResult, ExperimentSpec, MetricStats
    from cq_prefect.submission import ExperimentHandle, resolve, submit, watch


class _Package(types.ModuleType):
    """Keeps an export whose name is also a submodule's (``experiment`` the flow, not the module): importing
    the submodule would otherwise replace the export, depending on what was imported first."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cq_prefect' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

