"""The embedded Prefect server's app: Prefect's own, with SQLite "database busy" answers retried in the server.

``cq up`` runs ``python -m uvicorn --factory cq_prefect.prefect_server:create_app`` (see
:func:`cq_prefect.stack._start_prefect`), the command ``prefect server start --background`` runs but for
the factory. :func:`create_app` builds the app exactly as Prefect's factory does and wraps it in
:class:`RetryBusySqlite`.

Why: on SQLite, a DEFERRED transaction that has read and then tries to write after another connection
committed fails at once with ``SQLITE_BUSY_SNAPSHOT`` (no busy_timeout wait), e.g. ``POST /api/task_runs/``
while the server's task-run recorder writes. Prefect's server answers such errors with 503
(``prefect.server.api.server.is_client_retryable_exception``) and its client retries after ``2**try``
seconds, about 2 s. Retrying inside the server a few times over tens of milliseconds turns most of those
2 s waits into a few milliseconds.

What is retried: plain HTTP requests only (websockets and lifespan pass through), and only when the inner
app answered 503 *and* the exception behind it, which Starlette's ``ServerErrorMiddleware`` re-raises
after sending the 503, is one that Prefect maps to 503 for SQLite: an ``sqlalchemy.exc.OperationalError``
over ``sqlite3.OperationalError`` with ``SQLITE_BUSY``/``SQLITE_BUSY_SNAPSHOT`` or "database is locked".
Everything else (other 503s, PostgreSQL errors, whose commit outcome can be unknown after a lost
connection) goes back to the client as before.

Why a retry is safe (checked against Prefect 3.9's ``prefect/server/api``): endpoints do their writes in
one ``db.session_context(begin_transaction=True)``; a BUSY error from any statement or from the COMMIT
leaves that transaction rolled back, so the request changed nothing in the database and running it again
is the first run. Two endpoints commit more than once in a request, so a BUSY in a later step leaves the
earlier commits in place; they are never retried here (:data:`MULTI_COMMIT_PATHS`):
``POST /flow_runs/bulk_set_state`` (one transaction per run) and ``POST /deployments/{id}/pause_deployment``
(commits the pause, then deletes scheduled runs). Side effects outside the database are not rolled back:
a flow-run state change publishes its event inside the transaction, before the COMMIT that may fail. The
retry repeats them exactly as Prefect's own client does when it retries the same 503 (it resends the same
request for any status 503), only sooner; this module adds no new kind of repeat.

Retries run one at a time (one asyncio lock; first tries are not held back). The requests that meet
BUSY_SNAPSHOT are mostly the same writes colliding with each other (many ``POST /task_runs/`` at once,
each reading labels and then inserting); retried together, they collide again. Sleeps happen outside the
lock.

Cost: the request body is read before the first try and replayed to each (Prefect's request bodies are
small JSON). Responses are not buffered: any answer but a 503 streams straight through; only a 503's small
JSON body is held until the try ends. A retried response carries ``x-cq-server-retries: N``; each retry is
logged at DEBUG on ``cq_prefect.prefect_server``. ``CQ_PREFECT_SERVER_RETRY=0`` serves Prefect's app
unwrapped (for comparisons).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

try:
    from builtins import BaseExceptionGroup
except ImportError:  # Python 3.10: anyio's backport
    from exceptiongroup import BaseExceptionGroup

__all__ = ["DELAYS", "MULTI_COMMIT_PATHS", "RETRIES_HEADER", "RetryBusySqlite", "create_app", "is_sqlite_busy"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

ENV_SWITCH = "CQ_PREFECT_SERVER_RETRY"
RETRIES_HEADER = b"x-cq-server-retries"
# Sleeps between tries: 8 tries in all, ~0.7 s of sleep at most (each jittered by x0.5-1.5 so that
# requests that collided do not collide again in step); well under the client's own ~2 s first backoff.
DELAYS: tuple[float, ...] = (0.02, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25)
# Path endings of the endpoints that commit more than once per request (see the module docstring).
MULTI_COMMIT_PATHS: tuple[str, ...] = ("/flow_runs/bulk_set_state", "/pause_deployment")
HELD_BODY_LIMIT = 64 * 1024  # a 503 body larger than this is not Prefect's busy answer: stream it


def create_app():
    """The ASGI app uvicorn serves: ``uvicorn --factory cq_prefect.prefect_server:create_app``.

    Calls Prefect's factory as its CLI does (no arguments; ``PREFECT__SERVER_FINAL`` and the server
    settings come from the environment) and wraps the result unless ``CQ_PREFECT_SERVER_RETRY=0``.
    """
    from prefect.server.api.server import create_app as create_prefect_app

    app = create_prefect_app()
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return app
    return RetryBusySqlite(app)


def is_sqlite_busy(exc: BaseException) -> bool:
    """True for the SQLite errors Prefect's server answers with 503: busy, busy snapshot, locked.

    An exception group counts when every exception in it does.
    """
    if isinstance(exc, BaseExceptionGroup):
        return all(is_sqlite_busy(inner) for inner in exc.exceptions)
    if not isinstance(getattr(exc, "orig", None), sqlite3.OperationalError):
        return False
    from prefect.server.api.server import is_client_retryable_exception

    # For SQLite OperationalErrors, Prefect's rule is exactly: busy, busy snapshot or "database is locked".
    return is_client_retryable_exception(exc)  # type: ignore[arg-type]


class RetryBusySqlite:
    """ASGI middleware: retry an HTTP request whose try ended in 503 because SQLite was busy.

    Returns the first answer that is not such a 503, or the last try's 503 (the client then backs off as
    usual). Retries (not first tries) run one at a time. ``retried`` and ``gave_up`` count retries and
    requests that ran out of tries::

        app = RetryBusySqlite(prefect_app)            # what create_app() serves
        app = RetryBusySqlite(fake, delays=(0, 0))    # tests: three tries, no sleeping
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        delays: Iterable[float] = DELAYS,
        retryable: Callable[[BaseException], bool] = is_sqlite_busy,
    ) -> None:
        self.app = app
        self.delays = tuple(delays)
        self.retryable = retryable
        self.retried = 0
        self.gave_up = 0
        self._retry_lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(MULTI_COMMIT_PATHS):
            await self.app(scope, receive, send)
            return
        request = await _read_request(receive)
        delays = self.delays if request[-1]["type"] == "http.request" else ()  # client gone: one try
        for tries, delay in enumerate((*delays, None)):
            answer = _Answer(send, tries, hold_503=delay is not None)
            try:
                async with self._retry_lock if tries else contextlib.nullcontext():
                    await self.app(_fresh(scope), _replay(request, receive), answer.send)
            except Exception as exc:
                if delay is None or not answer.held_complete or not self.retryable(exc):
                    if delay is None and tries and self.retryable(exc):
                        self.gave_up += 1
                        log.debug("%s %s: SQLite still busy after %d tries", scope["method"], scope["path"], tries + 1)
                    await answer.release()
                    raise
            else:
                await answer.release()
                return
            self.retried += 1
            pause = delay * random.uniform(0.5, 1.5)
            log.debug("%s %s: SQLite busy, retry %d in %.0f ms", scope["method"], scope["path"], tries + 1, pause * 1e3)
            await asyncio.sleep(pause)


