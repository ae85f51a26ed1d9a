"""Team load: 100 experiments queued at once on 4 GPU hosts × 4 declared GPUs, through the team profile.

Builds :class:`cq_prefect.lab.Lab` (two Prefect API servers on PostgreSQL + Redis behind HAProxy, Prefect's
services, MLflow on PostgreSQL; GPU hosts and a laptop as network namespaces, the GPU hosts dropping every
inbound connection), starts `cq worker start --gpus 0,1,2,3` on 4 GPU hosts, queues the experiments from
the laptop while the pool is paused (short commands printing 20 `@loss` points each, one GPU each),
releases the pool and waits for all. Then prints:

- the makespan (pool released → last command's end) against the ideal max(GPU-seconds / GPUs, one job);
- Prefect's states, MLflow's points (every step of every run, missing and duplicated), GPUs double-booked
  (two overlapping runs on one host holding a common id, from what each command wrote);
- the Prefect API's p50/p95 latency during the run: HAProxy's log of every API request (websockets left out).

    sudo .venv/bin/python bench/team_load.py                    # ~6 minutes on 2 cores
    sudo .venv/bin/python bench/team_load.py --experiments 40 --kill-api-after 10   # + one API server killed
Needs root, haproxy, nft or iptables, PostgreSQL and Redis on 127.0.0.1. Not a test: the figures hold for
the machine they were taken on; every process of every "host" shares its cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each command prints")
    parser.add_argument("--kill-api-after", type=int, default=None, metavar="N",
                        help="SIGKILL Prefect API server 1 once N runs have ended")
    opts = parser.parse_args(argv)

    from cq_prefect import lab as lab_module

    problem = lab_module.missing()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2
    print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}")
    pool = "bench-team"
    with tempfile.TemporaryDirectory(prefix="cq-bench-team-") as tmp, lab_module.Lab(Path(tmp)) as lab:
        started = time.monotonic()
        laptop = lab.add_host("laptop")
        api = lab_module.RestApi(lab)
        for index in range(1, opts.hosts + 1):
            lab.add_host(f"gpu{index}", inbound=False).start_worker(pool, "0,1,2,3")
            deadline = time.monotonic() + 120
            while len([w for w in api.workers(pool) if w["status"] == "ONLINE"]) < index:
                if time.monotonic() > deadline:
                    print(f"the worker on gpu{index} did not come online", file=sys.stderr)
                    return 1
                time.sleep(1)
        print(f"lab up with {opts.hosts} GPU hosts in {time.monotonic() - started:.0f} s "
              f"(Prefect API {lab.prefect_api_url}, MLflow {lab.mlflow_uri})")
        fault = None
        if opts.kill_api_after is not None:
            def fault():
                lab.kill_api(0)
                return {"killed": "prefect-api-1", "after_ended": opts.kill_api_after}
        result = lab_module.load(lab, laptop, pool, Path(tmp) / "load", experiments=opts.experiments,
                                 points=opts.points, seconds=opts.seconds, gpus=4 * opts.hosts, fault=fault,
                                 fault_after=opts.kill_api_after or 0)
        print("\n".join(result.lines()))
        if result.fault:
            print(f"fault: {result.fault}; HAProxy saw {lab.proxy_server_states() or 'no change'}")
        ok = (result.states == {"COMPLETED": opts.experiments} and not result.points_missing
              and not result.points_duplicated and not result.double_booked)
        print(f"all complete, every point once, no GPU double-booked → {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
