"""`cq mcp`: the real server as a subprocess, over stdio and over streamable HTTP, with the `mcp` package's client.

One stdio server and one HTTP server per module (each started like an assistant would start it, with this
session's environment, so it finds the session stack); experiments, a DAG and a research loop run end to end
through the tools; bad input comes back as tool errors with the CLI's own messages; the HTTP transport
refuses requests without the bearer token and never logs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import secrets
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import (
    CQ,
    PYTHON,
    count_all_runs,
    free_port,
    pid_alive,
    run_cq,
    stop_process_group,
    wait_for,
    write_script,
)

pytestmark = pytest.mark.e2e

TOKEN = "cq-test-" + secrets.token_urlsafe(24)

TRAIN = """\
import time
for epoch in range(4):
    print(f"epoch {epoch} @loss={1.0 / (epoch + 1):.4f} @mpjpe={48 - 2 * epoch}mm", flush=True)
    time.sleep(0.3)
print("done", flush=True)
"""
TRAIN_LINES = [f"epoch {e} @loss={1.0 / (e + 1):.4f} @mpjpe={48 - 2 * e}mm" for e in range(4)] + ["done"]


class McpSession:
    """One MCP client connection held open in a background event loop, for synchronous tests to share."""

    def __init__(self, open_client):
        self._open_client = open_client  # () -> async context manager yielding an mcp.Client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp-client", daemon=True)
        self._thread.start()
        self._closing: asyncio.Event | None = None
        opened = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        self._client, self._task = opened.result(timeout=120)

    async def _open(self):
        self._closing = asyncio.Event()
        ready: asyncio.Future = self._loop.create_future()

        async def hold():
            try:
                async with self._open_client() as client:
                    ready.set_result(client)
                    await self._closing.wait()
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
                raise

        task = asyncio.ensure_future(hold())
        return await ready, task

    def call(self, tool: str, timeout: float = 120, **arguments):
        future = asyncio.run_coroutine_threadsafe(self._client.call_tool(tool, arguments), self._loop)
        return future.result(timeout=timeout)

    def list_tools(self):
        return asyncio.run_coroutine_threadsafe(self._client.list_tools(), self._loop).result(timeout=60)

    def close(self) -> None:
        async def stop():
            self._closing.set()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 30)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=40)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def stdio(stack, tmp_path_factory):
    """`cq mcp` as a local assistant starts it: a subprocess speaking MCP on its stdin/stdout."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    errlog_path = tmp_path_factory.mktemp("mcp-stdio") / "stderr.log"
    errlog = errlog_path.open("w")
    params = StdioServerParameters(command=CQ, args=["mcp"], env=dict(os.environ))
    session = McpSession(lambda: Client(stdio_client(params, errlog=errlog), read_timeout_seconds=180))
    yield session
    session.close()
    errlog.close()


