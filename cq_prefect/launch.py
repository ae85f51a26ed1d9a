"""The flow-run command of ``cq-gpu`` workers: hands the run to the worker's warm engine, or runs it cold.

Run as ``python -S launch.py`` (standard library only: it starts in milliseconds). The worker starts it
exactly where stock Prefect would start ``python -m prefect.engine``: same environment, working
directory and standard streams. It passes those, and its stdin/stdout/stderr descriptors, over the
Unix socket named by ``CQ_FORKSERVER`` to :mod:`cq_prefect.forkserver`, which forks an engine that has
already imported Prefect, MLflow and the experiment flow. This process then stands in for the engine:
it forwards signals to it and exits with its status, so cancellation and crash reporting work as for
a stock engine. Without a reachable fork server it execs ``python -m prefect.engine`` itself.
"""

import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def cold_start() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])


def main() -> None:
    path = os.environ.get("CQ_FORKSERVER")
    if not path:
        cold_start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        header = json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:], "pgid": os.getpgid(0)}).encode()
        socket.send_fds(sock, [len(header).to_bytes(8, "big") + header], [0, 1, 2])
        reader = sock.makefile("r", encoding="utf-8")
        started = json.loads(reader.readline() or "{}")
    except (OSError, ValueError):
        sock.close()
        cold_start()
    if "pid" not in started:  # the fork server refused (it says why on our stderr); run cold
        sock.close()
        cold_start()
    child = started["pid"]

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    line = reader.readline()  # retried across the signals forwarded meanwhile (PEP 475)
    status = json.loads(line).get("exit", 1) if line.strip() else 1
    if status < 0:  # killed by a signal: die the same way, as the engine itself would have
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


if __name__ == "__main__":
    main()
