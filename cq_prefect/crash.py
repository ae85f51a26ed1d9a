"""Crash detection: an experiment whose process died without a word becomes a Crashed flow run.

A process killed outright (SIGKILL, the out-of-memory killer, a host that loses power or network) reports
nothing, and open-source Prefect has no reaper for such runs: they would stay Running forever. So:

1. every experiment flow run sends the event ``cq.experiment.heartbeat`` every ``CQ_HEARTBEAT_SECONDS``
   (default 30) from a thread of its own while its flow runs (:func:`heartbeats`);
2. one Prefect automation per server (:func:`ensure_crash_automation`, called by ``cq up`` and
   ``cq worker start``) expects, after each heartbeat of a flow run, another heartbeat or an end state
   within ``CQ_CRASH_AFTER_SECONDS`` (default 90, at least twice the heartbeat); when neither comes, it
   sets the run Crashed with a message that names the missing heartbeats;
3. :mod:`cq_prefect.reaper` then ends the run's MLflow run FAILED, with every point the command printed.

Why a cq event and not Prefect's own ``prefect.flow-run.heartbeat``: in Prefect 3.9 that one comes every
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, at least 30 and **180 by default**, set in whatever
environment the worker gives the flow-run process. A 90 s window over it would mark every run of a worker
that does not set it Crashed after 90 s. cq's heartbeat comes from the experiment flow itself, so the
window holds whatever worker runs it (Prefect's heartbeat, when it comes, counts as a sign of life too).
Only experiment flows send it, so runs of other flows on the same server are never judged.

    >>> from cq_prefect.crash import ensure_crash_automation
    >>> ensure_crash_automation()          # doctest: +SKIP   (idempotent: create, update or leave as is)
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cq_prefect.errors import BadInput

if TYPE_CHECKING:
    from prefect.events.schemas.automations import Automation, AutomationCore

logger = logging.getLogger("cq.crash")

HEARTBEAT_EVENT = "cq.experiment.heartbeat"
HEARTBEAT_ENV = "CQ_HEARTBEAT_SECONDS"
CRASH_AFTER_ENV = "CQ_CRASH_AFTER_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 30.0
DEFAULT_CRASH_AFTER_SECONDS = 90.0
MIN_CRASH_AFTER_SECONDS = 10.0  # Prefect's floor for a proactive trigger's window
AUTOMATION_NAME = "cq: experiment crashed (heartbeats stopped)"
EXPERIMENT_FLOW_NAME = "experiment"  # cq_prefect.deployment.EXPERIMENT_FLOW_NAME (no Prefect import here)

# Events that prove the run's process was alive, or that it ended and will send no more heartbeats.
# State events are named by state *name*: TimedOut is a Failed state, Suspended ends the process.
END_EVENTS = tuple(
    f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed", "TimedOut", "Suspended")
)
PREFECT_HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{env}={raw!r} is not a number of seconds; e.g. {env}={default:g}") from None
    if not value > 0:
        raise BadInput(f"{env}={raw!r} must be more than 0 seconds; e.g. {env}={default:g}")
    return value


def heartbeat_seconds() -> float:
    """Seconds between an experiment's heartbeats: ``CQ_HEARTBEAT_SECONDS`` (default 30)."""
    return _seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS)


def crash_after_seconds() -> float:
    """Seconds without a heartbeat after which a run is Crashed: ``CQ_CRASH_AFTER_SECONDS`` (default 90)."""
    return _seconds(CRASH_AFTER_ENV, DEFAULT_CRASH_AFTER_SECONDS)


def crash_message(crash_after: float, heartbeat: float) -> str:
    return (
        f"No {HEARTBEAT_EVENT} event for {crash_after:g} s (the experiment sends one every {heartbeat:g} s): "
        "its flow-run process or its host died without reporting (SIGKILL, out of memory, power or network "
        "loss). cq ends its MLflow run FAILED."
    )