def start_http(port: int, log: Path, *args: str, token: str | None = TOKEN) -> subprocess.Popen:
    """`cq mcp --http --port PORT ARGS` with CQ_MCP_TOKEN=token (None: unset); returns once it listens."""
    env = {k: v for k, v in os.environ.items() if k != "CQ_MCP_TOKEN"}
    env.update({"CQ_MCP_TOKEN": token} if token else {})
    proc = subprocess.Popen([CQ, "mcp", "--http", "--port", str(port), *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise AssertionError(f"cq mcp --http did not listen:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def http_server(stack, tmp_path_factory):
    """`cq mcp --http` on a free port, with CQ_MCP_TOKEN; yields (url, its log)."""
    port, log = free_port(), tmp_path_factory.mktemp("mcp-http") / "server.log"
    proc = start_http(port, log)
    yield f"http://127.0.0.1:{port}/mcp", log
    stop_process_group(proc)


@pytest.fixture(scope="module")
def http(http_server):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    url, _ = http_server

    @contextlib.asynccontextmanager
    async def open_client():
        http_client = create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"})
        async with http_client, Client(streamable_http_client(url, http_client=http_client),
                                       read_timeout_seconds=180) as mcp:
            yield mcp

    session = McpSession(open_client)
    yield session
    session.close()


@pytest.fixture(params=["stdio", "http"])
def mcp(request):
    return request.getfixturevalue(request.param)


def ok(result) -> dict:
    """The structured result of a successful tool call (fails with the tool's message otherwise)."""
    assert not result.is_error, result.content[0].text if result.content else result
    assert json.loads(result.content[0].text) == result.structured_content  # text and structure agree
    return result.structured_content


def error_text(result) -> str:
    assert result.is_error, f"expected a tool error, got {result.structured_content}"
    return result.content[0].text


def follow(mcp, run: str, timeout: float = 150) -> tuple[dict, list[str], list[dict]]:
    """Poll cq_hub_watch with its cursor until finished: (last answer, every line, each metrics update)."""
    cursor, lines, updates = None, [], []
    deadline = time.monotonic() + timeout
    while True:
        answer = ok(mcp.call("cq_hub_watch", run=run, **({"since": cursor} if cursor else {})))
        lines += answer["lines"]
        if answer["metrics"]:
            updates.append(answer["metrics"])
        cursor = answer["cursor"]
        if answer["finished"]:
            return answer, lines, updates
        assert time.monotonic() < deadline, f"{run} did not finish: {answer}"
        time.sleep(0.5)


@functools.cache
def cli_error(*args: str) -> str:
    """The message `cq ARGS` prints for bad input (exit code 2), without its `cq: error: ` prefix."""
    output = run_cq(*args)
    assert output.returncode == 2, output.stdout + output.stderr
    message = output.stderr.strip()
    assert message.startswith("cq: error: "), message
    return message.removeprefix("cq: error: ")


# -- the command ----------------------------------------------------------------------------------


def test_http_without_a_token_exits_2_naming_both_ways():
    env = {k: v for k, v in os.environ.items() if k != "CQ_MCP_TOKEN"}
    started = time.monotonic()
    output = run_cq("mcp", "--http", "--port", str(free_port()), env=env, timeout=60)
    assert output.returncode == 2, output.stderr
    assert "CQ_MCP_TOKEN" in output.stderr and "--token-block" in output.stderr
    assert time.monotonic() - started < 30  # refused before anything starts


def test_every_tool_and_alias_is_listed_with_a_schema_an_assistant_can_act_on(mcp):
    from cq_prefect.mcp_server import tool_names

    tools = {tool.name: tool for tool in mcp.list_tools().tools}
    expected = {"cq_hub_submit", "cq_hub_watch", "cq_hub_status", "cq_hub_cancel", "cq_metrics",
                "cq_hub_dag_from_yaml", "cq_loop_start", "cq_loop_status", "cq_loop_stop", "cq_knowledge_search",
                "cq_pi"}
    # the names the seed's assistants call, spelled as the seed spells them
    seed = {"c4_hub_submit", "c4_hub_watch", "c4_hub_status", "c4_hub_cancel", "c4_hub_metrics",
            "c4_hub_dag_from_yaml", "cq_hub_metrics"}
    assert seed <= set(tools)
    assert (expected | {"c4_" + name.removeprefix("cq_") for name in expected} | seed) == set(tools)
    assert set(tools) == set(tool_names()) and len(tool_names()) == len(tools)
    for name in ("c4_hub_metrics", "cq_hub_metrics", "c4_metrics"):
        assert tools[name].input_schema == tools["cq_metrics"].input_schema, name
    for name in ("c4_hub_status", "c4_hub_watch", "c4_hub_cancel", "c4_hub_metrics"):  # they take the seed's job_id
        assert "job_id" in tools[name].input_schema["properties"]["run"]["description"], name
    for name, tool in tools.items():
        assert len(tool.description) > 40, name
        properties = tool.input_schema["properties"]
        assert properties, name
        for argument, schema in properties.items():
            assert schema.get("description"), f"{name}.{argument} has no description"
        assert tool.output_schema["type"] == "object", name
    submit = tools["cq_hub_submit"].input_schema
    assert set(submit["required"]) == {"name", "workdir", "command"}
    assert {"gpu_count", "exp_id", "pool", "env", "timeout_sec"} <= set(submit["properties"])
    assert tools["c4_hub_submit"].input_schema == submit
    assert tools["c4_hub_dag_from_yaml"].input_schema == tools["cq_hub_dag_from_yaml"].input_schema
    assert set(tools["cq_hub_watch"].input_schema["properties"]) >= {"run", "since"}
    assert tools["cq_hub_dag_from_yaml"].input_schema["properties"]["run"]["default"] is True


def test_an_unexpected_failure_and_an_unreachable_stack_are_tool_errors_not_a_crash():
    """In process (the `mcp` client's in-memory transport), with a Hub whose stack never answers."""
    import anyio
    from mcp import Client

    from cq_prefect.mcp_server import Hub, build_server

    class BrokenHub(Hub):
        def metrics(self, run, history=False):
            raise RuntimeError("disk on fire")

    def connect():
        raise ConnectionRefusedError("nothing listens on 127.0.0.1:1")

    async def calls():
        async with Client(build_server(BrokenHub(connect=connect))) as client:
            return [await client.call_tool(name, arguments) for name, arguments in (
                ("cq_metrics", {"run": "exp-1"}), ("cq_hub_status", {"run": "exp-1"}), ("c4_metrics", {"run": "exp-1"}),
                ("c4_hub_metrics", {"job_id": "exp-1"}), ("c4_hub_status", {"run": "exp-1", "job_id": "exp-2"}),
                ("cq_hub_dag_from_yaml", {"yaml_content": "name: x", "job_id": "exp-1"}))]

    crashed, unreachable, again, by_job_id, both, not_a_run = anyio.run(calls)
    assert "cq_metrics failed unexpectedly: RuntimeError: disk on fire" in error_text(crashed)
    assert crashed.structured_content["kind"] == "RuntimeError"
    text = error_text(unreachable)
    assert "cannot reach the cq stack" in text and "nothing listens" in text and "cq status" in text
    assert "disk on fire" in error_text(again)  # still serving
    assert "disk on fire" in error_text(by_job_id)  # the seed's name and argument reach the same tool
    text = error_text(both)
    assert "'exp-1'" in text and "'exp-2'" in text and "give one of them" in text
    assert "unknown argument 'job_id'" in error_text(not_a_run)  # its `run` is a flag, not a run


def test_credentials_refused_by_prefect_or_mlflow_read_as_the_clis_message():
    """A 401 from inside Prefect's or MLflow's client: the sentence `cq` prints (naming the variable to set)."""
    import anyio
    from mcp import Client
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import UNAUTHENTICATED

    from cq_prefect.auth import mlflow_refused, prefect_refused
    from cq_prefect.mcp_server import Hub, build_server

    class RefusedHub(Hub):
        def metrics(self, run, history=False):
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/get failed with error code 401 "
                                  "!= 200", error_code=UNAUTHENTICATED)

        def status(self, run):
            request = httpx.Request("GET", os.environ["PREFECT_API_URL"] + "/flow_runs/" + str(uuid.uuid4()))
            response = httpx.Response(401, request=request, json={"exception_message": "Unauthorized"})
            try:
                response.raise_for_status()
            except httpx.HTTPStatusError as exc:
                raise RuntimeError("reading the flow run failed") from exc

    def connect():  # no stack for this test: the calls fail before they need one
        raise ConnectionRefusedError("nothing listens on 127.0.0.1:1")

    async def calls():
        async with Client(build_server(RefusedHub(connect=connect))) as client:
            return [await client.call_tool(name, {"run": "exp-1"}) for name in ("cq_metrics", "cq_hub_status")]

    mlflow, prefect = anyio.run(calls)
    assert error_text(mlflow) == str(mlflow_refused(os.environ["MLFLOW_TRACKING_URI"], 401))
    assert error_text(prefect) == str(prefect_refused(os.environ["PREFECT_API_URL"]))
    assert "CQ_MLFLOW_AUTH" in error_text(mlflow) and "CQ_PREFECT_AUTH" in error_text(prefect)
    for refused in (mlflow, prefect):
        assert refused.structured_content["kind"] == "AuthRefused" and refused.structured_content["exit_code"] == 2


def test_mcp_flags_of_the_http_transport_without_http_are_bad_input():
    for flags in (["--port", "8766"], ["--host", "0.0.0.0"], ["--token-block", "mcp-token"],
                  ["--allowed-host", "mcp.example.com"], ["--port", "8766", "--host", "0.0.0.0"]):
        output = run_cq("mcp", *flags, timeout=60)
        assert output.returncode == 2, (flags, output.stderr)
        message = output.stderr.strip()
        assert message.startswith("cq: error: ") and "add --http" in message and "leave" in message, message
        assert all(flag in message for flag in flags if flag.startswith("--")), message
    env = {**os.environ, "CQ_MCP_TOKEN": TOKEN}
    output = run_cq("mcp", "--http", "--port", str(free_port()), "--allowed-host", "https://mcp.example.com/",
                    env=env, timeout=60)
    assert output.returncode == 2 and "without scheme or path" in output.stderr, output.stderr


# -- experiments ------------------------------------------------------------------------------------


def test_submit_watch_and_metrics_match_what_the_script_printed(mcp, stack, tmp_path, mlflow_client):
    write_script(tmp_path, "train.py", TRAIN)
    exp_id = f"exp-mcp-{uuid.uuid4().hex[:6]}"
    submitted = ok(mcp.call("cq_hub_submit", name="mcp-e2e", workdir=str(tmp_path), command=f"{PYTHON} train.py",
                            exp_id=exp_id, env={"CQ_TEST_ENV": "yes"}, timeout_sec=120))
    assert submitted["exp_id"] == exp_id and submitted["flow_run_name"] == exp_id
    assert submitted["warnings"] == []  # the session's worker polls `local`
    flow_run_id, mlflow_run_id = submitted["flow_run_id"], submitted["mlflow_run_id"]
    experiment_id = mlflow_client.get_run(mlflow_run_id).info.experiment_id
    assert submitted["links"] == {
        "prefect_flow_run": f"{stack.prefect_ui_url}/runs/flow-run/{flow_run_id}",
        "mlflow_run": f"{stack.mlflow_ui_url}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"}

    last, lines, updates = follow(mcp, exp_id)
    assert last["state"] == "COMPLETED" and last["outcome"] == "success"
    assert [line for line in lines if not line.startswith("[")] == TRAIN_LINES  # each line once, in order
    assert any(line.startswith("[INFO]") for line in lines)  # cq's own messages, marked as such
    # each key counts its steps 0, 1, 2, 3: the last update is the fourth point
    assert updates and updates[-1]["loss"] == {"value": 0.25, "unit": None, "step": 3}
    assert {"value": 42.0, "unit": "mm", "step": 3} in [u["mpjpe"] for u in updates if "mpjpe" in u]
    again = ok(mcp.call("cq_hub_watch", run=exp_id, since=last["cursor"]))
    assert again["lines"] == [] and again["metrics"] == {} and again["finished"]
    replay, cursor = [], None  # a finished run replays, here two log records (one or more lines each) per call
    for _ in range(40):
        page = ok(mcp.call("cq_hub_watch", run=exp_id, limit=2, **({"since": cursor} if cursor else {})))
        replay, cursor = replay + page["lines"], page["cursor"]
        assert page["more"] != page["finished"]
        if page["finished"]:
            break
    assert page["finished"] and sorted(replay) == sorted(lines)
    assert [line for line in replay if not line.startswith("[")] == TRAIN_LINES

    metrics = ok(mcp.call("cq_metrics", run=exp_id))
    assert metrics["metrics"] == {
        "loss": {"final": 0.25, "min": 0.25, "max": 1.0, "count": 4, "unit": None},
        "mpjpe": {"final": 42.0, "min": 42.0, "max": 48.0, "count": 4, "unit": "mm"}}
    assert metrics["flow_run_id"] == flow_run_id
    assert metrics["metrics"] == json.loads(run_cq("metrics", exp_id, "--json").stdout)  # as `cq metrics` prints
    status = ok(mcp.call("c4_hub_status", run=flow_run_id))  # the alias, by flow-run id
    assert status["state"] == "COMPLETED" and status["finished"] and status["exit_code"] == 0
    assert status["metrics"] == {"loss": {"value": 0.25, "unit": None}, "mpjpe": {"value": 42.0, "unit": "mm"}}
    assert status["exp_id"] == exp_id and status["links"] == submitted["links"]
    # as the seed's assistant calls them: c4_ names, job_id for the run
    assert ok(mcp.call("c4_hub_metrics", job_id=exp_id))["metrics"] == metrics["metrics"]
    assert ok(mcp.call("cq_hub_metrics", job_id=flow_run_id))["metrics"] == metrics["metrics"]
    assert ok(mcp.call("c4_hub_status", job_id=exp_id)) == status
    watched = ok(mcp.call("c4_hub_watch", job_id=exp_id, since=last["cursor"]))
    assert watched["finished"] and watched["lines"] == [] and watched["flow_run_id"] == flow_run_id
    assert ok(mcp.call("c4_hub_status", run=exp_id, job_id=exp_id))["exp_id"] == exp_id  # both, the same: fine


def test_watch_returns_a_record_that_reaches_prefect_late_exactly_once(stack, prefect_client):
    """Prefect takes a run's records from several senders: one stamped earlier may arrive after later ones."""
    from datetime import datetime, timedelta, timezone

    from prefect import flow

    from cq_prefect.mcp_server import Hub

    @flow(name="mcp-late-logs")
    def quiet():
        pass

    flow_run = prefect_client.create_flow_run(quiet, name=f"mcp-late-{uuid.uuid4().hex[:6]}")
    start = datetime.now(timezone.utc)

    def log(text: str, offset: float, name: str = "cq.output.x") -> dict:
        return {"name": name, "level": 20, "message": text, "flow_run_id": str(flow_run.id),
                "timestamp": (start + timedelta(seconds=offset)).isoformat()}

    hub = Hub()
    hub.start()
    try:
        prefect_client.create_logs([log("line 1", 0), log("line 2", 1)])
        first = hub.watch(str(flow_run.id))
        assert first["lines"] == ["line 1", "line 2"] and not first["finished"]
        prefect_client.create_logs([log("engine says", 0.5, "prefect.flow_runs"), log("line 3", 2)])
        second = hub.watch(str(flow_run.id), since=first["cursor"])
        assert second["lines"] == ["[INFO] engine says", "line 3"]  # the late one too, once
        third = hub.watch(str(flow_run.id), since=second["cursor"])
        assert third["lines"] == []
        prefect_client.create_logs([log(f"burst {i}", 3 + i / 1000) for i in range(5)])
        paged, cursor = [], third["cursor"]
        while True:
            page = hub.watch(str(flow_run.id), since=cursor, limit=2)
            paged, cursor = paged + page["lines"], page["cursor"]
            if not page["more"]:
                break
        assert paged == [f"burst {i}" for i in range(5)]
    finally:
        hub.close()
        prefect_client.delete_flow_run(flow_run.id)


def test_watch_reports_a_new_point_even_when_its_value_repeats(stdio, tmp_path):
    """`metrics` holds each key with a new latest point since the cursor, not only a changed value."""
    write_script(tmp_path, "plateau.py", """\
        import os, time
        print("@loss=0.5", flush=True)
        while not os.path.exists("go"):
            time.sleep(0.1)
        print("@loss=0.5", flush=True)
        """)
    run = ok(stdio.call("cq_hub_submit", name="mcp-plateau", workdir=str(tmp_path), command=f"{PYTHON} plateau.py",
                        timeout_sec=120))["exp_id"]
    cursor, updates, deadline = None, [], time.monotonic() + 90
    while not updates:  # the first point
        answer = ok(stdio.call("cq_hub_watch", run=run, **({"since": cursor} if cursor else {})))
        updates += [answer["metrics"]["loss"]] if "loss" in answer["metrics"] else []
        cursor = answer["cursor"]
        assert time.monotonic() < deadline and not answer["finished"], answer
        time.sleep(0.3)
    (tmp_path / "go").touch()
    while not (answer := ok(stdio.call("cq_hub_watch", run=run, since=cursor)))["finished"]:
        updates += [answer["metrics"]["loss"]] if "loss" in answer["metrics"] else []
        cursor = answer["cursor"]
        assert time.monotonic() < deadline, answer
        time.sleep(0.3)
    updates += [answer["metrics"]["loss"]] if "loss" in answer["metrics"] else []
    assert answer["state"] == "COMPLETED"
    assert updates == [{"value": 0.5, "unit": None, "step": 0}, {"value": 0.5, "unit": None, "step": 1}]
    history = ok(stdio.call("cq_metrics", run=run, history=True))["metrics"]["loss"]["history"]
    assert history == [[0, 0.5], [1, 0.5]]  # every point, as the docstring says
    # a cursor written before steps were kept (the value alone per key) still reads; nothing new in it
    data = json.loads(base64.urlsafe_b64decode(answer["cursor"] + "=" * (-len(answer["cursor"]) % 4)))
    old = base64.urlsafe_b64encode(json.dumps({**data, "m": {"loss": 0.5}}).encode()).decode().rstrip("=")
    again = ok(stdio.call("cq_hub_watch", run=run, since=old))
    assert again["metrics"] == {} and again["lines"] == [] and again["finished"]


def test_submit_to_a_pool_nobody_polls_returns_the_clis_warning(stdio, tmp_path):
    pool = f"mcp-nobody-{uuid.uuid4().hex[:6]}"
    submitted = ok(stdio.call("cq_hub_submit", name="mcp-unpolled", workdir=str(tmp_path), command="true", pool=pool,
                              timeout_sec=30))
    try:
        assert len(submitted["warnings"]) == 1, submitted
        warning = submitted["warnings"][0]
        assert f"no worker is polling pool '{pool}'" in warning and f"cq worker start --pool {pool}" in warning
        # `cq submit` prints the same warning, as `cq: warning: …`
        output = run_cq("submit", "--name", "cli-unpolled", "--workdir", str(tmp_path), "--command", "true",
                        "--pool", pool, "--json")
        assert output.returncode == 0, output.stderr
        assert f"cq: warning: {warning}" in output.stderr.splitlines()
        cli_run = json.loads(output.stdout)["flow_run_id"]
    finally:  # nothing polls the pool: cancel them, so nothing lingers
        cancelled = ok(stdio.call("cq_hub_cancel", run=submitted["flow_run_id"]))
        assert cancelled["cancelled"] and cancelled["state"] == "CANCELLED"
    assert ok(stdio.call("cq_hub_cancel", run=cli_run))["state"] == "CANCELLED"


def test_cancel_stops_a_running_experiment_and_kills_its_processes(stdio, tmp_path):
    write_script(tmp_path, "long.py", """\
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open("pids", "w").write(f"{__import__('os').getpid()} {child.pid}")
        print("started", flush=True)
        time.sleep(120)
        """)
    submitted = ok(stdio.call("cq_hub_submit", name="mcp-cancel", workdir=str(tmp_path), command=f"{PYTHON} long.py"))
    run = submitted["exp_id"]
    deadline = time.monotonic() + 90
    cursor, lines = None, []
    while "started" not in lines:
        answer = ok(stdio.call("cq_hub_watch", run=run, **({"since": cursor} if cursor else {})))
        lines += answer["lines"]
        cursor = answer["cursor"]
        assert time.monotonic() < deadline, answer
        time.sleep(0.3)
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert all(pid_alive(pid) for pid in pids)
    cancelled = ok(stdio.call("cq_hub_cancel", run=run))
    assert cancelled["cancelled"] and cancelled["state"] == "CANCELLING"
    started = time.monotonic()
    while (status := ok(stdio.call("cq_hub_status", run=run)))["state"] != "CANCELLED":
        assert time.monotonic() - started < 60, status
        time.sleep(0.5)
    assert status["finished"] and status["outcome"] == "cancelled"
    # the command and the process it started are gone (the worker stops the whole process group)
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), timeout=30, what=f"processes {pids} to end")
    again = ok(stdio.call("cq_hub_cancel", run=run))
    assert not again["cancelled"] and "already cancelled" in again["message"]


