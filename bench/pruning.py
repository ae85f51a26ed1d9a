"""Pruning: compute spent by a research loop with median pruning against the same loop without it.

Starts a private embedded stack and runs the same scripted loop twice: 20 synthetic experiments whose
printed learning curves differ in quality (final value q, in a shuffled order; every curve falls by the
same amount per step, so a run that is bad early ends bad). Each run records how long its own process
lived. Prints the compute (sum of the experiments' seconds) with ``pruning: median`` against
``pruning: none``, and both loops' best final metric, which must be the same.

    .venv/bin/python bench/pruning.py               # ~3 minutes
Goal: compute with pruning / without <= 0.7, same best. Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_latency import private_stack_env  # noqa: E402
from metrics_pipeline import settle  # noqa: E402

CURVE = """\
import os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
q, steps, pause = float(args["q"]), int(args.get("steps", 8)), float(args.get("pause", 0.25))
start, exp = time.time(), os.environ.get("CQ_EXP_ID", "?")
for step in range(steps):
    print(f"@step={step} @loss={q + 0.5 * (steps - 1 - step):.4f}", flush=True)
    with open(os.environ["TIMES"], "a") as fh:
        fh.write(f"{exp} {start} {time.time()}\\n")
    time.sleep(pause)
with open(os.environ["TIMES"], "a") as fh:
    fh.write(f"{exp} {start} {time.time()}\\n")
"""


def compute(times: Path) -> float:
    spans: dict[str, tuple[float, float]] = {}
    for line in times.read_text().splitlines():
        exp, start, now = line.split()
        spans[exp] = (float(start), max(float(now), spans.get(exp, (0, 0))[1]))
    return sum(end - start for start, end in spans.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args(argv)
    tmp = private_stack_env("cq-bench-pruning-")
    from cq_prefect.stack import StackConfig, down, prefect_settings, up

    config = StackConfig.from_env()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    qualities = [round(1.0 + 0.1 * i, 2) for i in range(opts.runs - 1)]
    random.Random(opts.seed).shuffle(qualities)
    try:
        endpoints = up(config)
        print(settle(config))
        os.environ["MLFLOW_TRACKING_URI"] = endpoints.mlflow_tracking_uri
        work = tmp / "work"
        work.mkdir()
        (work / "curve.py").write_text(CURVE)
        figures = {}
        with prefect_settings(endpoints):
            from cq_prefect.loop import research_loop

            for rule in ("none", "median"):
                times = tmp / f"{rule}.txt"
                loop = {
                    "name": f"bench-pruning-{rule}", "metric": "loss", "direction": "minimize", "target": 0.0,
                    "budget": opts.runs,
                    "experiment": {"workdir": str(work), "command": f"{sys.executable} curve.py",
                                   "params": {"q": 2.0}, "env": {"TIMES": str(times)}},
                    "proposer": {"kind": "scripted",
                                 "ideas": [{"title": f"q={q}", "overrides": {"q": q}} for q in qualities]},
                    "pruning": {"rule": rule, "min_experiments": 3, "min_step": 1},
                }
                t0 = time.time()
                result = research_loop(config=loop)
                wall = time.time() - t0
                outcomes = [r.outcome for r in result.experiments]
                figures[rule] = (compute(times), result.best, wall, outcomes.count("pruned"))
                print(f"pruning {rule:6}: compute {figures[rule][0]:6.1f} s, best {result.best}, "
                      f"{outcomes.count('pruned')} of {len(outcomes)} pruned, loop wall {wall:.1f} s")
    finally:
        down(config, quiet=True)
    ratio = figures["median"][0] / figures["none"][0]
    same = figures["median"][1] == figures["none"][1]
    print(f"\ncompute with median pruning / without: {ratio:.2f} (goal <= 0.7), same best final metric: {same}"
          f" → {'PASS' if ratio <= 0.7 and same else 'FAIL'}")
    return 0 if ratio <= 0.7 and same else 1


if __name__ == "__main__":
    sys.exit(main())
