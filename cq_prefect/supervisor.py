"""A tiny parent for an experiment's command, so that no process outlives its experiment.

``python -m cq_prefect.supervisor FD -- CMD…`` runs CMD in a process group of its own and watches FD,
the read end of a pipe whose write end only the experiment flow's process holds (the *lifeline*):

- the flow process dies, even by SIGKILL → the lifeline reads EOF → the whole group gets SIGTERM, a
  grace period, then SIGKILL;
- SIGTERM/SIGINT to the supervisor (timeout, cancellation) → the same, for the whole group;
- CMD exits → leftovers in its group (a background data loader, a grandchild) are terminated the same
  way, so they cannot hold the output pipes open; the supervisor exits with CMD's exit code
  (128 + N when CMD died from signal N).

Training scripts spawn data-loader workers; this is prefect-shell's process-group cleanup made immune
to the death of the process that started it. It imports nothing heavy: it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_ENV = "CQ_KILL_GRACE_SECONDS"


def iter_proc_stat():
    """``(pid, fields)`` for every process in /proc; fields start after the command name:
    state, ppid, pgrp, session, …, utime (index 11), stime (12)."""
    if not os.path.isdir("/proc"):
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                yield int(entry), fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in the group; orphaned zombies may never be reaped
    in a container whose PID 1 does not reap, so ``killpg(pgid, 0)`` alone would wait for nothing."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    return any(int(fields[2]) == pgid and fields[0] != b"Z" for _, fields in iter_proc_stat())


def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` seconds for it to empty, then SIGKILL it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m cq_prefect.supervisor LIFELINE_FD -- CMD...", file=sys.stderr)
        return 2
    lifeline = int(argv[0])
    grace = float(os.environ.pop(GRACE_ENV, "10"))
    child = subprocess.Popen(argv[2:], process_group=0, pass_fds=())
    pgid = child.pid
    stopping = threading.Event()

    def stop(*_):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=kill_group, args=(pgid, grace), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def watch_lifeline():
        try:
            while os.read(lifeline, 1024):
                pass
        except OSError:
            pass
        stop()

    threading.Thread(target=watch_lifeline, daemon=True).start()
    returncode = child.wait()
    # CMD is gone; anything it left in its group must not outlive it (nor hold our stdout open).
    if _group_alive(pgid):
        kill_group(pgid, grace)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
