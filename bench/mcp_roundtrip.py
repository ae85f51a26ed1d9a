"""MCP round trip: one `cq_hub_status` tool call, client to `cq mcp` and back, over stdio and over HTTP.

Starts a private embedded stack (temporary CQ_HOME, free ports, a worker on pool `local`), runs one small
experiment to completion (the run the calls ask about), waits for the stack to go quiet, then for each
transport starts the real server as an assistant would — `cq mcp` on a pipe (the `mcp` package's stdio
client), `cq mcp --http` on a free port with CQ_MCP_TOKEN (its streamable-HTTP client, sending the bearer
token) — makes 10 warm-up calls and times `--calls` more, one after another. Also times the same work in
this process without MCP (`Hub.status`: one Prefect and one MLflow request), to show what the transport adds.

    .venv/bin/python bench/mcp_roundtrip.py              # 100 calls per transport: 1 to 4 minutes (below)
    .venv/bin/python bench/mcp_roundtrip.py --calls 20   # a smoke run

Run time: about a minute on a quiet machine (53 s on the 2-core VM of bench/README.md); most of it is the
stack starting and then going quiet, which waits up to 3 minutes when other work keeps the CPUs busy, so up
to ~4 minutes. Goal: p50 <= 50 ms on each transport. Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_latency import percentile, private_stack_env  # noqa: E402
from metrics_pipeline import free_port, settle  # noqa: E402

CQ = str(Path(sys.executable).with_name("cq"))
WARM_UP = 10
GOAL_MS = 50.0


async def time_calls(client, run: str, calls: int) -> list[float]:
    for _ in range(WARM_UP):
        result = await client.call_tool("cq_hub_status", {"run": run})
        assert not result.is_error, result.content[0].text
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        result = await client.call_tool("cq_hub_status", {"run": run})
        times.append((time.perf_counter() - started) * 1000)
        assert not result.is_error and result.structured_content["state"] == "COMPLETED"
    return times


async def over_stdio(run: str, calls: int, log: Path) -> list[float]:
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    with log.open("w") as errlog:
        params = StdioServerParameters(command=CQ, args=["mcp"], env=dict(os.environ))
        async with Client(stdio_client(params, errlog=errlog)) as client:
            return await time_calls(client, run, calls)


async def over_http(url: str, token: str, run: str, calls: int) -> list[float]:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        return await time_calls(client, run, calls)


def time_hub(run: str, calls: int) -> list[float]:
    """Hub.status — what the cq_hub_status tool runs — called directly, with the server's warm clients."""
    from cq_prefect.mcp_server import Hub

    hub = Hub()
    hub.start()
    for _ in range(WARM_UP):
        hub.status(run)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        hub.status(run)
        times.append((time.perf_counter() - started) * 1000)
    hub.close()
    return times


def start_http_server(port: int, token: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([CQ, "mcp", "--http", "--port", str(port)], env={**os.environ, "CQ_MCP_TOKEN": token},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"cq mcp --http did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def line(title: str, values: list[float]) -> str:
    return (f"  {title:30} p50 {statistics.median(values):6.1f} ms   p95 {percentile(values, 95):6.1f} ms   "
            f"min {min(values):6.1f} ms   max {max(values):6.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="timed calls per transport (default 100)")
    parser.add_argument("--in-process", metavar="RUN", help=argparse.SUPPRESS)  # the no-MCP figure, in a child
    opts = parser.parse_args(argv)
    if opts.in_process:
        print(json.dumps(time_hub(opts.in_process, opts.calls)))
        return 0

    tmp = private_stack_env("cq-bench-mcp-")
    from cq_prefect.stack import StackConfig, down, up

    config = StackConfig.from_env()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    server: subprocess.Popen | None = None
    try:
        endpoints = up(config)
        os.environ.update(PREFECT_API_URL=endpoints.prefect_api_url, MLFLOW_TRACKING_URI=endpoints.mlflow_tracking_uri)
        from cq_prefect.submission import submit

        workdir = tmp / "work"
        workdir.mkdir()
        (workdir / "train.py").write_text("for i in range(5):\n    print(f'@loss={1 / (i + 1)}')\n")
        handle = submit(name="mcp-bench", workdir=str(workdir), command=f"{sys.executable} train.py",
                        endpoints=endpoints)
        outcome = handle.wait(timeout=300).outcome
        print(f"run {handle.exp_id}: {outcome}")
        print(settle(config), flush=True)

        figures: dict[str, list[float]] = {}
        print(f"\n{opts.calls} cq_hub_status calls each, one after another, after {WARM_UP} warm-up calls:", flush=True)
        # The tool's own work without MCP, in a fresh process as `cq mcp` runs it: what the transports add is
        # the difference. (Not in this process: it has run the stack's start and carries its leftovers.)
        measured = subprocess.run([sys.executable, __file__, "--in-process", handle.exp_id, "--calls", str(opts.calls)],
                                  capture_output=True, text=True, timeout=600, check=True)
        direct = json.loads(measured.stdout.strip().splitlines()[-1])
        print(line("no MCP (Hub.status in-process)", direct), flush=True)

        figures["stdio (cq mcp)"] = asyncio.run(over_stdio(handle.exp_id, opts.calls, tmp / "stdio.log"))
        print(line("stdio (cq mcp)", figures["stdio (cq mcp)"]), flush=True)
        token, port = secrets.token_urlsafe(32), free_port()
        server = start_http_server(port, token, tmp / "http.log")
        figures["HTTP (cq mcp --http)"] = asyncio.run(
            over_http(f"http://127.0.0.1:{port}/mcp", token, handle.exp_id, opts.calls))
        print(line("HTTP (cq mcp --http)", figures["HTTP (cq mcp --http)"]), flush=True)

        p50s = {title: statistics.median(values) for title, values in figures.items()}
        ok = all(p50 <= GOAL_MS for p50 in p50s.values())
        print("goal: p50 <= 50 ms: " + " · ".join(f"{title} {p50:.1f} ms" for title, p50 in p50s.items())
              + f" → {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(30)
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
        down(config, quiet=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
