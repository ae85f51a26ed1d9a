"""The one exception tree of cq-prefect.

    CqError                      base: every error cq raises on purpose
    ├── BadInput                 the user's input is wrong (CLI exit code 2); says how to fix it
    │   ├── SpecError            an ExperimentSpec (or its CLI flags) is invalid
    │   ├── UnknownRun           a RUN argument names no flow run, flow-run name or exp id
    │   ├── DagError             a DAG file is invalid (every problem, with its line)
    │   ├── LoopConfigError      a loop config, its ideas file or its search space is invalid
    │   ├── OverrideError        a hypothesis's change does not fit the experiment's command
    │   ├── MetricNeverPrinted   the loop's experiment never printed the loop's metric
    │   └── AuthRefused          a server refused the credentials (or their absence); names the variable to set
    ├── MissingDependency        an optional package is not installed (exit code 2); names the pip command
    ├── StackError               the embedded stack could not start, stop or be reached
    ├── ExperimentFailed         the experiment ran and failed (CLI exit code 1)
    │   └── ExperimentTimedOut   ... because it ran past its timeout
    └── DagFailed                a DAG run ended with failed or not-run nodes (exit code 1); lists them

Only the CLI turns these into a message and an exit code; library code raises and chains (`from exc`).
"""

from __future__ import annotations


class CqError(Exception):
    """Base class of every error cq-prefect raises on purpose."""

    exit_code = 1


class BadInput(CqError):
    """The input is wrong; the message names the problem and the fix."""

    exit_code = 2


class SpecError(BadInput):
    """An experiment spec is invalid."""


class UnknownRun(BadInput):
    """A RUN argument matches no flow run id, flow-run name or exp id."""


class DagError(BadInput):
    """A DAG file is invalid; ``problems`` lists each problem with its line."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


class LoopConfigError(BadInput):
    """A research-loop config (or the ideas file or search space it names) is invalid."""


class OverrideError(BadInput):
    """A hypothesis's parameter overrides cannot be applied to the experiment's command."""


class MetricNeverPrinted(BadInput):
    """The loop's experiment ran but never printed the loop's metric: the command, not the loop, needs fixing."""

    def __init__(self, metric: str):
        super().__init__(f"metric {metric!r} was never printed — does the script print @{metric}=…?")
        self.metric = metric


class AuthRefused(BadInput):
    """The Prefect API or MLflow refused this process's credentials, or wants some; names the variable to set."""


class MissingDependency(CqError):
    """An optional package is missing; the message names the ``pip install`` that adds it."""

    exit_code = 2


class StackError(CqError):
    """The embedded stack (Prefect server, MLflow server, worker) failed to start, stop or answer."""


class ExperimentFailed(CqError):
    """The experiment's command exited non-zero, timed out or was killed."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.process_exit_code = exit_code


class ExperimentTimedOut(ExperimentFailed):
    """The experiment ran past its timeout and its process tree was killed."""


class DagFailed(CqError):
    """A DAG run ended with failed or not-run nodes; the message lists each with its reason."""
