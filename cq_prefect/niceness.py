"""CPU priority for bookkeeping: the training process comes first.

On a small machine the embedded servers and the threads that ship logs and metrics compete with the
training script for cores. They can lag behind (the sink queues, the spool holds), the training cannot, so
they run at a lower priority (a higher nice value): ``CQ_BOOKKEEPING_NICE``, default 10, 0 to turn off.
The threads reading the script's pipes keep normal priority: if they fell behind, the script would block
on a full pipe.
"""

from __future__ import annotations

import os
import threading


def bookkeeping_nice() -> int:
    try:
        return max(0, min(19, int(os.environ.get("CQ_BOOKKEEPING_NICE", "10"))))
    except ValueError:
        return 10


def deprioritize_current_thread() -> None:
    """Raise the nice value of the calling thread only (Linux keeps nice per thread)."""
    increment = bookkeeping_nice()
    if not increment or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError:
        pass


def deprioritize_process() -> None:
    """For ``preexec_fn`` (after ``setsid``): the server and all it starts run at lower priority.

    With the kernel's autogroup scheduling (on by default on desktops and many servers) the CPU is shared
    between *sessions* first and nice only orders threads within one, so the new session's autogroup is
    niced too; otherwise a busy server would still take an equal share from the training script.
    """
    increment = bookkeeping_nice()
    if not increment:
        return
    try:
        os.nice(increment)
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(increment))
    except OSError:
        pass
