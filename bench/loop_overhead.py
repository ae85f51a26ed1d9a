"""Research-loop overhead: 10 experiments of a trivial command (sleep 0.1 s, print the metric) run by a loop.

Starts a private embedded stack (Prefect server, MLflow server, a cq-gpu worker on pool ``local``), runs a
scripted loop of 10 experiments (the baseline + 9 ideas, one per cycle, none reaching the goal) through
``cq_prefect.research_loop`` in this process, and prints (loop wall − the sum of the commands' own
run times, as each command measured itself) / 10: what a cycle costs beyond the experiment itself
(proposing, submitting, the worker's claim and start, polling, reading the metric, the ledger, reports).

    .venv/bin/python bench/loop_overhead.py          # ~1 minute
Goal: <= 2 s per cycle. Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_latency import private_stack_env  # noqa: E402
from metrics_pipeline import settle  # noqa: E402

TRIVIAL = """\
import os, sys, time
start = time.time()
time.sleep(0.1)
print(f"@score={1 + len(sys.argv)}", flush=True)
with open(os.environ["TIMES"], "a") as fh:
    fh.write(f"{start} {time.time()}\\n")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=10)
    opts = parser.parse_args(argv)
    tmp = private_stack_env("cq-bench-loop-")
    from cq_prefect.stack import StackConfig, down, prefect_settings, up

    config = StackConfig.from_env()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    try:
        endpoints = up(config)
        print(settle(config))
        os.environ["MLFLOW_TRACKING_URI"] = endpoints.mlflow_tracking_uri
        work = tmp / "work"
        work.mkdir()
        (work / "trivial.py").write_text(TRIVIAL)
        with prefect_settings(endpoints):
            from cq_prefect.loop import research_loop

            def loop_config(name: str, experiments: int, times: Path) -> dict:
                return {
                    "name": name, "metric": "score", "direction": "maximize", "target": 1e9,
                    "budget": experiments,
                    "experiment": {"workdir": str(work), "command": f"{sys.executable} trivial.py",
                                   "env": {"TIMES": str(times)}},
                    "proposer": {"kind": "scripted",
                                 "ideas": [{"title": f"idea {i}", "overrides": {f"x{i}": i}} for i in range(experiments)]},
                }

            research_loop(config=loop_config("warm-up", 2, tmp / "warm.txt"))  # first-use costs off the clock
            times = tmp / "times.txt"
            t0 = time.time()
            result = research_loop(config=loop_config("bench-overhead", opts.experiments, times))
            wall = time.time() - t0
        spans = [tuple(map(float, line.split())) for line in times.read_text().splitlines()]
        own = sum(end - start for start, end in spans)
        assert len(spans) == opts.experiments == len(result.experiments), (len(spans), len(result.experiments))
        per_cycle = (wall - own) / opts.experiments
        print(f"\n{opts.experiments} experiments (reason {result.reason}): loop wall {wall:.2f} s, commands' own "
              f"time {own:.2f} s")
        print(f"overhead per cycle: {per_cycle:.2f} s  (goal <= 2 s → {'PASS' if per_cycle <= 2 else 'FAIL'})")
        return 0 if per_cycle <= 2 else 1
    finally:
        down(config, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
