"""The team profile on one machine, as hosts: a loop from a laptop, GPU hosts behind NAT, load, faults.

:class:`cq_prefect.lab.Lab` builds it: this machine is the server host (two Prefect API servers and
Prefect's services on PostgreSQL and Redis, MLflow on PostgreSQL, HAProxy in front, with compose's own
haproxy.cfg); the GPU hosts and the laptop are network namespaces on one bridge, each with its own
hostname. The GPU hosts drop every inbound connection. Every figure a test measures is printed (``-s`` or
the ``-rA`` summary shows it) and checked against the issue's promise.

Runs in its own stage of ``make test`` (``-m team``); needs root, haproxy, nft or iptables, prefect-redis.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import wait_for

from cq_prefect import lab as lab_module

MISSING = lab_module.missing()
pytestmark = [pytest.mark.team, pytest.mark.timeout(900),
              pytest.mark.skipif(MISSING is not None and not os.environ.get("CI"), reason=MISSING or "")]

POOL = "team-gpu"
GPUS_PER_HOST = "0,1,2,3"

# Prints N points of @loss (and @mpjpe at the end) with @step, sleeping PAUSE between them; appends one
# JSON line {host, gpus, start, end, name} to RECORDS, the shared file every host writes (an NFS home).
TRAIN = """\
import json, os, socket, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
points, pause = int(args.get("points", 20)), float(args.get("pause", 0.1))
start = time.time()
for step in range(points):
    print(f"step {step} @step={step} @loss={1.0 / (step + 1):.5f}", flush=True)
    time.sleep(pause)
