"""Dispatch latency: from `submit()` to the command's first output line, cq-gpu worker vs a stock process worker.

Starts a private embedded stack (temporary CQ_HOME, free ports), then two pools with the same experiment
deployment:
  - `bench-cq`: a `cq worker start --gpus 0` worker at its defaults (polls every 1 s, warm engine);
  - `bench-stock`: `prefect worker start --type process` at Prefect's defaults (polls every 10 s, a fresh
    `python -m prefect.engine` per run).
Optionally (`--cold`) a third pool whose cq-gpu worker runs with CQ_WARM_ENGINE=0, to show what the warm
engine is worth. Runs are submitted one at a time through `cq_prefect.submit` in this process; each
command's first line is `date +%s.%N`, the moment the shell started it, which the command also writes to a
file. Latency = that moment − the moment `submit()` was called. Prints p50/p95 per worker and the ratio.

    .venv/bin/python bench/dispatch_latency.py            # 20 runs per worker, ~6 minutes
    .venv/bin/python bench/dispatch_latency.py --runs 5   # a smoke run
Goal: cq p50 <= 1.5 s, p95 <= 3 s, and p50 <= 0.4 x stock. Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from metrics_pipeline import free_port, settle  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def private_stack_env(prefix: str) -> Path:
    """A temporary CQ_HOME on free ports, with every setting that would point cq elsewhere removed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(CQ_HOME=str(tmp / "cq-home"), CQ_PREFECT_PORT=str(free_port()),
                      CQ_MLFLOW_PORT=str(free_port()), PREFECT_HOME=str(tmp / "prefect-client"))
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "CQ_POOL", "PREFECT_WORKER_QUERY_SECONDS",
                 "CQ_WARM_ENGINE"):
        os.environ.pop(name, None)
    return tmp


def start_worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while "started!" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker {argv} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc


def measure(submit, pool: str, workdir: Path, runs: int, label: str) -> list[float]:
    latencies = []
    for i in range(runs):
        mark = workdir / f"{label}-{i}.start"
        t0 = time.time()
        handle = submit(name=f"{label}-{i}", workdir=str(workdir), pool=pool,
                        command=f"date +%s.%N | tee {mark}; echo @i={i}")
        result = handle.wait(timeout=300)
        if result.outcome != "success":
            raise SystemExit(f"{label} run {i} ended {result.outcome}")
        latencies.append(float(mark.read_text()) - t0)
        print(f"   {label} run {i + 1:2d}: {latencies[-1]:6.2f} s", flush=True)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cold", action="store_true", help="also measure a cq-gpu worker without the warm engine")
    parser.add_argument("--no-stock", action="store_true",
                        help="skip the stock process worker (quicker, for iterating; NOT the full benchmark: no ratio)")
    opts = parser.parse_args(argv)

    tmp = private_stack_env("cq-bench-dispatch-")

    from cq_prefect.stack import StackConfig, _bin, down, up

    config = StackConfig.from_env()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    workers: list[subprocess.Popen] = []
    try:
        endpoints = up(config, worker=False)
        print(settle(config))
        env = dict(os.environ, PREFECT_API_URL=endpoints.prefect_api_url,
                   MLFLOW_TRACKING_URI=endpoints.mlflow_tracking_uri)
        from cq_prefect.stack import prefect_settings

        with prefect_settings(endpoints):
            from prefect.client.orchestration import get_client

            from cq_prefect.deployment import ensure_experiment_deployment, ensure_work_pool
            from cq_prefect.submission import submit

            with get_client(sync_client=True) as client:
                ensure_work_pool(client, "bench-stock", "process")
                ensure_experiment_deployment("bench-stock", client)
            pools = [("cq-gpu (warm engine)", "bench-cq", [_bin("cq"), "worker", "start", "--pool", "bench-cq",
                                                            "--gpus", "0"], {})]
            if opts.cold:
                pools.append(("cq-gpu (cold engine)", "bench-cold", [_bin("cq"), "worker", "start", "--pool",
                                                                     "bench-cold", "--gpus", "0"],
                              {"CQ_WARM_ENGINE": "0"}))
            if not opts.no_stock:
                pools.append(("stock process worker", "bench-stock", [_bin("prefect"), "worker", "start", "--pool",
                                                                      "bench-stock", "--type", "process"], {}))
            for _, pool, args, extra in pools:
                workers.append(start_worker(args, {**env, **extra}, tmp / f"{pool}.log"))
            time.sleep(8)  # let the warm engine finish importing
            workdir = tmp / "work"
            workdir.mkdir()
            submit(name="warm-up", workdir=str(workdir), pool="bench-cq", command="true").wait(timeout=300)
            figures = {}
            for title, pool, _, _ in pools:
                print(f"\n{title} (pool {pool}), {opts.runs} runs one after another:", flush=True)
                figures[title] = measure(submit, pool, workdir, opts.runs, pool)
        print("\nsubmit → first output line of the command")
        for title, values in figures.items():
            print(f"  {title:24} p50 {statistics.median(values):5.2f} s   p95 {percentile(values, 95):5.2f} s   "
                  f"min {min(values):5.2f} s   max {max(values):5.2f} s")
        cq = figures["cq-gpu (warm engine)"]
        p50, p95 = statistics.median(cq), percentile(cq, 95)
        if opts.no_stock:
            ok = p50 <= 1.5 and p95 <= 3.0
            print(f"partial (--no-stock, not the full benchmark): p50 <= 1.5 s: {p50:.2f} s · p95 <= 3 s: {p95:.2f} s"
                  f" → {'pass' if ok else 'fail'}")
            return 0 if ok else 1
        stock = figures["stock process worker"]
        ratio = p50 / statistics.median(stock)
        ok = p50 <= 1.5 and p95 <= 3.0 and ratio <= 0.4
        print(f"goal: p50 <= 1.5 s: {p50:.2f} s · p95 <= 3 s: {p95:.2f} s · p50 <= 0.4x stock: {ratio:.2f}x"
              f" → {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        down(config, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