# -- bad input --------------------------------------------------------------------------------------


def test_bad_input_comes_back_as_the_clis_message_and_the_server_goes_on(mcp, stack, tmp_path):
    before = count_all_runs(stack)
    missing = f"/nonexistent/cq-mcp/{uuid.uuid4().hex[:6]}"
    text = error_text(mcp.call("cq_hub_submit", name="bad", workdir=missing, command="true"))
    assert text == cli_error("submit", "--name", "bad", "--workdir", missing, "--command", "true")
    assert f"workdir {missing} does not exist" in text and "create it" in text

    text = error_text(mcp.call("cq_hub_submit", name="bad", command="true"))  # no workdir at all
    assert "'workdir' is required" in text and "folder the command runs in" in text
    text = error_text(mcp.call("cq_hub_submit", name="bad", workdir=str(tmp_path), command="true", gpus=1))
    assert "unknown argument 'gpus'" in text and "gpu_count" in text
    text = error_text(mcp.call("cq_hub_submit", name="bad", workdir=str(tmp_path), command="true", gpu_count=-1))
    assert text == cli_error("submit", "--name", "bad", "--workdir", str(tmp_path), "--command", "true",
                             "--gpu-count", "-1")

    for tool in ("cq_hub_status", "cq_hub_watch", "cq_metrics", "cq_hub_cancel"):
        text = error_text(mcp.call(tool, run="no-such-run"))
        assert text == cli_error("metrics", "no-such-run")
        assert "no run 'no-such-run'" in text and "prefect flow-run ls" in text

    malformed = "name: broken\nnodes:\n  - name: a\n    command: [unclosed\n"
    dag_file = tmp_path / "broken.yaml"
    dag_file.write_text(malformed)
    text = error_text(mcp.call("cq_hub_dag_from_yaml", yaml_content=malformed))
    assert "invalid YAML" in text and "yaml_content:5:1" in text
    assert text == cli_error("dag", "validate", str(dag_file)).replace(str(dag_file), "yaml_content")
    text = error_text(mcp.call("cq_hub_dag_from_yaml", yaml_content="name: cyc\nnodes:\n  - {name: a, command: x, "
                                                                     "depends_on: [b]}\n  - {name: b, command: y, "
                                                                     "depends_on: [a]}\n"))
    assert "cycle" in text and "a" in text and "b" in text

    text = error_text(mcp.call("cq_hub_watch", run="no-such-run", since="not-a-cursor"))
    assert "no run 'no-such-run'" in text
    text = error_text(mcp.call("cq_loop_status", loop="no-such-loop"))
    assert text == cli_error("loop", "status", "no-such-loop")
    text = error_text(mcp.call("cq_knowledge_search", query="loss", limit=0))
    assert text == cli_error("knowledge", "search", "loss", "--limit", "0")
    text = error_text(mcp.call("no_such_tool"))
    assert "cq_hub_submit" in text

    assert count_all_runs(stack) == before  # nothing was created
    assert ok(mcp.call("cq_hub_dag_from_yaml", yaml_content="name: fine\nnodes:\n  - {name: a, command: 'true'}\n",
                       run=False))["valid"]  # and the server is still serving


