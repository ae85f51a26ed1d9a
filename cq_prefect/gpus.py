"""GPU inventories and claim-time reservations for the ``cq-gpu`` worker (no Prefect import here).

An inventory is the ordered list of device ids a worker may hand out: ``--gpus auto`` asks
``nvidia-smi`` (none found → no GPUs), ``--gpus 4`` declares ids 0..3, ``--gpus 0,1,3`` names them.
A :class:`GpuLedger` hands out ids: :meth:`GpuLedger.reserve` either takes ``n`` free ids for one flow
run at once or takes nothing, so there is no window in which two runs hold the same device.

    >>> ledger = GpuLedger(parse_gpus("0,1,3"))
    >>> ledger.reserve("run-a", 2), ledger.reserve("run-b", 2), ledger.free
    (('0', '1'), None, ('3',))
    >>> ledger.release("run-a"), ledger.free
    (('0', '1'), ('0', '1', '3'))
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field

from cq_prefect.errors import SpecError

MAX_GPUS = 64
NVIDIA_SMI_QUERY = ["--query-gpu=index,uuid,memory.total,name", "--format=csv,noheader,nounits"]
_ID = re.compile(r"^(?:\d{1,3}|GPU-[0-9A-Fa-f-]{8,64}|MIG-[0-9A-Za-z/-]{1,80})$")


@dataclass(frozen=True)
class Gpu:
    """One device a worker can hand out; ``id`` is what goes into ``CUDA_VISIBLE_DEVICES``."""

    id: str
    uuid: str = ""
    memory_mib: int | None = None
    name: str = ""

    def describe(self) -> str:
        memory = f", {self.memory_mib} MiB" if self.memory_mib else ""
        return f"GPU {self.id}: {self.name or 'declared'}{memory}"


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[Gpu, ...] = ()
    source: str = "declared"  # "nvidia-smi", "declared" or "none found"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(g.id for g in self.gpus)

    def __len__(self) -> int:
        return len(self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"no GPUs ({self.source}); runs with gpu_count 0 only"
        return f"{len(self.gpus)} GPU(s) ({self.source}): " + "; ".join(g.describe() for g in self.gpus)


def parse_gpus(value: str | int | None, *, smi_output: str | None = None) -> Inventory:
    """``auto`` | a count ``N`` | a list of device ids ``0,1,3`` → an :class:`Inventory`.

    Raises :class:`SpecError` (exit 2) for anything else, naming the three accepted forms.
    """
    text = "auto" if value is None else str(value).strip()
    if text.lower() == "auto":
        return detect_gpus(smi_output)
    if text.isdigit():
        count = int(text)
        if count > MAX_GPUS:
            raise SpecError(f"--gpus {text}: at most {MAX_GPUS} GPUs per worker; give the real device count")
        return Inventory(tuple(Gpu(str(i)) for i in range(count)))
    ids = [part.strip() for part in text.split(",")]
    bad = [part for part in ids if not _ID.match(part)]
    if not text or bad:
        raise SpecError(
            f"--gpus {value!r}: expected 'auto', a count like 4, or device ids like 0,1,3 "
            f"(not {', '.join(repr(b) for b in bad) or 'an empty value'})"
        )
    if len(set(ids)) != len(ids):
        raise SpecError(f"--gpus {value!r}: a device id is listed twice; list each device once, e.g. 0,1,3")
    if len(ids) > MAX_GPUS:
        raise SpecError(f"--gpus: at most {MAX_GPUS} devices per worker")
    return Inventory(tuple(Gpu(i) for i in ids))


def detect_gpus(smi_output: str | None = None) -> Inventory:
    """The devices ``nvidia-smi`` lists (limited to ``CUDA_VISIBLE_DEVICES`` when the worker has it)."""
    if smi_output is None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return Inventory((), "none found: no nvidia-smi")
        try:
            smi_output = subprocess.run([smi, *NVIDIA_SMI_QUERY], capture_output=True, text=True,
                                        timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return Inventory((), f"none found: nvidia-smi failed ({exc})")
    gpus = []
    for line in smi_output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue  # a header line or a driver message
        memory = fields[2].split()[0] if fields[2] else ""
        gpus.append(Gpu(fields[0], fields[1], int(memory) if memory.isdigit() else None, ",".join(fields[3:])))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        allowed = {v.strip() for v in visible.split(",")}
        gpus = [g for g in gpus if g.id in allowed or g.uuid in allowed]
    return Inventory(tuple(gpus), "nvidia-smi" if gpus else "none found by nvidia-smi")


@dataclass
class GpuLedger:
    """Which of a worker's devices each flow run holds. Thread-safe; all-or-nothing reservations."""

    inventory: Inventory
    _held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def free(self) -> tuple[str, ...]:
        with self._lock:
            taken = {i for ids in self._held.values() for i in ids}
            return tuple(i for i in self.inventory.ids if i not in taken)

    @property
    def held(self) -> dict[str, tuple[str, ...]]:
        with self._lock:
            return dict(self._held)

    def reserve(self, key: str, count: int) -> tuple[str, ...] | None:
        """Take ``count`` free ids for ``key``, or None when they aren't free (nothing taken then)."""
        with self._lock:
            if key in self._held:
                return self._held[key]
            taken = {i for ids in self._held.values() for i in ids}
            free = [i for i in self.inventory.ids if i not in taken]
            if count > len(free):
                return None
            self._held[key] = tuple(free[:count])
            return self._held[key]

    def release(self, key: str) -> tuple[str, ...]:
        """Give back what ``key`` holds (nothing if it holds nothing); returns the released ids."""
        with self._lock:
            return self._held.pop(key, ())
