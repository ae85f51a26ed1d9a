"""Start an experiment's command the moment its warm engine is forked, before Prefect's engine runs.

Between a cq-gpu worker's claim and the experiment flow's body, Prefect's engine reads the flow run,
loads the flow and proposes Running, and the flow sets up its MLflow and log plumbing: most of a second,
more on a busy host. None of it decides what the command is: the worker already knows the run's spec
from the scheduled-run response. So the worker passes it along (``CQ_PRESTART``, JSON), the forked
engine process starts the command at once (:func:`start_from_environment`), holding its output lines in
order, and the flow body takes the running command over (:func:`adopt`) and replays those lines before
any later one. When the engine never gets to the flow (Running refused, the run cancelled meanwhile,
a crash), the engine process kills the command's tree on its way out (:func:`discard`); if it dies
outright, the command's supervisor sees its lifeline close and does the same.

The command gets the environment the flow would give it (:func:`command_environment`, used by both).

    >>> buffer = LineBuffer()
    >>> buffer.add("stdout", "early")
    >>> seen = []
    >>> buffer.attach(lambda stream, line: seen.append(line))
    >>> buffer.add("stdout", "late")
    >>> seen
    ['early', 'late']

No Prefect import here: this runs in the engine process before Prefect's engine does.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cq_prefect.auth import SERVER_ONLY
from cq_prefect.command import CommandRun
from cq_prefect.spec import ExperimentSpec

ENV = "CQ_PRESTART"
# Set for the engine process only: Prefect's control channel (the engine consumes them) and our hand-over;
# and the servers' secrets and cq's copies of the credentials (the command keeps Prefect's and MLflow's own
# client variables, so a script that logs to its MLflow run itself still can).
NOT_FOR_THE_COMMAND = frozenset({ENV, "PREFECT__CONTROL_PORT", "PREFECT__CONTROL_TOKEN"}) | SERVER_ONLY


def payload(flow_run_id: str, spec: Mapping, mlflow_run_id: str) -> str:
    """What a worker puts in ``CQ_PRESTART`` for a run of the experiment flow."""
    return json.dumps({"flow_run_id": flow_run_id, "spec": spec, "mlflow_run_id": mlflow_run_id})


def experiment_id(spec: ExperimentSpec, flow_run_id: str) -> str:
    return spec.exp_id or f"exp-{flow_run_id[:6]}"


def command_environment(spec: ExperimentSpec, *, tracking_uri: str, mlflow_run_id: str, exp_id: str,
                        base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: this process's, the spec's ``env``, then what cq tells every command."""
    base = os.environ if base is None else base
    env = {
        **{k: v for k, v in base.items() if k not in NOT_FOR_THE_COMMAND},
        **spec.env,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_RUN_ID": mlflow_run_id,
        "CQ_EXP_ID": exp_id,
        "PYTHONUNBUFFERED": "1",  # Python scripts stream their lines instead of flushing at exit
    }
    env["PATH"] = interpreter_first(env.get("PATH", ""))
    return env


def interpreter_first(path: str) -> str:
    """``PATH`` with the folder of this Python first, as in an activated virtualenv: ``python`` and the
    tools installed beside cq-prefect in a command mean the worker's environment, however it was started
    (``.venv/bin/cq worker start`` does not activate the venv)."""
    folder = os.path.dirname(sys.executable)
    parts = [p for p in path.split(os.pathsep) if p]
    if parts[:1] == [folder]:
        return path
    return os.pathsep.join([folder, *(p for p in parts if p != folder)])


def kill_grace() -> float:
    return float(os.environ.get("CQ_KILL_GRACE_SECONDS", "10"))