value = 30.0 - sum(float(v) for k, v in args.items() if k.startswith("g"))
print(f"done @mpjpe={value:.2f}mm", flush=True)
with open(os.environ["RECORDS"], "a") as fh:
    fh.write(json.dumps({"host": socket.gethostname(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                         "start": start, "end": time.time(), "name": args.get("name", "")}) + "\\n")
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if MISSING:
        pytest.fail(f"CI runs the team tests: {MISSING}")
    root = tmp_path_factory.mktemp("lab")
    with lab_module.Lab(root) as lab:
        api = lab_module.RestApi(lab)
        lab.add_host("laptop")
        for index in range(1, 4):
            host = lab.add_host(f"gpu{index}", inbound=False)
            host.start_worker(POOL, GPUS_PER_HOST)
            # one at a time: the first creates the pool and cq's crash automation
            wait_for(lambda n=index: len([w for w in api.workers(POOL) if w["status"] == "ONLINE"]) >= n, 120, interval=1.0, what=f"the worker on gpu{index} online\n{host.procs[-1].tail()}")
        yield lab


@pytest.fixture
def project(lab, tmp_path):
    (tmp_path / "train.py").write_text(TRAIN)
    return tmp_path


def _records(project: Path) -> list[dict]:
    path = project / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient


def test_inbound_connections_to_a_gpu_host_are_dropped_and_outbound_ones_work(lab):
    gpu, laptop = lab.hosts["gpu1"], lab.hosts["laptop"]
    listener = gpu.spawn("listener", sys.executable, "-c", textwrap.dedent(f"""
        import socket
        server = socket.create_server(("{gpu.ip}", 8765))
        print("listening", flush=True)
        while True:
            server.accept()[0].close()
    """))
    try:
        wait_for(lambda: "listening" in listener.tail(), 30, interval=0.2, what="the listener on gpu1")
        probe = textwrap.dedent("""
            import socket, sys
            sock = socket.socket(); sock.settimeout(3)
            try:
                sock.connect((sys.argv[1], int(sys.argv[2]))); print("connected")
            except socket.timeout:
                print("timeout")
            except OSError as exc:
                print(type(exc).__name__)
        """)
        inbound = laptop.run(sys.executable, "-c", probe, gpu.ip, "8765", timeout=30).stdout.strip()
        outbound = gpu.run(sys.executable, "-c", probe, lab.server_ip, str(lab.proxy_ports["prefect"]),
                           timeout=30).stdout.strip()
        print(f"\nlaptop → gpu1:8765 {inbound}; gpu1 → server {outbound}")
        assert inbound == "timeout" and outbound == "connected"
    finally:
        listener.stop()


def test_a_loop_from_the_laptop_spreads_over_three_gpu_hosts_and_every_point_reaches_mlflow(lab, project):
    """`cq loop start` on the laptop, 3 at a time, each needing all 4 GPUs of a host: three hosts at once."""
    name = f"team-loop-{uuid.uuid4().hex[:6]}"
    config = {
        "name": name, "metric": "mpjpe", "direction": "minimize", "target": 1, "budget": 6, "parallel": 3,
        "experiment": {"workdir": str(project), "command": f"{sys.executable} train.py --points=20 --pause=0.4",
                       "gpu_count": 4, "pool": POOL, "env": {"RECORDS": str(project / "records.jsonl")}},
        "proposer": {"kind": "scripted", "ideas": [{"title": f"idea {i}", "overrides": {f"g{i}": 0.5}}
                                                   for i in range(1, 6)]},
    }
    (project / "loop.yaml").write_text(json.dumps(config))
    laptop = lab.hosts["laptop"]
    started = time.monotonic()
    done = laptop.cq("loop", "start", str(project / "loop.yaml"), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads(laptop.cq("loop", "status", name, "--json").stdout)
    assert status["status"] == "finished" and status["reason"] == "budget_exhausted", status
    assert len(status["experiments"]) == 6
    mlflow = _mlflow()(lab.mlflow_uri)
    hosts = {}
    for experiment in status["experiments"]:
        run = mlflow.get_run(experiment["mlflow_run_id"])
        hosts[experiment["exp_id"]] = run.data.tags["cq.host"]
        assert run.info.status == "FINISHED", (experiment["exp_id"], run.info.status)
        loss = mlflow.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in loss) == list(range(20)), (experiment["exp_id"], len(loss))
        assert run.data.metrics["mpjpe"] == pytest.approx(experiment["value"])
    records = _records(project)
    print(f"\nloop of 6 (3 at a time) from the laptop in {time.monotonic() - started:.1f} s; hosts: {hosts}")
    first = min(r["start"] for r in records)
    for r in sorted(records, key=lambda r: r["start"]):
        print(f"  {r['host']}  {r['start'] - first:6.1f} s → {r['end'] - first:6.1f} s")
    assert len(records) == 6
    assert set(hosts.values()) == {"gpu1", "gpu2", "gpu3"}, hosts
    # each run had a whole host's 4 GPUs, and no two runs overlapped on one host
    for a in records:
        assert a["gpus"] == GPUS_PER_HOST, a
        for b in records:
            if a is not b and a["host"] == b["host"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)


@pytest.fixture(scope="module")
def four_workers(lab):
    """A fourth GPU host joins the pool: 4 workers × 4 declared GPUs."""
    if "gpu4" not in lab.hosts:
        host = lab.add_host("gpu4", inbound=False)
        host.start_worker(POOL, GPUS_PER_HOST)
        api = lab_module.RestApi(lab)
        wait_for(lambda: len([w for w in api.workers(POOL) if w["status"] == "ONLINE"]) >= 4, 120, interval=1.0, what="the worker on gpu4 online")
    return lab


def test_load_100_experiments_on_4_workers_with_4_gpus_each(four_workers, tmp_path):
    """100 one-GPU experiments queued at once (20 points each): all complete, every point in MLflow, no
    GPU double-booked; prints the makespan against the ideal and the Prefect API's p95 through the proxy."""
    lab = four_workers
    result = lab_module.load(lab, lab.hosts["laptop"], POOL, tmp_path / "load", experiments=100, points=20,
                             seconds=3.0, gpus=16)
    print("\n" + "\n".join(result.lines()))
    assert result.states == {"COMPLETED": 100}
    assert result.points_missing == 0 and result.points_duplicated == 0
    assert result.double_booked == []
    assert set(result.hosts) == {"gpu1", "gpu2", "gpu3", "gpu4"}, result.hosts
    assert result.api_requests > 100 and result.api_errors == {}, result.api_errors


# -- faults -----------------------------------------------------------------------------------------


def _submit(host, project: Path, name: str, args: str, gpu_count: int = 1) -> dict:
    done = host.cq("submit", "--name", name, "--workdir", str(project), "--pool", POOL, "--json",
                   "--gpu-count", str(gpu_count), "--env", f"RECORDS={project / 'records.jsonl'}",
                   "--command", f"{sys.executable} train.py --name={name} {args}")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _state(lab, flow_run_id: str) -> str:
    return lab_module.RestApi(lab).states([flow_run_id]).get(flow_run_id, "SCHEDULED")


def _steps(mlflow, run_id: str, key: str = "loss") -> list[int]:
    return [m.step for m in mlflow.get_metric_history(run_id, key)]


def _exact(steps: list[int], points: int) -> tuple[int, int]:
    """(missing, duplicated) points of a run that printed steps 0..points-1 once each."""
    return len(set(range(points)) - set(steps)), len(steps) - len(set(steps))


def test_one_of_two_prefect_api_servers_killed_mid_load(four_workers, tmp_path):
    """40 experiments; once 10 have ended, Prefect API server 1 is SIGKILLed: the proxy sends everything to
    server 2 and every run completes with every point. Server 1 comes back afterwards."""
    lab = four_workers
    killed = {}

    def kill_server_1():
        killed["at"] = time.time()
        lab.kill_api(0)
        return {"killed": "prefect-api-1"}

    try:
        result = lab_module.load(lab, lab.hosts["laptop"], POOL, tmp_path / "load", experiments=40, points=20,
                                 seconds=3.0, gpus=16, fault=kill_server_1, fault_after=10)
        down_seen = lab.proxy_server_states().get("prefect_api/prefect-api-1")
        after = [r for r in lab.api_requests(since=killed["at"]) if r[0] <= killed["at"] + result.makespan]
        served_by_2 = len(after)
        print("\n" + "\n".join(result.lines()))
        print(f"API server 1 killed after 10 runs ended; HAProxy marked it {down_seen}; {served_by_2} API "
              f"requests after the kill, failed: {result.api_errors or 'none'}")
        assert result.fault == {"killed": "prefect-api-1"}
        assert result.states == {"COMPLETED": 40}
        assert result.points_missing == 0 and result.points_duplicated == 0 and result.double_booked == []
        assert down_seen == "DOWN" and served_by_2 > 50
    finally:
        lab.start_api(0)
        lab.wait_proxy_sees_all_up()


def test_mlflow_restarted_mid_run_loses_no_point(lab, project):
    """MLflow is killed while a run prints, stays away 10 s and comes back: the points printed meanwhile
    were spooled on the GPU host and replayed; the run has each of its 60 points exactly once."""
    mlflow = _mlflow()(lab.mlflow_uri)
    handle = _submit(lab.hosts["laptop"], project, "mlflow-away", "--points=60 --pause=0.5")
    wait_for(lambda: len(_steps(mlflow, handle["mlflow_run_id"])) >= 10, 120, interval=0.5, what="10 points in MLflow")
    stopped = time.time()
    away = lab.restart_mlflow(down_seconds=10)
    back = stopped + away
    lab.wait_proxy_sees_all_up()
    assert wait_for(lambda: _state(lab, handle["flow_run_id"]) in ("COMPLETED", "FAILED", "CRASHED"), 240, interval=1.0, what="the run to end") and _state(lab, handle["flow_run_id"]) == "COMPLETED"
    caught_up = wait_for(lambda: len(_steps(mlflow, handle["mlflow_run_id"])) >= 60 and time.time(), 120, interval=0.5, what="all 60 points in MLflow")
    history = mlflow.get_metric_history(handle["mlflow_run_id"], "loss")
    during = [m for m in history if stopped * 1000 <= m.timestamp <= back * 1000]
    missing, duplicated = _exact([m.step for m in history], 60)
    print(f"\nMLflow away {away:.1f} s (killed, restarted); {len(during)} points printed meanwhile, replayed; "
          f"all 60 in MLflow {caught_up - back:.1f} s after it was back; missing {missing}, duplicated {duplicated}")
    assert len(during) >= 10 and missing == 0 and duplicated == 0


def test_postgresql_restarted_mid_run(lab, project):
    """PostgreSQL (Prefect's and MLflow's database) restarts while three runs print on three hosts: the
    servers reconnect, the runs complete, every point is in MLflow once."""
    mlflow = _mlflow()(lab.mlflow_uri)
    handles = [_submit(lab.hosts["laptop"], project, f"pg-restart-{i}", "--points=40 --pause=0.5", gpu_count=4)
               for i in range(3)]
    wait_for(lambda: all(_state(lab, h["flow_run_id"]) == "RUNNING" for h in handles), 120, interval=1.0, what="three runs running")
    time.sleep(3)
    away = lab.restart_postgres(down_seconds=5)
    ends = {h["flow_run_id"]: wait_for(lambda h=h: (s := _state(lab, h["flow_run_id"])) in
                                       ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s, 300, interval=1.0, what="the run to end")
            for h in handles}
    wait_for(lambda: all(len(_steps(mlflow, h["mlflow_run_id"])) >= 40 for h in handles), 120, interval=1.0, what="every point")
    exact = [_exact(_steps(mlflow, h["mlflow_run_id"]), 40) for h in handles]
    hosts = sorted(mlflow.get_run(h["mlflow_run_id"]).data.tags["cq.host"] for h in handles)
    print(f"\nPostgreSQL away {away:.1f} s (fast shutdown, restart) under 3 runs on {hosts}: states "
          f"{sorted(ends.values())}; (missing, duplicated) points per run {exact}")
    assert sorted(ends.values()) == ["COMPLETED"] * 3 and exact == [(0, 0)] * 3


def test_a_gpu_host_cut_off_for_60_s_mid_run(lab, project):
    """The host running an experiment loses its network for 60 s (its link down) and gets it back. The
    command never stops; cq's crash window (a heartbeat every 30 s, Crashed after 90 s without one) is
    longer than the cut, so the run is not marked Crashed: it completes, and the points printed while the
    host was cut off reach MLflow once each, after it is back."""
    mlflow = _mlflow()(lab.mlflow_uri)
    handle = _submit(lab.hosts["laptop"], project, "cut-off", "--points=100 --pause=1", gpu_count=4)
    wait_for(lambda: len(_steps(mlflow, handle["mlflow_run_id"])) >= 5, 120, interval=0.5, what="5 points in MLflow")
    host = lab.hosts[mlflow.get_run(handle["mlflow_run_id"]).data.tags["cq.host"]]
    cut = time.time()
    host.cut()
    try:
        seen = set()
        while time.time() < cut + 60:
            seen.add(_state(lab, handle["flow_run_id"]))
            time.sleep(2)
    finally:
        host.reconnect()
    back = time.time()
    final = wait_for(lambda: (s := _state(lab, handle["flow_run_id"])) in ("COMPLETED", "FAILED", "CRASHED") and s, 240, interval=1.0, what="the run to end")
    caught_up = wait_for(lambda: len(_steps(mlflow, handle["mlflow_run_id"])) >= 100 and time.time(), 120, interval=0.5, what="all 100 points")
    history = mlflow.get_metric_history(handle["mlflow_run_id"], "loss")
    during = [m for m in history if cut * 1000 <= m.timestamp <= back * 1000]
    missing, duplicated = _exact([m.step for m in history], 100)
    print(f"\n{host.name} cut off for {back - cut:.0f} s mid-run: states seen meanwhile {sorted(seen)}, final {final}; "
          f"{len(during)} points printed while cut off; all 100 in MLflow {caught_up - back:.1f} s after it was "
          f"back; missing {missing}, duplicated {duplicated}")
    assert seen == {"RUNNING"} and final == "COMPLETED"
    assert len(during) >= 50 and missing == 0 and duplicated == 0


def test_the_loop_parent_host_killed_and_the_loop_resumed_on_another_host(lab, project):
    """`cq loop start` on one laptop; that host dies (every process SIGKILLed) mid-loop; `cq loop resume`
    on another host carries on from the ledger in MLflow: each hypothesis runs exactly once."""
    first, second = lab.add_host("desk-a"), lab.add_host("desk-b")
    name = f"team-resume-{uuid.uuid4().hex[:6]}"
    config = {
        "name": name, "metric": "mpjpe", "direction": "minimize", "target": 1, "budget": 5,
        "experiment": {"workdir": str(project), "command": f"{sys.executable} train.py --points=20 --pause=0.25",
                       "gpu_count": 1, "pool": POOL, "env": {"RECORDS": str(project / "records.jsonl")}},
        "proposer": {"kind": "scripted", "ideas": [{"title": f"idea {i}", "overrides": {f"g{i}": 0.5, "name": f"i{i}"}}
                                                   for i in range(1, 5)]},
    }
    (project / "loop.yaml").write_text(json.dumps(config))
    first.spawn_cq("loop", "loop", "start", str(project / "loop.yaml"))

    def second_running():
        done = second.cq("loop", "status", name, "--json")
        status = json.loads(done.stdout) if done.returncode == 0 else {}
        return any(e["exp_id"].endswith("-c2-s0") and e["outcome"] == "running" for e in status.get("experiments", []))

    wait_for(second_running, 240, interval=1.0, what=f"cycle 2 running\n{first.procs[-1].tail()}")
    first.power_off()
    killed = time.monotonic()
    # the ledger says crashed once the parent's cq.loop.alive_at is 30 s old; resume refuses a live loop
    wait_for(lambda: json.loads(second.cq("loop", "status", name, "--json").stdout)["status"] == "crashed", 120, interval=2, what="cq loop status to say crashed")
    noticed = time.monotonic() - killed
    done = second.cq("loop", "resume", name, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads(second.cq("loop", "status", name, "--json").stdout)
    names = sorted(r["name"] for r in _records(project))
    print(f"\nloop parent host desk-a killed in cycle 2; `cq loop status` said crashed {noticed:.0f} s later; "
          f"resumed on desk-b, finished {time.monotonic() - killed:.1f} s after the kill: {status['status']} "
          f"({status['reason']}); commands run: {names}")
    assert status["status"] == "finished" and status["reason"] == "budget_exhausted"
    assert [e["exp_id"] for e in status["experiments"]] == [f"{name}-c{c}-s0" for c in range(5)]
    assert names == ["", "i1", "i2", "i3", "i4"], names  # the baseline has no --name; each idea ran once