def crash_automation(
    crash_after: float | None = None,
    heartbeat: float | None = None,
    *,
    name: str = AUTOMATION_NAME,
    match_related: Sequence[dict[str, str]] = (),
) -> AutomationCore:
    """The automation that marks experiment runs Crashed when their heartbeats stop (not yet created).

    ``crash_after`` / ``heartbeat`` default to ``CQ_CRASH_AFTER_SECONDS`` / ``CQ_HEARTBEAT_SECONDS``;
    the window must be at least twice the heartbeat (one lost heartbeat must not crash a run) and at
    least 10 s. ``match_related``: more related-resource labels a run must carry, e.g.
    ``[{"prefect.resource.id": "prefect.tag.nightly"}]`` for runs tagged ``nightly`` only.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    crash_after = crash_after_seconds() if crash_after is None else crash_after
    heartbeat = heartbeat_seconds() if heartbeat is None else heartbeat
    if crash_after < max(2 * heartbeat, MIN_CRASH_AFTER_SECONDS):
        raise BadInput(
            f"{CRASH_AFTER_ENV}={crash_after:g} must be at least twice {HEARTBEAT_ENV}={heartbeat:g} (and at "
            f"least {MIN_CRASH_AFTER_SECONDS:g} s), or one late heartbeat marks a live run Crashed; e.g. "
            f"{CRASH_AFTER_ENV}={max(3 * heartbeat, MIN_CRASH_AFTER_SECONDS):g}"
        )
    flow = {"prefect.resource.role": "flow", "prefect.resource.name": EXPERIMENT_FLOW_NAME}
    trigger = EventTrigger(  # every field given: update_automation sends only the fields that were set
        type="event",
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related=[flow, *match_related],
        after={HEARTBEAT_EVENT},
        expect={HEARTBEAT_EVENT, PREFECT_HEARTBEAT_EVENT, *END_EVENTS},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=crash_after,
    )
    return AutomationCore(
        name=name,
        description=(
            f"cq-prefect crash detection: an experiment flow run sends {HEARTBEAT_EVENT} every "
            f"{heartbeat:g} s ({HEARTBEAT_ENV}); when neither another one nor an end state follows within "
            f"{crash_after:g} s ({CRASH_AFTER_ENV}), its process is gone and the run is set Crashed. "
            "Managed by cq (cq up / cq worker start): edits are overwritten, pausing is kept."
        ),
        enabled=True,
        tags=["cq"],
        trigger=trigger,
        actions=[
            ChangeFlowRunState(
                type="change-flow-run-state", state=StateType.CRASHED, name=None,
                message=crash_message(crash_after, heartbeat), force=False,  # never over an end state
            )
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


def ensure_crash_automation(
    client=None,
    *,
    crash_after: float | None = None,
    heartbeat: float | None = None,
    name: str = AUTOMATION_NAME,
    match_related: Sequence[dict[str, str]] = (),
) -> Automation:
    """Create the crash automation (:func:`crash_automation`) on the Prefect server, or bring it up to date.

    Idempotent: found by name; updated only when its definition differs; extra copies (two processes
    creating it at once) are deleted, the oldest id is kept. A copy someone paused stays paused (and
    says so in the log). Returns the automation as stored.
    """
    if client is None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return ensure_crash_automation(
                client, crash_after=crash_after, heartbeat=heartbeat, name=name, match_related=match_related
            )
    wanted = crash_automation(crash_after, heartbeat, name=name, match_related=match_related)
    found = sorted(client.read_automations_by_name(name), key=lambda a: str(a.id))
    if not found:
        client.create_automation(wanted)
        found = sorted(client.read_automations_by_name(name), key=lambda a: str(a.id))
        logger.info("Created Prefect automation %r", name)
    keep, extra = found[0], found[1:]
    for duplicate in extra:
        client.delete_automation(duplicate.id)
    if not keep.enabled:
        wanted = wanted.model_copy(update={"enabled": False})
        logger.warning("Prefect automation %r is paused: crashed experiment runs stay Running until it is resumed", name)
    if _definition(keep) != _definition(wanted):
        client.update_automation(keep.id, wanted)
        keep = client.read_automation(keep.id)
        logger.info("Updated Prefect automation %r", name)
    return keep


def _definition(automation: Any) -> str:
    """A canonical JSON form of an automation's definition, for comparing what is stored with what is wanted."""
    from prefect.events.schemas.automations import AutomationCore

    fields = ("name", "description", "enabled", "tags", "trigger", "actions", "actions_on_trigger", "actions_on_resolve")
    core = AutomationCore.model_validate(automation.model_dump(include=set(fields)))
    return json.dumps(_canonical(core.model_dump(mode="json")), sort_keys=True)


def _canonical(value: Any) -> Any:
    # Sets (after, expect, for_each) come back as lists in any order: sort lists of plain strings.
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


# -- the heartbeat, in the experiment's flow-run process ----------------------------------------------


@contextlib.contextmanager
def heartbeats(interval: float | None = None) -> Iterator[None]:
    """Send ``cq.experiment.heartbeat`` for the current flow run every ``interval`` s while the block runs.

    Outside a flow run it does nothing. A bad ``CQ_HEARTBEAT_SECONDS`` falls back to the default (with a
    warning): an experiment never fails over its heartbeat. The thread is not deprioritised: a late
    heartbeat would mark a live run Crashed.
    """
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    if interval is None:
        try:
            interval = heartbeat_seconds()
        except BadInput as exc:
            logger.warning("%s; sending heartbeats every %g s", exc, DEFAULT_HEARTBEAT_SECONDS)
            interval = DEFAULT_HEARTBEAT_SECONDS
    resource, related = _heartbeat_resources(context)
    stop = threading.Event()

    def beat() -> None:
        from prefect.events import emit_event

        while True:
            try:
                emit_event(HEARTBEAT_EVENT, resource=resource, related=related, payload={"interval_s": interval})
            except Exception:  # the events client retries on its own; a lost beat is what the window is for
                logger.debug("Could not send a heartbeat", exc_info=True)
            if stop.wait(interval):
                return

    # The thread runs in a copy of this context, so it sees this flow run's Prefect settings (API URL).
    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(beat,), name="cq-heartbeat", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _heartbeat_resources(context) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The flow run as the event's resource; its flow, deployment and tags as related resources."""
    flow_run = context.flow_run
    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.name": flow_run.name or ""}
    related = [
        {
            "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
            "prefect.resource.role": "flow",
            "prefect.resource.name": context.flow.name if context.flow else EXPERIMENT_FLOW_NAME,
        }
    ]
    if flow_run.deployment_id:
        related.append(
            {"prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}", "prefect.resource.role": "deployment"}
        )
    related += [{"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"} for tag in sorted(flow_run.tags or [])]
    return resource, related
