"""The cq-gpu worker: inventories, claim-time GPU reservations, CUDA_VISIBLE_DEVICES, release, warnings.

GPUs are declared as device ids (there are none here); everything else is real: the session's Prefect
server, real `cq worker start` processes, MLflow.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.prefect_db]

from conftest import CQ, PYTHON, run_cq, stop_process_group, wait_for

from cq_prefect.errors import SpecError
from cq_prefect.gpus import GpuLedger, parse_gpus

SMI = """\
0, GPU-1d2c3b4a-0000-1111-2222-333344445555, 81559, NVIDIA H100 80GB HBM3
1, GPU-9f8e7d6c-0000-1111-2222-333344445555, 81559, NVIDIA H100 80GB HBM3
"""


# ---- inventories and the ledger (no server) -----------------------------------------------------


def test_inventory_forms():
    assert parse_gpus("4").ids == ("0", "1", "2", "3")
    assert parse_gpus(0).ids == ()
    assert parse_gpus("0,1,3").ids == ("0", "1", "3")
    auto = parse_gpus("auto", smi_output=SMI)
    assert auto.ids == ("0", "1") and auto.source == "nvidia-smi"
    assert auto.gpus[0].memory_mib == 81559 and auto.gpus[1].name == "NVIDIA H100 80GB HBM3"
    assert parse_gpus("auto", smi_output="No devices were found\n").ids == ()


def test_auto_without_nvidia_smi_is_zero_gpus(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    inventory = parse_gpus("auto")
    assert inventory.ids == () and "none found" in inventory.source


@pytest.mark.parametrize("value", ["abc", "1,,2", "-1", "0,0", "65", "1.5", "", "0;1"])
def test_bad_gpus_flag_names_the_forms(value):
    with pytest.raises(SpecError) as info:
        parse_gpus(value)
    assert "--gpus" in str(info.value)


def test_ledger_reserves_all_or_nothing_and_releases():
    ledger = GpuLedger(parse_gpus("4"))
    assert ledger.reserve("a", 3) == ("0", "1", "2")
    assert ledger.reserve("b", 2) is None and ledger.free == ("3",)
    assert ledger.reserve("c", 1) == ("3",)
    assert ledger.reserve("a", 3) == ("0", "1", "2")  # idempotent per run
    assert ledger.release("a") == ("0", "1", "2") and ledger.release("a") == ()
    assert ledger.reserve("b", 2) == ("0", "1")
    assert ledger.reserve("cpu", 0) == () and set(ledger.held) == {"b", "c", "cpu"}


# ---- real workers -------------------------------------------------------------------------------


class Worker:
    def __init__(self, pool: str, gpus: str, log: Path, name: str | None = None):
        argv = [CQ, "worker", "start", "--pool", pool, "--gpus", gpus] + (["--name", name] if name else [])
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: "started!" in log.read_text() or self.proc.poll() is not None, 90, what="worker start")
        assert self.proc.poll() is None, log.read_text()

    def stop(self) -> int:
        return stop_process_group(self.proc, timeout=30)


@pytest.fixture
def gpu_pool(stack, tmp_path):
    """A fresh pool served by one worker with devices 0,1,3."""
    pool = f"gpu-{uuid.uuid4().hex[:6]}"
    worker = Worker(pool, "0,1,3", tmp_path / "worker.log")
    yield pool, worker
    worker.stop()


STAMP = """\
import os, sys, time
start = time.time()
print(f"@gpus={len([g for g in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if g])}", flush=True)
go = os.path.join(os.path.dirname(sys.argv[2]), "go")
while not os.path.exists(go) and time.time() - start < 60:  # hold the devices until every run is queued
    time.sleep(0.05)
time.sleep(float(sys.argv[1]))
with open(sys.argv[2], "a") as fh:
    fh.write(f"{os.environ['CQ_GPU_IDS']}|{os.environ['CUDA_VISIBLE_DEVICES']}|{start}|{time.time()}|{sys.argv[3]}\\n")
