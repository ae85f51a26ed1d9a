"""The embedded Prefect server's app (cq_prefect.prefect_server): SQLite-busy 503s are retried in the server.

The middleware runs around small Starlette apps whose "busy" is real: a SQLAlchemy write to a SQLite file
another connection holds locked, turned into a 503 by Prefect's own exception handler (which re-raises the
error after answering, as Prefect's server does). The last test runs concurrent writes through the
session's real stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route

from cq_prefect.prefect_server import RETRIES_HEADER, RetryBusySqlite, is_sqlite_busy

HEADER = RETRIES_HEADER.decode()


@pytest.fixture
def locked_db(tmp_path):
    """A SQLite file that another connection holds a write lock on, and an engine that fails at once on it."""
    import sqlalchemy

    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    yield engine
    holder.close()
    engine.dispose()


def _busy_write(engine) -> None:
    """Raises the SQLAlchemy OperationalError (SQLITE_BUSY) Prefect's server would meet."""
    import sqlalchemy

    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))


def _app(locked_db, busy_tries: int, seen: list[bytes], path: str = "/api/task_runs/") -> Starlette:
    """POST ``path`` echoes its JSON body; the first ``busy_tries`` tries hit the locked database."""
    from prefect.server.api.server import custom_internal_exception_handler

    async def create(request):
        seen.append(await request.body())
        if len(seen) <= busy_tries:
            _busy_write(locked_db)
        return JSONResponse(json.loads(seen[-1]), status_code=201)

    return Starlette(routes=[Route(path, create, methods=["POST"])],
                     exception_handlers={Exception: custom_internal_exception_handler})