async def _read_request(receive: Receive) -> list[Message]:
    """The request's messages up to its last body part (or a disconnect), to replay to each try."""
    messages = [await receive()]
    while messages[-1]["type"] == "http.request" and messages[-1].get("more_body", False):
        messages.append(await receive())
    return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` for one try: the buffered request, then the real channel (which reports a disconnect)."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def _fresh(scope: Scope) -> Scope:
    """A copy of the scope for one try: Starlette's routing rewrites ``path``/``root_path`` in place."""
    fresh = dict(scope)
    if isinstance(scope.get("state"), dict):
        fresh["state"] = dict(scope["state"])
    return fresh


class _Answer:
    """The ``send`` of one try: streams the response through, except a 503 while more tries remain."""

    def __init__(self, send: Send, retries: int, hold_503: bool) -> None:
        self._send = send
        self._retries = retries
        self._hold_503 = hold_503
        self._held: list[Message] = []
        self._held_size = 0
        self.held_complete = False  # a whole 503 answer is held, nothing of it sent

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if self._retries:
                headers = [*message.get("headers", ()), (RETRIES_HEADER, str(self._retries).encode())]
                message = {**message, "headers": headers}
            if self._hold_503 and message["status"] == 503:
                self._held.append(message)
                return
        elif self._held and message["type"] == "http.response.body" and not self.held_complete:
            self._held.append(message)
            self._held_size += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.held_complete = True
            elif self._held_size > HELD_BODY_LIMIT:
                await self.release()
            return
        await self._send(message)

    async def release(self) -> None:
        """Send what is held (this try's answer stands)."""
        held, self._held, self.held_complete = self._held, [], False
        for message in held:
            await self._send(message)