sys.exit(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
"""


def _submit(pool, workdir, ledger_file, gpu_count, seconds=1.5, code=0, label=None):
    import cq_prefect

    script = workdir / "stamp.py"
    if not script.exists():
        script.write_text(STAMP)
    label = label or f"r{uuid.uuid4().hex[:4]}"
    return cq_prefect.submit(name=label, workdir=str(workdir), gpu_count=gpu_count, pool=pool,
                             command=f"{PYTHON} stamp.py {seconds} {ledger_file} {label} {code}")


def _intervals(ledger_file: Path) -> list[tuple[list[str], str, float, float, str]]:
    rows = []
    for line in ledger_file.read_text().splitlines():
        ids, visible, start, end, label = line.split("|")
        rows.append(([i for i in ids.split(",") if i], visible, float(start), float(end), label))
    return rows


def test_runs_get_exactly_their_devices_and_never_share_one(gpu_pool, workdir, mlflow_client):
    pool, _ = gpu_pool
    ledger_file = workdir / "ledger.txt"
    counts = [2, 1, 2, 0, 1, 3, 0, 2]
    handles = [_submit(pool, workdir, ledger_file, n, label=f"n{n}-{i}") for i, n in enumerate(counts)]
    (workdir / "go").touch()
    results = [h.wait(timeout=180) for h in handles]
    assert [r.outcome for r in results] == ["success"] * len(counts)
    rows = {label: (ids, visible, start, end) for ids, visible, start, end, label in _intervals(ledger_file)}
    for i, (n, handle, result) in enumerate(zip(counts, handles, results)):
        ids, visible, _, _ = rows[f"n{n}-{i}"]
        assert len(ids) == n and set(ids) <= {"0", "1", "3"}
        assert visible == ",".join(ids)  # CUDA_VISIBLE_DEVICES is exactly the reservation ("" for CPU runs)
        assert result.gpu_ids == ids
        tags = mlflow_client.get_run(handle.mlflow_run_id).data.tags
        assert tags["cq.gpu_ids"] == ",".join(ids)
    spans = list(rows.values())
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):
            overlap = spans[a][2] < spans[b][3] and spans[b][2] < spans[a][3]
            assert not (overlap and set(spans[a][0]) & set(spans[b][0])), (spans[a], spans[b])
    # with three devices, runs overlapped: the worker ran them side by side, not one at a time
    assert any(spans[a][2] < spans[b][3] and spans[b][2] < spans[a][3]
               for a in range(len(spans)) for b in range(a + 1, len(spans)))


def test_devices_come_back_after_failure_and_cancellation(gpu_pool, workdir, prefect_client):
    from prefect.states import Cancelling

    pool, _ = gpu_pool
    ledger_file = workdir / "ledger.txt"
    (workdir / "go").touch()
    failing = _submit(pool, workdir, ledger_file, 3, seconds=0.2, code=3)
    assert failing.wait(timeout=120).outcome == "failed"
    long = _submit(pool, workdir, ledger_file, 3, seconds=120)
    wait_for(lambda: long.state() == "RUNNING", 90, what="the 3-GPU run to start")
    time.sleep(1)
    prefect_client.set_flow_run_state(uuid.UUID(long.flow_run_id), Cancelling(), force=True)
    wait_for(lambda: long.state() in ("CANCELLED", "FAILED", "CRASHED", "COMPLETED"), 90, what="the cancellation")
    assert long.state() == "CANCELLED"
    after = _submit(pool, workdir, ledger_file, 3, seconds=0.2)  # needs every device: only if both released
    assert after.wait(timeout=120).outcome == "success"


def test_run_larger_than_any_worker_warns_and_stays_scheduled(gpu_pool, workdir):
    pool, worker = gpu_pool
    result = run_cq("submit", "--name", "big", "--workdir", str(workdir), "--command", "echo hi",
                    "--gpu-count", "4", "--pool", pool, "--json")
    assert result.returncode == 0, result.stderr
    assert f"no worker in pool '{pool}' has 4 GPUs; largest has 3" in result.stderr
    import json

    from cq_prefect.submission import resolve

    handle = resolve(json.loads(result.stdout)["flow_run_id"])
    time.sleep(4)  # several polls
    assert handle.state() == "SCHEDULED"
    assert "this run needs 4" in worker.log.read_text() or _run_logs_mention(handle, "this run needs 4")
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(handle.flow_run_id), Cancelled(), force=True)


def _run_logs_mention(handle, text: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(handle.flow_run_id)])))
    return any(text in log.message for log in logs)


def test_two_workers_on_one_pool_never_start_the_same_run(gpu_pool, workdir, tmp_path, prefect_client):
    pool, _ = gpu_pool
    second = Worker(pool, "2", tmp_path / "second.log")
    try:
        ledger_file = workdir / "ledger.txt"
        handles = [_submit(pool, workdir, ledger_file, 1, seconds=0.5, label=f"dup{i}") for i in range(8)]
        # The runs hold their devices until `go` exists: the first worker has 3, so a fourth running run is the
        # second worker's (released at once, a busy machine could let the first worker take them all in turn).
        wait_for(lambda: sum(h.state() == "RUNNING" for h in handles) >= 4, 120, what="both workers running runs")
        (workdir / "go").touch()
        assert all(h.wait(timeout=180).outcome == "success" for h in handles)
        labels = [row[4] for row in _intervals(ledger_file)]
        assert sorted(labels) == sorted(f"dup{i}" for i in range(8))  # each command ran exactly once
        workers = {prefect_client.read_flow_run(uuid.UUID(h.flow_run_id)).labels.get("prefect.worker.name")
                   for h in handles}
        assert len(workers) == 2, workers  # both workers took part
    finally:
        assert second.stop() == 0
    assert "stopped" in (tmp_path / "second.log").read_text()


def test_bad_input_exits_2_naming_the_fix(stack, workdir, prefect_client):
    from prefect.client.schemas.actions import WorkPoolCreate

    bad = run_cq("worker", "start", "--pool", "x", "--gpus", "two")
    assert bad.returncode == 2 and "--gpus" in bad.stderr and "auto" in bad.stderr
    other = f"proc-{uuid.uuid4().hex[:6]}"
    prefect_client.create_work_pool(WorkPoolCreate(name=other, type="process"))
    wrong = run_cq("worker", "start", "--pool", other, "--gpus", "1")
    assert wrong.returncode == 2 and "has type 'process'" in wrong.stderr and "--pool" in wrong.stderr
    for count in ("-1", "65"):
        result = run_cq("submit", "--name", "x", "--workdir", str(workdir), "--command", "true", "--gpu-count", count)
        assert result.returncode == 2 and "gpu" in result.stderr.lower(), result.stderr


def test_prefect_finds_the_cq_gpu_worker_type():
    # `prefect worker start --type cq-gpu` looks the type up through the prefect.collections entry point
    lookup = ("from prefect.workers.base import BaseWorker; "
              "cls = BaseWorker.get_worker_class_from_type('cq-gpu'); "
              "print(cls.__name__, sorted(cls.get_default_base_job_template()['variables']['properties']))")
    found = subprocess.run([PYTHON, "-c", lookup], capture_output=True, text=True, timeout=120)
    assert found.stdout.startswith("CqGpuWorker") and "'gpu_count'" in found.stdout, found.stderr