class LineBuffer:
    """Holds output lines until a consumer is attached, then passes them on, earlier lines first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[str, str]] = []
        self._target: Callable[[str, str], None] | None = None

    def add(self, stream: str, line: str) -> None:
        with self._lock:  # under the lock, so a line can't overtake the ones attach() is replaying
            if self._target is None:
                self._held.append((stream, line))
            else:
                self._target(stream, line)

    def held(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._held)

    def attach(self, target: Callable[[str, str], None]) -> None:
        with self._lock:
            for stream, line in self._held:
                target(stream, line)
            self._held.clear()
            self._target = target


@dataclass
class Prestarted:
    """A command started before its flow; the flow takes it over with :func:`adopt`."""

    flow_run_id: str
    spec: ExperimentSpec
    mlflow_run_id: str
    command: CommandRun
    lines: LineBuffer
    adopted: bool = field(default=False)


_current: Prestarted | None = None


def _at_commit(spec: ExperimentSpec) -> bool:
    from cq_prefect.code_changes import workdir_at_commit

    return workdir_at_commit(Path(spec.workdir), spec.source.commit)


def start_from_environment() -> Prestarted | None:
    """Start the command ``CQ_PRESTART`` describes (removing the variable); None when there is none, it
    is not for this flow run, or the flow would refuse it (it then reports why itself)."""
    global _current
    raw = os.environ.pop(ENV, None)
    if not raw:
        return None
    try:
        request = json.loads(raw)
        flow_run_id = str(request["flow_run_id"])
        mlflow_run_id = request["mlflow_run_id"]
        spec = ExperimentSpec.model_validate(request["spec"])
    except (ValueError, KeyError, TypeError):
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if (flow_run_id != os.environ.get("PREFECT__FLOW_RUN_ID") or not isinstance(mlflow_run_id, str) or not uri
            or not Path(spec.workdir).is_dir() or (spec.source is not None and not _at_commit(spec))):
        return None  # the flow checks the code out, or reports what is wrong
    lines = LineBuffer()
    env = command_environment(spec, tracking_uri=uri, mlflow_run_id=mlflow_run_id,
                              exp_id=experiment_id(spec, flow_run_id))
    command = CommandRun(spec.command, spec.workdir, env=env, on_line=lines.add, kill_grace=kill_grace())
    try:
        command.start()
    except OSError:
        return None  # the flow starts it again and reports the error
    _current = Prestarted(flow_run_id, spec, mlflow_run_id, command, lines)
    return _current


def adopt(flow_run_id: str, spec: ExperimentSpec, mlflow_run_id: str | None) -> Prestarted | None:
    """The command started for this very run, spec and MLflow run, once; None if there is none.

    A prestarted command that does not match (it can't, unless the run's parameters changed after the
    claim) is killed: the caller starts the right one.
    """
    started = _current
    if started is None or started.adopted:
        return None
    if (started.flow_run_id, started.spec, started.mlflow_run_id) != (flow_run_id, spec, mlflow_run_id):
        discard()
        return None
    started.adopted = True
    return started


def waiting() -> bool:
    """Whether a prestarted command still waits for its flow to take it over."""
    return _current is not None and not _current.adopted


def discard() -> None:
    """Kill the prestarted command's tree if it is still running (the engine process is ending); if the
    flow never took it over, keep what it printed and close its MLflow run when the run was cancelled."""
    global _current
    started, _current = _current, None
    if started is None:
        return
    if started.command.process is not None and started.command.process.poll() is None:
        started.command.stop()
    if not started.adopted:
        _record_unadopted(started)


def _record_unadopted(started: Prestarted) -> None:
    """The run was cancelled (or its engine failed) after its command started but before its flow did:
    the command's lines go to the run's log, and a cancelled run's MLflow run ends KILLED, as it would
    from the flow. A failed engine makes the run Crashed, and the reaper closes its MLflow run."""
    import datetime
    import uuid

    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import LogCreate

        lines = [line for _, line in started.lines.held()]
        with get_client(sync_client=True) as client:
            flow_run_id = uuid.UUID(started.flow_run_id)
            if lines:
                client.create_logs([LogCreate(
                    name="cq.output", level=20, message="\n".join(lines)[:1_000_000], flow_run_id=flow_run_id,
                    timestamp=datetime.datetime.now(datetime.timezone.utc))])
            state = client.read_flow_run(flow_run_id).state
        if state is None or state.type.value not in ("CANCELLING", "CANCELLED"):
            return
        from cq_prefect import tracking

        mlflow = tracking.client(os.environ["MLFLOW_TRACKING_URI"])
        if mlflow.get_run(started.mlflow_run_id).info.status in ("SCHEDULED", "RUNNING"):
            mlflow.set_tag(started.mlflow_run_id, tracking.TAG_OUTCOME, "cancelled")
            mlflow.set_tag(started.mlflow_run_id, "cq.error", "cancelled before the experiment flow started; "
                           f"its command had started and was killed ({len(lines)} lines printed)")
            mlflow.set_terminated(started.mlflow_run_id, status="KILLED")
    except Exception:  # noqa: BLE001 - best effort: the process is ending, and the tree is gone already
        pass


__all__ = ["ENV", "LineBuffer", "Prestarted", "adopt", "command_environment", "discard", "payload",
           "start_from_environment"]
