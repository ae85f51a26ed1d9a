"""GPU packing: 16 queued jobs of ~5 s needing 1 or 2 GPUs on one cq-gpu worker with 4 declared GPUs.

Starts a private embedded stack and one `cq worker start --gpus 4` worker at its defaults, queues the 16
jobs while the pool is paused (a fixed, shuffled mix of 8 one-GPU and 8 two-GPU jobs, 4.5–5.5 s each),
resumes the pool and waits for all.
Each command records its CQ_GPU_IDS / CUDA_VISIBLE_DEVICES and its start and end times.

Prints the makespan (pool resumed → last command end) against the ideal: the lower bound
max(GPU-seconds / 4, longest job) — no schedule can be shorter, so the ratio is conservative. Checks that
no two runs that overlapped in time held a common device, and that each got as many as it asked for.

    .venv/bin/python bench/gpu_packing.py        # ~2 minutes
Goal: makespan <= 1.15 x ideal, and no device shared. Not a test: figures hold for this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dispatch_latency import private_stack_env, start_worker  # noqa: E402
from metrics_pipeline import settle  # noqa: E402

JOB = """\
import os, sys, time
start = time.time()
print(f"@gpus={len([g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g])}", flush=True)
time.sleep(float(sys.argv[1]))
with open(sys.argv[2], "w") as fh:
    fh.write(f"{os.environ['CQ_GPU_IDS']}|{os.environ['CUDA_VISIBLE_DEVICES']}|{start}|{time.time()}")
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args(argv)

    rng = random.Random(opts.seed)
    jobs = [(1 if i % 2 else 2, round(opts.seconds * rng.uniform(0.9, 1.1), 2)) for i in range(opts.jobs)]
    rng.shuffle(jobs)
    ideal = max(sum(g * d for g, d in jobs) / opts.gpus, max(d for _, d in jobs))

    tmp = private_stack_env("cq-bench-packing-")
    from cq_prefect.stack import StackConfig, _bin, down, prefect_settings, up

    config = StackConfig.from_env()
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    worker = None
    try:
        endpoints = up(config, worker=False)
        print(settle(config))
        env = dict(os.environ, PREFECT_API_URL=endpoints.prefect_api_url,
                   MLFLOW_TRACKING_URI=endpoints.mlflow_tracking_uri)
        worker = start_worker([_bin("cq"), "worker", "start", "--pool", "bench-pack", "--gpus", str(opts.gpus)],
                              env, tmp / "worker.log")
        time.sleep(8)  # the warm engine imports
        with prefect_settings(endpoints):
            from cq_prefect.submission import submit

            workdir = tmp / "work"
            workdir.mkdir()
            (workdir / "job.py").write_text(JOB)
            submit(name="warm-up", workdir=str(workdir), pool="bench-pack", command="true").wait(timeout=300)
            print(f"\n{len(jobs)} jobs on {opts.gpus} GPUs: " + " ".join(f"{g}x{d:g}s" for g, d in jobs))
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import WorkPoolUpdate

            with get_client(sync_client=True) as client:
                # Queue all 16 first (the pool paused, as a backlog left for the night), then let the worker go.
                client.update_work_pool("bench-pack", WorkPoolUpdate(is_paused=True))
                t_submit = time.time()
                handles = [submit(name=f"job-{i}", workdir=str(workdir), pool="bench-pack", gpu_count=g,
                                  endpoints=endpoints,
                                  command=f"{sys.executable} job.py {d} {workdir / f'job-{i}.txt'}")
                           for i, (g, d) in enumerate(jobs)]
                submitted = time.time() - t_submit
                t0 = time.time()
                client.update_work_pool("bench-pack", WorkPoolUpdate(is_paused=False))
            outcomes = [h.wait(timeout=600).outcome for h in handles]
        if set(outcomes) != {"success"}:
            print(f"runs did not all succeed: {outcomes}")
            return 1
        rows = []
        for i, (gpus, _) in enumerate(jobs):
            ids, visible, start, end = (workdir / f"job-{i}.txt").read_text().split("|")
            rows.append((gpus, [g for g in ids.split(",") if g], visible, float(start), float(end)))
        shared = [(a, b) for a in range(len(rows)) for b in range(a + 1, len(rows))
                  if rows[a][3] < rows[b][4] and rows[b][3] < rows[a][4] and set(rows[a][1]) & set(rows[b][1])]
        wrong = [i for i, (gpus, ids, visible, _, _) in enumerate(rows) if len(ids) != gpus or visible != ",".join(ids)]
        makespan = max(r[4] for r in rows) - t0
        schedule = max(r[4] for r in rows) - min(r[3] for r in rows)
        print("\ntimeline (s from the pool's resume): job gpus ids start-end")
        for i, (gpus, ids, _, start, end) in sorted(enumerate(rows), key=lambda item: item[1][3]):
            print(f"   job-{i:<2d} {gpus}  {','.join(ids):7} {start - t0:6.2f}–{end - t0:6.2f}")
        print(f"\nqueueing all {len(jobs)} (pool paused) took {submitted:.2f} s")
        print(f"ideal (lower bound) {ideal:.2f} s · makespan queue released → last end {makespan:.2f} s "
              f"({makespan / ideal:.3f}x) · first command start → last end {schedule:.2f} s ({schedule / ideal:.3f}x)")
        print(f"device sharing between overlapping runs: {len(shared)} · wrong device counts: {len(wrong)}")
        ok = makespan <= 1.15 * ideal and not shared and not wrong
        print(f"goal: makespan <= 1.15x ideal and no device shared → {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        down(config, quiet=True)


if __name__ == "__main__":
    sys.exit(main())