def test_a_bad_cursor_is_a_tool_error_naming_the_fix(stdio, tmp_path):
    write_script(tmp_path, "quick.py", "print('hi')\n")
    run = ok(stdio.call("cq_hub_submit", name="mcp-cursor", workdir=str(tmp_path), command=f"{PYTHON} quick.py"))
    text = error_text(stdio.call("cq_hub_watch", run=run["exp_id"], since="garbage!"))
    assert "since" in text and "leave since out" in text
    other = ok(stdio.call("cq_hub_submit", name="mcp-cursor-2", workdir=str(tmp_path), command=f"{PYTHON} quick.py"))
    cursor = ok(stdio.call("cq_hub_watch", run=other["exp_id"]))["cursor"]
    text = error_text(stdio.call("cq_hub_watch", run=run["exp_id"], since=cursor))
    assert "belongs to another run" in text


# -- DAGs -------------------------------------------------------------------------------------------


def test_dag_from_yaml_validates_then_runs_to_completion(stdio, tmp_path, mlflow_client):
    out = tmp_path / "order.txt"
    dag = f"""\
name: mcp-dag-{uuid.uuid4().hex[:6]}
nodes:
  - name: prepare
    command: echo prepare >> {out}
  - name: train
    command: echo train >> {out}
    depends_on: [prepare]
  - name: report
    command: echo report >> {out}
    depends_on: [train]
"""
    checked = ok(stdio.call("cq_hub_dag_from_yaml", yaml_content=dag, run=False))
    assert checked["stages"] == [["prepare"], ["train"], ["report"]] and "flow_run_id" not in checked
    assert not out.exists()
    started = ok(stdio.call("c4_hub_dag_from_yaml", yaml_content=dag))
    assert started["links"]["prefect_flow_run"].endswith(f"/runs/flow-run/{started['flow_run_id']}")
    early = ok(stdio.call("cq_hub_status", run=started["flow_run_id"]))  # before the DAG's MLflow run exists
    last, _, _ = follow(stdio, started["flow_run_id"])
    assert last["state"] == "COMPLETED", last
    assert out.read_text().split() == ["prepare", "train", "report"]
    status = ok(stdio.call("cq_hub_status", run=started["flow_run_id"]))
    assert status["outcome"] == "success" and early["flow_run_id"] == status["flow_run_id"]
    # the DAG's own MLflow run (its nodes' runs nest under it), linked, not one of its nodes' runs
    dag_run = mlflow_client.get_run(status["mlflow_run_id"])
    tags = dag_run.data.tags
    assert tags["cq.kind"] == "dag" and tags["cq.prefect.flow_run_id"] == status["flow_run_id"]
    assert status["links"]["mlflow_run"] == last["links"]["mlflow_run"]
    assert status["links"]["mlflow_run"].endswith(
        f"/#/experiments/{dag_run.info.experiment_id}/runs/{dag_run.info.run_id}")


