"""The pose research loop: how many experiments the demo needs, and Optuna against random search.

1. Runs ``cq demo`` (the full one: ``examples/pose/loop.yaml``) on a private embedded stack and prints how
   many experiments its loop needed to go from the baseline to MPJPE < 25 mm (goal: ≤ 5), the demo's
   wall time (goal: ≤ 6 minutes) and its Results table.
2. At a budget of 12 runs, over 3 seeds: the best test MPJPE that Optuna's TPE finds next to random search
   over the same space (``examples/pose/space.yaml`` plus the backbone and occlusion augmentation), both
   driven through :class:`~cq_prefect.proposers.OptunaProposer` with the loop's bookkeeping
   (:func:`cq_prefect.testing.simulate`), each run a real ``train.py`` subprocess from the baseline config.
   Runs are shortened (``--epochs``, default 5) so the 72 trainings fit in ~10 minutes.

    .venv/bin/python bench/pose_loop.py                 # both parts, ~20 minutes on 2 cores
    .venv/bin/python bench/pose_loop.py --skip-demo     # part 2 only
Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_latency import private_stack_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POSE = ROOT / "examples" / "pose"
TARGET = 25.0
FINAL = re.compile(r"^@step=\d+ @mpjpe=([0-9.]+)mm", re.M)


def demo_part() -> bool:
    """Part 1: the demo on a private stack; True when it met its goals."""
    private_stack_env("cq-bench-pose-")
    from cq_prefect import tracking
    from cq_prefect.demo import demo_config, run_demo
    from cq_prefect.ledger import Ledger
    from cq_prefect.stack import StackConfig, down

    config = StackConfig.from_env()
    out = io.StringIO()
    try:
        started = time.monotonic()
        code = run_demo(out=out)
        wall = time.monotonic() - started
        loop = demo_config()
        ledger = Ledger.latest(tracking.client(config.endpoints().mlflow_tracking_uri), loop.name)
        records = ledger.records() if ledger else []
    finally:
        down(config, quiet=True)
    text = out.getvalue()
    print(text[text.index("Results"):] if "Results" in text else text[-3000:])
    needed = next((i + 1 for i, r in enumerate(records) if r.value is not None and r.value < TARGET), None)
    print(f"demo exit code {code}; experiments run: {len(records)}; wall {wall / 60:.1f} min (incl. the stack's start)")
    print(f"experiments from the baseline to MPJPE < {TARGET:g} mm: {needed if needed else 'not reached'} "
          f"(goal <= 5 → {'PASS' if needed and needed <= 5 else 'FAIL'}); demo wall <= 6 min → "
          f"{'PASS' if wall <= 360 else 'FAIL'}")
    return bool(needed and needed <= 5 and wall <= 360)


def train(change: dict, epochs: int) -> float:
    """One real training run from the baseline config with ``change``; its test MPJPE."""
    args = [f"--{key}={value}" for key, value in change.items()]
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/baseline.yaml", f"--epochs={epochs}",
                           *args], cwd=POSE, capture_output=True, text=True, timeout=600)
    found = FINAL.findall(done.stdout)
    if done.returncode or not found:
        raise RuntimeError(f"train.py {' '.join(args)} failed: {done.stderr[-500:]}")
    return float(found[-1])


def search_part(budget: int, seeds: list[int], epochs: int) -> None:
    """Part 2: Optuna TPE next to random search, same space, same budget."""
    from cq_prefect.proposers import OptunaProposer, load_space
    from cq_prefect.proposers.optuna_study import import_optuna
    from cq_prefect.testing import simulate

    optuna = import_optuna()
    space = {**load_space(POSE / "space.yaml"),
             **load_space({"backbone": ["mlp", "resmlp"], "occlusion_aug": [False, True]})}
    baseline = train({}, epochs)
    print(f"\nsearch space: {', '.join(space)}; {epochs} epochs per run; baseline {baseline:.2f} mm")
    results: dict[str, list[float]] = {"optuna (TPE)": [], "random search": []}
    for seed in seeds:
        for name, sampler in (("optuna (TPE)", None),
                              ("random search", lambda s: optuna.samplers.RandomSampler(seed=s))):
            proposer = OptunaProposer(space, "minimize", seed=seed, startup_trials=5, sampler=sampler)
            started = time.monotonic()
            records = simulate(proposer, lambda h: train(dict(h.change), epochs), budget=budget)
            best = min(r.value for r in records if r.value is not None)
            results[name].append(best)
            print(f"  seed {seed} {name:14}: best {best:6.2f} mm of {len(records)} runs "
                  f"({time.monotonic() - started:.0f} s)", flush=True)
    print(f"\nbudget {budget} runs, seeds {seeds}:")
    for name, bests in results.items():
        print(f"  {name:14}: median best MPJPE {statistics.median(bests):6.2f} mm  "
              f"(per seed: {', '.join(f'{b:.2f}' for b in bests)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per search run (the demo's own runs: 20)")
    opts = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    ok = True
    if not opts.skip_demo:
        ok = demo_part()
    if not opts.skip_search:
        search_part(opts.budget, list(range(opts.first_seed, opts.first_seed + opts.seeds)), opts.epochs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