def _post(app, path: str = "/api/task_runs/", payload: dict | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await client.post(path, json=payload or {"name": "t", "pad": "x" * 5000})

    return asyncio.run(go())


def test_a_real_sqlite_busy_error_is_what_counts(locked_db):
    with pytest.raises(Exception) as caught:
        _busy_write(locked_db)
    assert is_sqlite_busy(caught.value)
    assert not is_sqlite_busy(RuntimeError("database is locked"))
    assert not is_sqlite_busy(ExceptionGroup("two", [caught.value, RuntimeError("other")]))


def test_busy_twice_then_created_returns_the_created_answer_with_the_body_replayed(locked_db):
    seen: list[bytes] = []
    app = RetryBusySqlite(_app(locked_db, busy_tries=2, seen=seen), delays=(0, 0, 0))
    payload = {"name": "t", "pad": "x" * 100_000}

    response = _post(app, payload=payload)

    assert response.status_code == 201
    assert response.json() == payload
    assert response.headers[HEADER] == "2"
    assert len(seen) == 3 and len(set(seen)) == 1  # every try read the same, whole body
    assert (app.retried, app.gave_up) == (2, 0)


def test_always_busy_gives_up_with_prefects_503(locked_db):
    seen: list[bytes] = []
    app = RetryBusySqlite(_app(locked_db, busy_tries=99, seen=seen), delays=(0, 0, 0))

    response = _post(app)

    assert response.status_code == 503
    assert response.json() == {"exception_message": "Service Unavailable"}  # the client backs off as usual
    assert response.headers[HEADER] == "3"
    assert len(seen) == 4
    assert (app.retried, app.gave_up) == (3, 1)


def test_retries_run_one_at_a_time(locked_db):
    from prefect.server.api.server import custom_internal_exception_handler

    tries: dict[str, int] = {}
    active, most = [0], [0]

    async def create(request):
        name = (await request.json())["name"]
        tries[name] = tries.get(name, 0) + 1
        if tries[name] == 1:
            _busy_write(locked_db)
        active[0] += 1
        most[0] = max(most[0], active[0])
        await asyncio.sleep(0.01)  # a retry in progress: another must not start now
        active[0] -= 1
        return JSONResponse({"name": name}, status_code=201)

    app = RetryBusySqlite(Starlette(routes=[Route("/api/task_runs/", create, methods=["POST"])],
                                    exception_handlers={Exception: custom_internal_exception_handler}),
                          delays=(0, 0))

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await asyncio.gather(*(client.post("/api/task_runs/", json={"name": f"r{i}"}) for i in range(4)))

    assert [r.status_code for r in asyncio.run(go())] == [201] * 4
    assert tries == {f"r{i}": 2 for i in range(4)} and app.retried == 4
    assert most == [1]


def test_other_503s_and_errors_are_not_retried(locked_db):
    from prefect.server.api.server import custom_internal_exception_handler

    tries = []

    async def unavailable(request):
        tries.append("503")
        raise HTTPException(503, "maintenance")

    async def broken(request):
        tries.append("500")
        raise ValueError("a bug, not a busy database")

    app = RetryBusySqlite(
        Starlette(routes=[Route("/api/a", unavailable, methods=["POST"]), Route("/api/b", broken, methods=["POST"])],
                  exception_handlers={Exception: custom_internal_exception_handler}),
        delays=(0, 0, 0),
    )
    assert _post(app, "/api/a").status_code == 503
    assert _post(app, "/api/b").status_code == 500
    assert tries == ["503", "500"]
    assert app.retried == 0


def test_endpoints_that_commit_twice_are_not_retried(locked_db):
    seen: list[bytes] = []
    path = "/api/flow_runs/bulk_set_state"
    app = RetryBusySqlite(_app(locked_db, busy_tries=99, seen=seen, path=path), delays=(0, 0, 0))

    assert _post(app, path).status_code == 503
    assert len(seen) == 1 and app.retried == 0


def test_a_websocket_passes_through_untouched():
    got = []

    async def inner(scope, receive, send):
        got.append((scope, receive, send))

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        pass

    scope = {"type": "websocket", "path": "/api/events/in", "headers": []}
    app = RetryBusySqlite(inner)
    asyncio.run(app(scope, receive, send))
    assert got == [(scope, receive, send)] and got[0][0] is scope  # the very same channel, nothing read
    assert app.retried == 0


def test_a_streamed_answer_is_sent_as_it_comes():
    sent: list[dict] = []
    outer_had_first_chunk = []

    async def stream(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        outer_had_first_chunk.append([m.get("body") for m in sent])
        await send({"type": "http.response.body", "body": b"last"})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/api/flow_runs/x/logs/download", "headers": []}
    asyncio.run(RetryBusySqlite(stream)(scope, receive, send))
    assert outer_had_first_chunk == [[None, b"first"]]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]


# ---- with the session's real stack ------------------------------------------------------------------


def test_the_stack_serves_the_wrapped_app_and_concurrent_writes_succeed(stack, caplog):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from cq_prefect.stack import StackConfig, read_pid

    pid = read_pid(StackConfig.from_env(), "prefect-server")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"cq_prefect.prefect_server:create_app" in argv

    @flow(name="busy-writes")
    def parent():
        pass

    @task(name="busy-writes-task")
    def child():
        pass

    threads, per_thread, errors, done = 8, 5, [], []

    def write(n: int) -> None:
        try:
            with get_client(sync_client=True) as client:
                for i in range(per_thread):
                    run = client.create_flow_run(parent, state=Running())
                    task_run = client.create_task_run(child, run.id, dynamic_key=f"{n}-{i}-{uuid.uuid4().hex[:6]}")
                    client.set_task_run_state(task_run.id, Running())
                    client.set_task_run_state(task_run.id, Completed())
                    client.set_flow_run_state(run.id, Completed())
                    done.append(task_run.id)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="httpx")
    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)

    assert not errors and len(done) == threads * per_thread
    with get_client(sync_client=True) as client:
        assert {client.read_task_run(done[0]).state.type.value, client.read_task_run(done[-1]).state.type.value} == {
            "COMPLETED"
        }
    requests = [r.getMessage() for r in caplog.records if r.name == "httpx" and "HTTP Request:" in r.getMessage()]
    unavailable = [line for line in requests if '"HTTP/1.1 503' in line]
    assert len(requests) >= threads * per_thread * 5
    assert len(unavailable) <= len(requests) // 20, unavailable[:5]
