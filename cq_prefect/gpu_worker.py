"""The ``cq-gpu`` worker: a Prefect process worker that counts GPUs, not runs.

It claims a scheduled flow run only when the run's ``gpu_count`` fits its free devices, and reserves
those devices in the same step, before it proposes the Pending state that claims the run (two workers
can't both claim one run: the server accepts one Pending proposal). The run's process gets exactly the
reserved ids in ``CUDA_VISIBLE_DEVICES`` and ``CQ_GPU_IDS`` (empty for CPU runs, so they can't grab a
GPU), and the devices come back when the process ends, however it ends. When devices free up, the
worker claims at once from the runs its last poll saw waiting (else it polls), instead of waiting for
its next poll.

Between a claim and the command's start there is as little as possible: the deployment and flow reads
of each claim come from a short-lived cache (:class:`CachedReads`), the worker skips the cosmetic
Submitting state (it labels the run with its name before the start, as Prefect does: labelled in the
background, a run could end without the label), and the warm engine starts the command as it forks
(:mod:`cq_prefect.prestart`), before Prefect's engine has read the run or proposed Running.

``gpu_count`` of a run: the flow run's job variables, else the experiment flow's ``spec`` parameter,
else the deployment's job variables, else the pool's default (0).

Each worker publishes its inventory as the Prefect variable ``cq-gpus-<pool>-<worker>`` (JSON), which
``cq submit`` reads to warn at once when no online worker of the pool has enough GPUs.

Runs start through a warm engine (:mod:`cq_prefect.forkserver`), so the command starts seconds sooner
than under a stock worker; ``CQ_WARM_ENGINE=0`` turns that (and the early start) off.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
import anyio.to_thread
from pydantic import Field

from prefect.workers.process import ProcessJobConfiguration, ProcessVariables, ProcessWorker, ProcessWorkerResult

from cq_prefect import launch, prestart
from cq_prefect.deployment import EXPERIMENT_ENTRYPOINT
from cq_prefect.gpus import MAX_GPUS, GpuLedger, Inventory, parse_gpus

WORKER_TYPE = "cq-gpu"
INVENTORY_PREFIX = "cq-gpus-"
DEFAULT_QUERY_SECONDS = 0.5
DEPLOYMENT_CACHE_SECONDS = 5.0  # a deployment changed on the server reaches claims this much later at most
FLOW_CACHE_SECONDS = 300.0  # a flow record (name, labels) hardly ever changes
PRESTART_LIMIT = 64 * 1024  # bytes of spec passed in the environment; a larger one starts with the flow


def inventory_variable_name(pool: str, worker: str) -> str:
    """``cq-gpus-<pool>-<worker>`` in the characters Prefect allows, with a hash that keeps it unique."""
    import hashlib

    raw = f"{pool}-{worker}".lower()
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in raw)[:200]
    return f"{INVENTORY_PREFIX}{readable}-{hashlib.sha1(f'{pool}/{worker}'.encode()).hexdigest()[:8]}"


def default_worker_name() -> str:
    return f"cq-gpu-{socket.gethostname()}-{os.getpid()}"


class CachedReads:
    """The worker's Prefect client, with the deployment and flow reads of each claim answered from memory.

    Prefect's worker reads the run's deployment twice and its flow once per claim (~50 ms of API calls
    between a run's claim and its start, more on a busy server); for a pool's runs they are the same
    records every time. Everything else goes to the client unchanged.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._records: dict[tuple[str, Any], tuple[float, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def _cached(self, kind: str, key: Any, max_age: float, read) -> Any:
        hit = self._records.get((kind, key))
        if hit is not None and time.monotonic() - hit[0] < max_age:
            return hit[1]
        record = await read(key)  # errors (a deleted deployment: ObjectNotFound) are not cached
        self._records[(kind, key)] = (time.monotonic(), record)
        return record

    async def read_deployment(self, deployment_id):
        return await self._cached("deployment", deployment_id, DEPLOYMENT_CACHE_SECONDS, self._client.read_deployment)

    async def read_flow(self, flow_id):
        return await self._cached("flow", flow_id, FLOW_CACHE_SECONDS, self._client.read_flow)


class CqGpuJobConfiguration(ProcessJobConfiguration):
    gpu_count: int = Field(default=0, ge=0, le=MAX_GPUS)

    def prepare_for_flow_run(self, flow_run, deployment=None, flow=None, work_pool=None, worker_name=None,
                             worker_id=None) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        entrypoint = getattr(deployment, "entrypoint", None) or ""
        if (entrypoint and ".py:" not in entrypoint and not getattr(deployment, "pull_steps", None)
                and not getattr(deployment, "storage_document_id", None)):
            # A module entrypoint with nothing to pull (the experiment deployment): the engine imports it
            # directly instead of reading the deployment again and "downloading" the working directory
            # onto itself (~0.3 s between claim and command).
            self.env.setdefault("PREFECT__FLOW_ENTRYPOINT", entrypoint)


class CqGpuVariables(ProcessVariables):
    gpu_count: int = Field(
        default=0,
        ge=0,
        le=MAX_GPUS,
        title="GPUs",
        description="GPUs the run needs. The worker starts it only when that many of its devices are free "
        "and sets CUDA_VISIBLE_DEVICES to exactly those.",
    )


class CqGpuWorker(ProcessWorker):
    type = WORKER_TYPE
    job_configuration = CqGpuJobConfiguration
    job_configuration_variables = CqGpuVariables
    _description = "Runs cq experiments as processes on a GPU host; claims a run only when its GPUs are free."
    _display_name = "cq GPU"
    _documentation_url = ""  # README.md, "Workers and GPU pools"
    _logo_url = ProcessWorker._logo_url

    def __init__(self, *args: Any, gpus: Inventory | str | int | None = None, warm_engine: bool | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(gpus, Inventory):
            gpus = parse_gpus(gpus if gpus is not None else os.environ.get("CQ_GPUS", "auto"))
        self.inventory = gpus
        self.ledger = GpuLedger(gpus)
        self.warm_engine = os.environ.get("CQ_WARM_ENGINE", "1") != "0" if warm_engine is None else warm_engine
        self._executing: set[str] = set()
        self._waiting_noted: set[str] = set()
        self._poll_lock: anyio.Lock | None = None
        self._backlog: list = []  # scheduled runs of the last poll that did not fit then
        self._cached_client: CachedReads | None = None
        self._forkserver: subprocess.Popen | None = None
        self._forkserver_dir: str | None = None
        self._forkserver_path: str | None = None
        self._forkserver_seen_ready = False
        self._inventory_published = False
        self._reaping = False

    @property
    def client(self):
        client = super().client
        if self._cached_client is None or self._cached_client._client is not client:
            self._cached_client = CachedReads(client)
        return self._cached_client

    # ---- lifecycle -------------------------------------------------------------------------------

    async def setup(self) -> None:
        self._poll_lock = anyio.Lock()
        self._signal_dir = tempfile.mkdtemp(prefix="cq-gpu-signals-")
        atexit.register(shutil.rmtree, self._signal_dir, True)  # also when teardown is cut short
        if self.warm_engine:
            self._start_forkserver()
        await super().setup()

    async def teardown(self, *exc_info: Any) -> None:
        try:
            if self._client is not None and self._inventory_published:
                try:
                    await self._client.delete_variable_by_name(inventory_variable_name(self._work_pool_name, self.name))
                except Exception:  # noqa: BLE001 - best effort; a stale entry is ignored (worker offline)
                    pass
        finally:
            await super().teardown(*exc_info)
            self._stop_forkserver()
            shutil.rmtree(self._signal_dir, ignore_errors=True)

    async def sync_with_backend(self) -> None:
        await super().sync_with_backend()
        await self._publish_inventory()
        if not self._reaping and self._runs_task_group is not None:
            self._reaping = True
            self._runs_task_group.start_soon(self._reap)

    async def _reap(self) -> None:
        """Close the books of this pool's Crashed experiments (MLflow run FAILED, journals replayed)."""
        from cq_prefect.reaper import reap

        try:
            await anyio.to_thread.run_sync(reap, self._work_pool_name)
        except Exception as exc:  # noqa: BLE001 - next sync tries again
            self._logger.warning("closing crashed runs failed (%s); trying again at the next sync", exc)
        finally:
            self._reaping = False

    async def _publish_inventory(self) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate

        name = inventory_variable_name(self._work_pool_name, self.name)
        value = {"pool": self._work_pool_name, "worker": self.name, "host": socket.gethostname(),
                 "gpus": list(self.inventory.ids), "source": self.inventory.source}
        try:
            existing = await self.client.read_variable_by_name(name)
            if existing is None:
                await self.client.create_variable(VariableCreate(name=name, value=value, tags=["cq", "cq-gpu-inventory"]))
            elif existing.value != value:
                await self.client.update_variable(VariableUpdate(name=name, value=value))
            self._inventory_published = True
        except Exception as exc:  # noqa: BLE001 - the inventory is advisory; never stop the worker for it
            self._logger.warning("could not publish the GPU inventory (%s); cq submit can't check GPU counts", exc)

    # ---- the warm engine -------------------------------------------------------------------------

    def _start_forkserver(self) -> None:
        self._forkserver_dir = tempfile.mkdtemp(prefix="cq-engine-")
        atexit.register(shutil.rmtree, self._forkserver_dir, True)
        path = os.path.join(self._forkserver_dir, "sock")
        self._forkserver = subprocess.Popen(
            [sys.executable, "-m", "cq_prefect.forkserver", path, str(os.getpid())],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        self._forkserver_path = path

    def _forkserver_ready(self) -> bool:
        server = self._forkserver
        if server is None or server.poll() is not None:
            return False
        if not self._forkserver_seen_ready:
            # It prints "ready" once imported (a few seconds); until then runs start cold.
            import select

            if select.select([server.stdout], [], [], 0)[0] and server.stdout.readline().strip() == "ready":
                self._forkserver_seen_ready = True
        return self._forkserver_seen_ready

    def _stop_forkserver(self) -> None:
        server, self._forkserver = self._forkserver, None
        if server is not None and server.poll() is None:
            server.terminate()  # its running engines keep going; it exits once they end (see forkserver)
        if self._forkserver_dir:
            shutil.rmtree(self._forkserver_dir, ignore_errors=True)

    # ---- claiming --------------------------------------------------------------------------------

    async def get_and_submit_flow_runs(self):
        if self._poll_lock is None:
            return await super().get_and_submit_flow_runs()
        async with self._poll_lock:
            return await super().get_and_submit_flow_runs()

    async def _submit_scheduled_flow_runs(self, flow_run_response):
        fitting, waiting = [], []
        for entry in flow_run_response:
            flow_run = entry.flow_run
            key = str(flow_run.id)
            if key in self.ledger.held:
                continue  # being submitted or running here already
            count = await self._gpu_count_for(flow_run)
            if count is None:
                continue
            if count > len(self.inventory):
                self._note_waiting(flow_run, count)
                continue
            if self.ledger.reserve(key, count) is None:
                waiting.append(entry)  # not enough free devices now; a smaller run behind it may fit
                continue
            fitting.append(entry)
        submitted = await super()._submit_scheduled_flow_runs(fitting)
        started = {run.id for run in submitted}
        for entry in fitting:
            if entry.flow_run.id not in started:
                self.ledger.release(str(entry.flow_run.id))
                waiting.append(entry)  # the run limit was reached: still a candidate
        self._backlog = waiting
        return submitted

    async def _gpu_count_for(self, flow_run) -> int | None:
        value = (flow_run.job_variables or {}).get("gpu_count")
        if value is None:
            spec = (flow_run.parameters or {}).get("spec")
            if isinstance(spec, dict):
                value = spec.get("gpu_count")
        if value is None and flow_run.deployment_id:
            try:
                deployment = await self.client.read_deployment(flow_run.deployment_id)
                value = (deployment.job_variables or {}).get("gpu_count")
            except Exception:  # noqa: BLE001 - a deleted deployment is handled by the base worker
                pass
        if value is None:
            template = (self._work_pool.base_job_template if self._work_pool else {}) or {}
            value = template.get("variables", {}).get("properties", {}).get("gpu_count", {}).get("default", 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPUS:
            if str(flow_run.id) not in self._waiting_noted:
                self._waiting_noted.add(str(flow_run.id))
                self.get_flow_run_logger(flow_run).error(
                    "gpu_count %r is not a whole number from 0 to %d; this run can't start. Cancel it and "
                    "submit again with e.g. --gpu-count 1.", value, MAX_GPUS)
            return None
        return value

    def _note_waiting(self, flow_run, count: int) -> None:
        if str(flow_run.id) in self._waiting_noted:
            return
        self._waiting_noted.add(str(flow_run.id))
        self.get_flow_run_logger(flow_run).warning(
            "Worker %r has %d GPU(s); this run needs %d. It stays scheduled until a worker of pool %r with %d "
            "GPUs takes it (start one: cq worker start --pool %s --gpus ...).",
            self.name, len(self.inventory), count, self._work_pool_name, count, self._work_pool_name)

    async def _submit_run(self, flow_run) -> None:
        try:
            await super()._submit_run(flow_run)
        finally:
            if str(flow_run.id) not in self._executing:  # claim refused or never started: give the GPUs back
                self._release(flow_run.id)

    async def _submit_run_and_capture_errors(self, flow_run, task_status=None):
        key = str(flow_run.id)
        self._executing.add(key)
        try:
            return await super()._submit_run_and_capture_errors(flow_run, task_status)
        finally:
            self._executing.discard(key)
            self._release(flow_run.id)

    def _release(self, flow_run_id) -> None:
        if self.ledger.release(str(flow_run_id)) and self._runs_task_group is not None:
            self._runs_task_group.start_soon(self._claim_now)  # the freed devices may fit a waiting run

    async def _claim_now(self) -> None:
        """Claim what fits the freed devices: first from the runs the last poll saw waiting (no API call
        before the claim; one that another worker took meanwhile is refused Pending, atomically, and
        given back), else from a fresh poll."""
        try:
            claimed = []
            if self._poll_lock is not None and self._backlog:
                async with self._poll_lock:
                    backlog, self._backlog = self._backlog, []
                    claimed = await self._submit_scheduled_flow_runs(backlog)
            if not claimed:
                await self.get_and_submit_flow_runs()
        except Exception as exc:  # noqa: BLE001 - the regular poll loop retries
            self._logger.debug("claiming after a release failed: %s", exc)

    async def _propose_submitting_state(self, flow_run) -> None:
        # "Submitting" is a Pending state under another name; this worker's Pending was just accepted, and
        # the engine proposes Running next. One API write less between the claim and the command.
        return None

    # ---- running ---------------------------------------------------------------------------------

    async def run(self, flow_run, configuration: CqGpuJobConfiguration, task_status=None) -> ProcessWorkerResult:
        ids = self.ledger.held.get(str(flow_run.id), ())
        env = configuration.env
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        env["CQ_GPU_IDS"] = ",".join(ids)
        env["CQ_WORKER_NAME"] = self.name
        env.pop(prestart.ENV, None)
        if not configuration._command_configured:
            configuration.command = f"{sys.executable} -S {launch.__file__}"
            configuration._command_configured = True
            if self._forkserver_ready():
                env["CQ_FORKSERVER"] = self._forkserver_path
                early = self._prestart_payload(flow_run, env)
                if early is not None:
                    env[prestart.ENV] = early
            else:
                env.pop("CQ_FORKSERVER", None)
        if ids:
            self.get_flow_run_logger(flow_run).info("Worker %r reserved GPU(s) %s for this run", self.name, ",".join(ids))
            signal_file = os.path.join(self._signal_dir, str(flow_run.id))
            env["CQ_DEVICES_FREE_FILE"] = signal_file
            self._runs_task_group.start_soon(self._release_when_signalled, flow_run.id, signal_file)
        return await super().run(flow_run, configuration, task_status)

    @staticmethod
    def _prestart_payload(flow_run, env: dict) -> str | None:
        """``CQ_PRESTART`` for a run the warm engine will run as the experiment flow with its MLflow run
        made (``cq submit``), so that the command starts as the engine forks (see cq_prefect.prestart)."""
        if env.get("PREFECT__FLOW_ENTRYPOINT") != EXPERIMENT_ENTRYPOINT:
            return None  # another flow, or one whose code is pulled first
        parameters = flow_run.parameters or {}
        spec, mlflow_run_id = parameters.get("spec"), parameters.get("mlflow_run_id")
        if not isinstance(spec, dict) or not isinstance(mlflow_run_id, str):
            return None
        early = prestart.payload(str(flow_run.id), spec, mlflow_run_id)
        if len(early) > PRESTART_LIMIT or "__prefect_kind" in early:
            return None  # too big for the environment, or holds values the engine resolves first
        return early

    async def _release_when_signalled(self, flow_run_id, signal_file: str) -> None:
        """Give the devices back as soon as the experiment says its command is gone (see experiment.py)."""
        key = str(flow_run_id)
        try:
            while key in self.ledger.held:
                if os.path.exists(signal_file):
                    self._release(flow_run_id)
                    return
                await anyio.sleep(0.1)
        finally:
            try:
                os.unlink(signal_file)
            except OSError:
                pass


def largest_online_inventory(client, pool: str) -> int | None:
    """The most GPUs any online cq-gpu worker of ``pool`` has (None when none has published one)."""
    online = {w.name for w in client.read_workers_for_work_pool(pool)
              if str(getattr(w.status, "value", w.status)).upper() == "ONLINE"}
    if not online:
        return None
    response = client.request("POST", "/variables/filter",
                              json={"variables": {"name": {"like_": INVENTORY_PREFIX}}, "limit": 200})
    largest = None
    for variable in response.json():
        value = variable.get("value")
        if isinstance(value, dict) and value.get("pool") == pool and value.get("worker") in online:
            largest = max(largest or 0, len(value.get("gpus") or []))
    return largest


def serve(pool: str, *, gpus: Inventory, name: str | None = None, limit: int | None = None,
          printer=print) -> int:
    """Run a cq-gpu worker for ``pool`` in this process until SIGTERM/SIGINT; returns the exit code.

    The pool must exist with type cq-gpu (see :func:`cq_prefect.deployment.ensure_work_pool`).
    """
    from prefect.settings import PREFECT_WORKER_QUERY_SECONDS, temporary_settings

    updates = {}
    if "PREFECT_WORKER_QUERY_SECONDS" not in os.environ:
        updates[PREFECT_WORKER_QUERY_SECONDS] = DEFAULT_QUERY_SECONDS
        os.environ["PREFECT_WORKER_QUERY_SECONDS"] = str(DEFAULT_QUERY_SECONDS)

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    worker = CqGpuWorker(work_pool_name=pool, name=name or default_worker_name(), limit=limit, gpus=gpus, create_pool_if_not_found=False)
    printer(f"cq worker {worker.name!r} on pool {pool!r}: {gpus.describe()}")
    try:
        with temporary_settings(updates=updates):
            anyio.run(lambda: worker.start(printer=printer))
    except KeyboardInterrupt as exc:
        printer(f"cq worker {worker.name!r} stopped ({exc or 'SIGINT'})")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


__all__ = ["CqGpuWorker", "CqGpuJobConfiguration", "CqGpuVariables", "WORKER_TYPE", "largest_online_inventory",
           "inventory_variable_name", "serve"]