# -- research loops -----------------------------------------------------------------------------------


def test_loop_start_then_status_until_it_finishes(stdio, tmp_path):
    write_script(tmp_path, "train.py", """\
        import sys
        args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
        print(f"@mpjpe={21.4 - float(args.get('g', 0)):.2f}mm", flush=True)
        """)
    name = f"mcp-loop-{uuid.uuid4().hex[:6]}"
    config = {"name": name, "goal": "improve MPJPE below 18mm", "metric": "mpjpe", "budget": 2,
              "experiment": {"workdir": str(tmp_path), "command": f"{PYTHON} train.py"},
              "proposer": {"kind": "scripted", "ideas": [{"title": "bone-length loss", "overrides": {"g": 1.5}}]}}
    text = error_text(stdio.call("cq_loop_start", config={**config, "budget": 0}))
    assert "budget" in text
    started = ok(stdio.call("cq_loop_start", config=config))
    assert started["name"] == name and started["flow_run_id"]
    deadline = time.monotonic() + 150
    while (status := ok(stdio.call("cq_loop_status", loop=name)))["status"] in ("starting", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["status"] == "finished", status
    assert [(e["hypothesis"], e["outcome"]) for e in status["experiments"]] == [
        ("baseline", "kept"), ("bone-length loss", "kept")]
    assert status["best"] == pytest.approx(19.9) and status["budget_left"] == 0
    assert status["links"]["mlflow_run"].endswith(f"/runs/{status['mlflow_run_id']}")
    listed = ok(stdio.call("c4_loop_status"))["loops"]
    assert {"name": name, "status": "finished"}.items() <= next(l for l in listed if l["name"] == name).items()
    stopped = ok(stdio.call("cq_loop_stop", loop=name))  # already finished: stays as it is
    assert stopped["status"] == "finished"


def test_loop_start_takes_a_loop_file_and_a_bad_one_gets_the_clis_message(stdio, tmp_path):
    write_script(tmp_path, "train.py", "print('@mpjpe=20.5mm', flush=True)\n")
    name = f"mcp-file-{uuid.uuid4().hex[:6]}"
    loop = tmp_path / "loop.yaml"
    body = f"""\
name: {name}
goal: improve MPJPE below 18mm
metric: mpjpe
budget: BUDGET
experiment: {{workdir: ., command: {PYTHON} train.py}}
proposer: {{kind: scripted, ideas: [{{title: more, overrides: {{lr: 0.1}}}}]}}
"""
    loop.write_text(body.replace("BUDGET", "0"))
    text = error_text(stdio.call("cq_loop_start", config=str(loop)))
    assert text == cli_error("loop", "start", str(loop))  # the file's name and line, as `cq loop start` says it
    assert "budget" in text and str(loop) in text
    loop.write_text(body.replace("BUDGET", "1"))
    started = ok(stdio.call("cq_loop_start", config=str(loop)))
    assert started["name"] == name
    deadline = time.monotonic() + 150
    while (status := ok(stdio.call("cq_loop_status", loop=name)))["status"] in ("starting", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["status"] == "finished" and status["best"] == pytest.approx(20.5), status
    # `workdir: .` was taken from the file's folder, as `cq loop start FILE` takes it
    assert [e["hypothesis"] for e in status["experiments"]] == ["baseline"]


def test_loop_start_accepts_yaml_text_and_refuses_a_running_name(stdio, tmp_path):
    write_script(tmp_path, "slow.py", "import time\ntime.sleep(60)\nprint('@loss=1')\n")
    name = f"mcp-yaml-{uuid.uuid4().hex[:6]}"
    yaml_text = f"""\
name: {name}
goal: loss below 0.5
metric: loss
budget: 3
experiment: {{workdir: {tmp_path}, command: {PYTHON} slow.py}}
proposer: {{kind: scripted, ideas: [{{title: more, overrides: {{lr: 0.1}}}}]}}
"""
    started = ok(stdio.call("cq_loop_start", config=yaml_text))
    assert started["name"] == name
    deadline = time.monotonic() + 90
    while ok(stdio.call("cq_loop_status", loop=name))["status"] == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    text = error_text(stdio.call("cq_loop_start", config=yaml_text))
    assert f"loop '{name}' is running" in text and "cq loop stop" in text
    stopped = ok(stdio.call("cq_loop_stop", loop=name, wait=60))
    assert stopped["status"] == "stopped" and stopped["reason"] == "stopped"
    # the name again: from the first call on, the status is the new loop's, never the stopped one's
    again = ok(stdio.call("cq_loop_start", config=yaml_text))
    status = ok(stdio.call("cq_loop_status", loop=name))
    assert status["status"] in ("starting", "running"), status
    assert status["flow_run_id"] == again["flow_run_id"]
    assert status["status"] == "running" or status["previous"]["status"] == "stopped"
    stopped = ok(stdio.call("cq_loop_stop", loop=name, wait=60))  # waits for it to start, then stops it
    assert stopped["status"] == "stopped" and stopped["flow_run_id"] == again["flow_run_id"]


# -- knowledge ----------------------------------------------------------------------------------------


def test_knowledge_search_and_pi_return_structured_results(stdio, tmp_path):
    word = f"zygo{uuid.uuid4().hex[:6]}"
    noted = run_cq("note", f"{word} augmentation helps the wrist joints", "--tag", "mcp")
    assert noted.returncode == 0, noted.stderr
    found = ok(stdio.call("cq_knowledge_search", query=f"{word} augmentation", limit=3))
    assert found["query"] == f"{word} augmentation" and found["total"] >= 1 and found["matched"] >= 1
    hit = found["hits"][0]
    assert hit["kind"] == "note" and word in hit["text"] and hit["tags"] == ["mcp"] and hit["mlflow_run_id"]
    assert found == json.loads(run_cq("knowledge", "search", f"{word} augmentation", "--limit", "3", "--json").stdout)

    ideas = tmp_path / "ideas.yaml"
    pi = ok(stdio.call("cq_pi", text=f"improve wrist accuracy with {word}, target below 18mm", out=str(ideas),
                       claude=False))
    assert {"goal", "total", "matched", "hits", "ideas", "out", "derived_from"} <= set(pi)
    assert pi["derived_from"] == "knowledge" and any(word in (h["text"] or "") for h in pi["hits"])
    assert (pi["out"] is None) == (not pi["ideas"]) and (pi["out"] is None or Path(pi["out"]) == ideas)
    text = error_text(stdio.call("cq_pi", text=f"improve {word}", out=str(tmp_path / "no" / "such" / "x.yaml")))
    assert "does not exist" in text and "mkdir -p" in text


# -- remote access --------------------------------------------------------------------------------------


def _post(url: str, body: dict, auth: str | None, session_id: str | None = None) -> httpx.Response:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-06-18"}
    headers.update({"Authorization": auth} if auth else {})
    headers.update({"Mcp-Session-Id": session_id} if session_id else {})
    return httpx.post(url, headers=headers, json=body, timeout=60)


def test_http_refuses_requests_without_the_right_token_and_never_logs_it(http, http_server, stack, tmp_path):
    url, log = http_server
    write_script(tmp_path, "train.py", "print('@loss=1')\n")
    # A session opened with the token, and a call in it that creates a run when it gets through …
    opened = _post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        f"Bearer {TOKEN}")
    assert opened.status_code == 200, opened.text
    session_id = opened.headers["mcp-session-id"]
    assert _post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, f"Bearer {TOKEN}",
                 session_id).status_code == 202
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "cq_hub_submit", "arguments": {
        "name": "intruder", "workdir": str(tmp_path), "command": f"{PYTHON} train.py"}}}
    before = count_all_runs(stack)
    # … is refused without the token or with a wrong one, on every method and path, and does nothing
    for auth in (None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN[:-1]}",
                 "Bearer"):
        response = _post(url, call, auth, session_id)
        assert response.status_code == 401, (auth, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in response.json()["error_description"]
        for method in ("GET", "DELETE"):
            assert httpx.request(method, url, headers={"Authorization": auth or ""}, timeout=30).status_code == 401
    assert _post(url.removesuffix("/mcp") + "/other", call, None).status_code == 401
    assert count_all_runs(stack) == before
    # with the token, the same call runs
    accepted = _post(url, call, f"Bearer {TOKEN}", session_id)
    assert accepted.status_code == 200 and '"flow_run_id"' in accepted.text, accepted.text
    assert count_all_runs(stack)[0] == before[0] + 1
    assert "loops" in ok(http.call("cq_loop_status"))  # the client session goes on
    logged = log.read_text()
    assert "401 for POST /mcp" in logged  # refusals are logged …
    assert TOKEN not in logged and TOKEN[8:20] not in logged  # … the token never


def test_http_token_can_come_from_a_prefect_secret_block(stack, tmp_path):
    from prefect.blocks.system import Secret

    name, token = f"mcp-token-{uuid.uuid4().hex[:6]}", "block-" + secrets.token_urlsafe(24)
    Secret(value=token).save(name)
    env = {k: v for k, v in os.environ.items() if k != "CQ_MCP_TOKEN"}
    missing = run_cq("mcp", "--http", "--port", str(free_port()), "--token-block", "no-such-block", env=env)
    assert missing.returncode == 2 and "no Secret block" in missing.stderr and "CQ_MCP_TOKEN" in missing.stderr
    port, log = free_port(), tmp_path / "server.log"
    proc = start_http(port, log, "--token-block", name, token=None)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
        assert _post(url, initialize, f"Bearer {TOKEN}").status_code == 401  # CQ_MCP_TOKEN's is not this one's
        assert _post(url, initialize, f"Bearer {token}").status_code == 200
    finally:
        stop_process_group(proc)
    logged = log.read_text()
    assert f"Secret block '{name}'" in logged and token not in logged


def test_the_token_reaches_no_process_the_server_starts(http, http_server, stack, tmp_path, prefect_client):
    """CQ_MCP_TOKEN leaves the server's environment once read: neither a command nor a loop run here sees it."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    submitted = ok(http.call("cq_hub_submit", name="mcp-env", workdir=str(tmp_path), command="env"))
    last, lines, _ = follow(http, submitted["exp_id"])
    assert last["state"] == "COMPLETED" and any(line.startswith("PATH=") for line in lines), lines
    assert not any(TOKEN in line or "CQ_MCP_TOKEN" in line for line in lines)
    logs = prefect_client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
        any_=[uuid.UUID(submitted["flow_run_id"])])))
    assert logs and not any(TOKEN in log.message for log in logs)

    # a loop started over HTTP runs in a process the server starts (no worker polls the loop pool here)
    write_script(tmp_path, "train.py", "print('@loss=1', flush=True)\n")
    name = f"mcp-env-{uuid.uuid4().hex[:6]}"
    started = ok(http.call("cq_loop_start", config={
        "name": name, "goal": "loss below 0.5", "metric": "loss", "budget": 1,
        "experiment": {"workdir": str(tmp_path), "command": f"{PYTHON} train.py"},
        "proposer": {"kind": "scripted", "ideas": [{"title": "more", "overrides": {"lr": 0.1}}]}}))
    try:
        assert started["running_here"] and started["pid"], started
        environ = Path(f"/proc/{started['pid']}/environ").read_bytes().split(b"\0")
        assert any(entry.startswith(b"PREFECT_API_URL=") for entry in environ)  # it is the loop's environment
        assert not any(entry.startswith(b"CQ_MCP_TOKEN=") or TOKEN.encode() in entry for entry in environ)
    finally:
        wait_for(lambda: ok(http.call("cq_loop_status", loop=name))["status"] not in ("starting", "running"),
                 timeout=150, interval=1, what=f"loop {name} to end")
    assert TOKEN not in http_server[1].read_text()


def test_http_listens_on_loopback_only_by_default(http, http_server):
    url, _ = http_server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    addresses = [line.split()[3] for line in listening.stdout.splitlines()]
    assert addresses == [f"127.0.0.1:{port}"], listening.stdout
    # and from this host's other addresses nothing answers
    others = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=False).stdout.split()
    for address in [a for a in others if not a.startswith("127.") and ":" not in a]:
        with socket.socket() as sock:
            sock.settimeout(5)
            assert sock.connect_ex((address, port)) != 0, address


def _initialize(url: str, host: str | None = None) -> httpx.Response:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "Authorization": f"Bearer {TOKEN}", **({"Host": host} if host else {})}
    return httpx.post(url, headers=headers, timeout=60, json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                 "clientInfo": {"name": "raw", "version": "0"}}})


def test_a_proxys_host_name_is_refused_unless_allowed(http_server, tmp_path):
    """Bound to 127.0.0.1 the mcp package accepts only Host: 127.0.0.1/localhost/[::1] with a port (421 else)."""
    url, _ = http_server
    assert _initialize(url).status_code == 200
    assert _initialize(url, "mcp.example.test").status_code == 421
    port, log = free_port(), tmp_path / "server.log"
    proc = start_http(port, log, "--allowed-host", "mcp.example.test", "--allowed-host", "alt.example.test:*")
    try:
        allowed = f"http://127.0.0.1:{port}/mcp"
        assert _initialize(allowed, "mcp.example.test").status_code == 200
        assert _initialize(allowed, "alt.example.test:8443").status_code == 200
        assert _initialize(allowed).status_code == 200  # its own address still
        assert _initialize(allowed, "evil.example.test").status_code == 421
        assert _initialize(allowed, "mcp.example.test:8443").status_code == 421  # NAME alone: that Host exactly
    finally:
        stop_process_group(proc)


# -- the README ---------------------------------------------------------------------------------------


def readme_tool_calls() -> list[tuple[str, dict]]:
    """The `→ TOOL {arguments}` calls of the README's worked example, their JSON parsed."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Worked example: the seed's phases 3 and 4 as tool calls", 1)[1].split("\n## ", 1)[0]
    decoder = json.JSONDecoder()
    return [(call["tool"], decoder.raw_decode(section, call.end())[0])
            for call in re.finditer(r"^→ (?P<tool>\w+) ", section, re.MULTILINE)]


def test_the_readmes_worked_example_calls_real_tools_and_its_loop_config_parses():
    import inspect

    from cq_prefect.loop_config import LoopConfig
    from cq_prefect.mcp_server import TOOLS, Hub, aliases

    methods = {name: getattr(Hub, attr) for tool, attr in TOOLS for name in (tool, *aliases(tool))}
    calls = readme_tool_calls()
    assert {"cq_hub_submit", "cq_hub_watch", "cq_metrics", "cq_loop_start", "cq_loop_status"} <= {t for t, _ in calls}
    for tool, arguments in calls:
        assert tool in methods, tool
        accepted = set(inspect.signature(methods[tool]).parameters) - {"self"}
        accepted |= {"job_id"} if "run" in accepted and tool != "cq_hub_dag_from_yaml" else set()
        assert set(arguments) <= accepted, (tool, set(arguments) - accepted)
    submit = next(arguments for tool, arguments in calls if tool == "cq_hub_submit")
    assert submit["gpu_count"] == 1 and submit["exp_id"] == "exp-043"  # the seed's phase 3 call
    assert any(tool == "cq_hub_watch" and "since" in arguments for tool, arguments in calls)  # with the cursor
    config = LoopConfig.parse(next(arguments for tool, arguments in calls if tool == "cq_loop_start")["config"],
                              source="README")
    assert (config.goal, config.metric, config.direction, config.target, config.budget) == (
        "improve MPJPE below 18mm", "mpjpe", "minimize", 18.0, 5)
    assert config.experiment.gpu_count == 1 and config.proposer.kind == "scripted"
