"""CommandRun: real subprocesses, their output lines, and no process outliving its experiment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import PYTHON, pid_alive, wait_for

from cq_prefect.command import CommandRun
from cq_prefect.metric_syntax import LOG_LINE_LIMIT_BYTES


def run(command: str, cwd, **kwargs) -> tuple[int, list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    proc = CommandRun(command, cwd, on_line=lambda stream, line: lines.append((stream, line)), **kwargs)
    proc.start()
    return proc.wait(timeout=60), lines


def test_lines_from_both_streams_with_carriage_returns(tmp_path):
    code, lines = run("printf 'a\\rb\\r\\nc\\n'; printf 'err\\n' >&2; printf 'no newline'", tmp_path)
    assert code == 0
    assert [l for s, l in lines if s == "stdout"] == ["a", "b", "c", "no newline"]
    assert [l for s, l in lines if s == "stderr"] == ["err"]


def test_exit_code_and_workdir_and_env(tmp_path):
    code, lines = run("pwd; echo $CQ_X; exit 5", tmp_path, env={**os.environ, "CQ_X": "42"})
    assert code == 5
    assert [l for _, l in lines] == [str(tmp_path), "42"]


def test_invalid_utf8_is_replaced(tmp_path):
    code, lines = run("printf 'ok \\377\\376 @loss=1\\n'", tmp_path)
    assert lines == [("stdout", "ok \ufffd\ufffd @loss=1")]


def test_line_over_one_mib_is_truncated_and_the_next_line_survives(tmp_path):
    script = tmp_path / "big.py"
    script.write_text("import sys\nsys.stdout.write('x' * (3 * 1024 * 1024) + '\\nafter @loss=2\\n')\n")
    code, lines = run(f"{PYTHON} big.py", tmp_path)
    assert code == 0
    assert len(lines) == 2
    assert lines[0][1].startswith("x" * 1000) and lines[0][1].endswith("[line over 1 MiB truncated]")
    assert len(lines[0][1].encode()) <= LOG_LINE_LIMIT_BYTES + 64
    assert lines[1][1] == "after @loss=2"


def test_leftover_background_process_is_killed_when_the_command_exits(tmp_path):
    pidfile = tmp_path / "bg"
    code, _ = run(f"sleep 300 & echo $! > {pidfile}; echo started", tmp_path, kill_grace=2)
    assert code == 0
    pid = int(pidfile.read_text())
    wait_for(lambda: not pid_alive(pid), timeout=10, what="the background process to be killed")


def test_stop_kills_the_tree_even_when_sigterm_is_ignored(tmp_path):
    pidfile = tmp_path / "pids"
    script = tmp_path / "stubborn.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(300)
    """))
    proc = CommandRun(f"{PYTHON} stubborn.py", tmp_path, on_line=lambda *_: None, kill_grace=1)
    proc.start()
    wait_for(lambda: pidfile.exists() and pidfile.read_text(), timeout=20, what="the script to start")
    pids = list(map(int, pidfile.read_text().split()))
    code = proc.stop()
    assert code != 0
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), timeout=10, what=f"pid {pid} to die")


def test_tree_dies_when_the_experiment_process_is_sigkilled(tmp_path):
    """The lifeline: even SIGKILL of the process running the experiment leaves no orphan behind."""
    pidfile = tmp_path / "pids"
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from cq_prefect.command import CommandRun
            cmd = "sleep 300 & echo $$ $! > {pidfile}; sleep 300"
            CommandRun(cmd, {str(tmp_path)!r}, on_line=lambda *_: None, kill_grace=1).start()
            time.sleep(300)
        """)],
    )
    try:
        wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, timeout=30, what="the command")
        pids = list(map(int, pidfile.read_text().split()))
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        for pid in pids:
            wait_for(lambda: not pid_alive(pid), timeout=10, what=f"orphan {pid} to die")
    finally:
        owner.kill()


def test_wait_timeout_then_stop(tmp_path):
    proc = CommandRun("echo hi; sleep 300", tmp_path, on_line=lambda *_: None, kill_grace=1)
    proc.start()
    started = time.monotonic()
    try:
        proc.wait(timeout=0.5)
        raise AssertionError("wait should have timed out")
    except TimeoutError:
        pass
    assert proc.stop() == 128 + signal.SIGTERM  # the supervisor reports the signal that ended the command
    assert time.monotonic() - started < 15
