"""Run a shell command in its own process group and stream every output line; no Prefect import.

    >>> lines = []
    >>> run = CommandRun("echo hi; echo oops >&2", workdir=".", on_line=lambda s, l: lines.append((s, l)))
    >>> run.start(); run.wait()
    0
    >>> sorted(lines)
    [('stderr', 'oops'), ('stdout', 'hi')]

The command runs under :mod:`cq_prefect.supervisor`, so its whole tree dies with the experiment —
on timeout, on cancellation, and even when this process is killed outright.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cq_prefect.metric_syntax import LOG_LINE_LIMIT_BYTES
from cq_prefect.supervisor import GRACE_ENV, iter_proc_stat

READ_CHUNK = 1 << 16

LineCallback = Callable[[str, str], None]  # (stream name, decoded line)


class CommandRun:
    """One run of a shell command, with its stdout and stderr read line by line on two threads.

    Args:
        command: the shell command (run by ``/bin/sh -c``).
        workdir: its working directory.
        env: its full environment (default: this process's).
        on_line: called from the reader threads with ``(stream, line)`` for every line; ``\\r``-separated
            progress segments count as lines, lines over 1 MiB are cut (and say so), bytes that are not
            UTF-8 are replaced.
        kill_grace: seconds between SIGTERM and SIGKILL when the tree is stopped.
    """

    def __init__(
        self,
        command: str,
        workdir: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        on_line: LineCallback,
        kill_grace: float = 10.0,
    ):
        self.command = command
        self.workdir = Path(workdir)
        self.env = dict(os.environ if env is None else env)
        self.on_line = on_line
        self.kill_grace = kill_grace
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None  # wall clock, for records
        self.started_monotonic: float | None = None  # for timeouts and durations
        self.ended_at: float | None = None
        self._readers: list[threading.Thread] = []
        self._lifeline_w: int | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        lifeline_r, self._lifeline_w = os.pipe()
        env = dict(self.env)
        env[GRACE_ENV] = str(self.kill_grace)
        # The supervisor imports only the standard library: keep its start cheap and independent of
        # whatever PYTHONPATH the experiment sets for its own code.
        supervisor = str(Path(__file__).with_name("supervisor.py"))
        argv = [sys.executable, "-S", supervisor, str(lifeline_r), "--", "/bin/sh", "-c", self.command]
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(lifeline_r,),
            )
        finally:
            os.close(lifeline_r)
        os.set_inheritable(self._lifeline_w, False)
        self.started_at, self.started_monotonic = time.time(), time.monotonic()
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, stream), name=f"cq-{name}", daemon=True)
            thread.start()
            self._readers.append(thread)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the command and for all its output to be read; raises TimeoutError at the timeout."""
        assert self.process is not None, "start() first"
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"still running after {timeout} s") from exc
        for reader in self._readers:
            reader.join()
        self.ended_at = self.ended_at or time.time()
        self._close_lifeline()
        return code

    def stop(self) -> int:
        """Stop the whole tree: SIGTERM, ``kill_grace`` seconds, SIGKILL; returns the exit code."""
        assert self.process is not None, "start() first"
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)  # the supervisor fans out to the group
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=self.kill_grace + 5)
            except subprocess.TimeoutExpired:
                # The supervisor itself is stuck: kill its whole session ourselves.
                kill_session(self.process.pid)
                self.process.wait()
        self.ended_at = time.time()
        self._close_lifeline()
        for reader in self._readers:
            reader.join(timeout=5)
        return self.process.returncode

    def _close_lifeline(self) -> None:
        if self._lifeline_w is not None:
            os.close(self._lifeline_w)
            self._lifeline_w = None

    def _read(self, name: str, stream) -> None:
        fd = stream.fileno()
        pending = b""
        dropping = False  # inside a line that passed the 1 MiB limit
        emit = self.on_line
        while True:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            data = pending + chunk if pending else chunk
            start = 0
            while True:
                nl = data.find(b"\n", start)
                cr = data.find(b"\r", start)
                if nl == -1 and cr == -1:
                    break
                end = nl if cr == -1 or (nl != -1 and nl < cr) else cr
                if end == len(data) - 1 and cr == end:
                    break  # a "\r" at the chunk's end may be half of a "\r\n": wait for the next chunk
                if not dropping:
                    emit(name, data[start:end].decode("utf-8", "replace"))
                dropping = False
                step = 2 if data[end : end + 2] == b"\r\n" else 1
                start = end + step
            pending = data[start:]
            if len(pending) > LOG_LINE_LIMIT_BYTES and not dropping:
                cut = pending[:LOG_LINE_LIMIT_BYTES].decode("utf-8", "replace")
                emit(name, cut + " … [line over 1 MiB truncated]")
                dropping, pending = True, b""
            elif dropping:
                pending = b""
        if pending and not dropping:
            emit(name, pending.decode("utf-8", "replace"))
        stream.close()


def kill_session(session_id: int) -> None:
    """SIGKILL every process of a session (found through /proc): the last resort."""
    for pid, fields in iter_proc_stat():
        if int(fields[3]) == session_id:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
