"""The one exception tree of cq-prefect.

    CqError                      base: every error cq raises on purpose
    ├── BadInput                 the user's input is wrong (CLI exit code 2); says how to fix it
    │   ├── SpecError            an ExperimentSpec (or its CLI flags) is invalid
    │   └── UnknownRun           a RUN argument names no flow run, flow-run name or exp id
    ├── StackError               the embedded stack could not start, stop or be reached
    └── ExperimentFailed         the experiment ran and failed (CLI exit code 1)
        └── ExperimentTimedOut   ... because it ran past its timeout

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


class StackError(CqError):
    """The embedded stack (Prefect server, MLflow server, worker) failed to start, stop or answer."""


class ExperimentFailed(CqError):
    """The experiment's command exited non-zero, timed out or was killed."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.process_exit_code = exit_code


class ExperimentTimedOut(ExperimentFailed):
    """The experiment ran past its timeout and its process tree was killed."""
