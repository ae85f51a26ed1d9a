"""A warm engine for the ``cq-gpu`` worker: Prefect, MLflow and the experiment flow imported once, forked per run.

A stock worker starts ``python -m prefect.engine`` for every run, and that interpreter spends about two
seconds importing Prefect (and the experiment flow about one more importing MLflow) before the command
can start. The worker instead starts this server once (``python -m cq_prefect.forkserver SOCKET``); it
imports everything, then waits on a Unix socket. :mod:`cq_prefect.launch`, started by the worker in
place of the engine, sends it the run's environment, working directory and standard streams; the
server forks, and the child becomes ``python -m prefect.engine`` for that run with the run's own
environment and settings. The server reports the child's pid, then its exit status, to the launcher.
For an experiment run the child first starts the experiment's command (:mod:`cq_prefect.prestart`),
which the flow takes over once the engine gets there, and kills it if the engine never does.

Nothing here starts a thread before forking: the children inherit a single-threaded, imported process.
The server exits when its worker is gone and its last child has ended.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys

HEADER_LIMIT = 16 * 1024 * 1024


def preload() -> None:
    import prefect.engine  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.flows  # noqa: F401

    import cq_prefect.experiment  # noqa: F401
    import mlflow.tracking  # noqa: F401


def serve(path: str, parent: int) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # child pid → its launcher's connection
    stopping = []
    # SIGTERM (the worker stopping): take no new runs, but keep reporting to the running ones' launchers.
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print("ready", flush=True)
    while True:
        for key, _ in selector.select(timeout=0.2):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                pid = _fork_for(conn, listener)
                if pid is not None:
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
            else:  # a launcher went away (killed): its engine must not run on unobserved
                _kill(key.data, signal.SIGTERM)
                selector.unregister(key.fileobj)
        _reap(children, selector)
        if stopping and listener.fileno() != -1:
            selector.unregister(listener)
            listener.close()
        if (stopping or os.getppid() != parent) and not children:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            return


def _fork_for(conn: socket.socket, listener: socket.socket) -> int | None:
    try:
        conn.settimeout(10)
        first, fds, _, _ = socket.recv_fds(conn, 65536, 3)
        size = int.from_bytes(first[:8], "big")
        body = first[8:]
        if size > HEADER_LIMIT:
            raise ValueError(f"header of {size} bytes")
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("launcher closed the socket mid-request")
            body += chunk
        request = json.loads(body)
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors, got {len(fds)}")
    except (OSError, ValueError) as exc:
        print(f"cq forkserver: bad request ({exc}); the launcher runs the engine cold", file=sys.stderr, flush=True)
        conn.close()
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        _become_engine(conn, request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:
        _kill(pid, signal.SIGTERM)
    return pid


def _become_engine(conn: socket.socket, request: dict, fds: list[int]) -> None:
    from cq_prefect import prestart  # preloaded (cq_prefect.experiment imports it)

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        conn.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.setpgid(0, int(request.get("pgid") or os.getpgid(0)))
        except OSError:
            pass
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # An experiment's command starts now, not after the engine's start-up; the flow adopts it.
        if prestart.start_from_environment() is not None:
            signal.signal(signal.SIGTERM, _terminate)
        sys.argv = ["prefect.engine", *request.get("argv", [])]
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)

        import prefect.context
        from prefect.logging.configuration import setup_logging

        prefect.context.refresh_global_settings_context()  # this run's PREFECT_* settings, not the server's
        setup_logging(incremental=False)
        import runpy
        import warnings

        warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)

        profile_to = os.environ.get("CQ_ENGINE_PROFILE")  # a folder: one cProfile dump per run (diagnostics)
        profiler = None
        if profile_to:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        terminated_by = None
        try:
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
            code = 0
        except _Terminated as exc:
            terminated_by = exc.signum
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        terminated_by = terminated_by or _terminated_by  # its exception may have been wrapped, or swallowed
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_to, f"engine-{os.getpid()}.prof"))
        prestart.discard()  # the engine never reached the flow (or the flow left it running): kill its tree
        if terminated_by is not None:
            _die_of(terminated_by)
        _shutdown_like_the_interpreter()
    except BaseException as exc:  # noqa: BLE001 - the child must always end here, never in the server loop
        # _Terminated may arrive wrapped: raised inside a callback of compiled code (pydantic-core's serializer
        # during Prefect's logging set-up) it surfaces as that library's own error.
        signum = exc.signum if isinstance(exc, _Terminated) else _terminated_by
        if signum is None:
            import traceback

            traceback.print_exc()
        try:
            prestart.discard()
        except BaseException:  # noqa: BLE001 - its supervisor still kills it when this process is gone
            pass
        if signum is not None:
            _die_of(signum)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class _Terminated(SystemExit):
    """SIGTERM while a prestarted command waits for its flow: unwinds the engine (as a BaseException,
    which no ``except Exception`` swallows) so that the command is killed and the run recorded first."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


_terminated_by: int | None = None  # the signal _terminate acted on, whatever became of its exception


def _terminate(signum, _frame) -> None:
    # Installed only until Prefect's engine installs its own handler around the flow (and again after it).
    from cq_prefect import prestart

    global _terminated_by
    signal.signal(signum, signal.SIG_DFL)
    _terminated_by = signum
    if not prestart.waiting():
        _die_of(signum)  # as without a prestart: the command's supervisor sees its lifeline close
    raise _Terminated(signum)


def _die_of(signum: int) -> None:
    """End the way SIGTERM's default action would (the launcher and worker see the same exit status)."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached


def _shutdown_like_the_interpreter() -> None:
    """What a normal exit does: join non-daemon threads, then run atexit handlers (Prefect drains there)."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()


def _reap(children: dict[int, socket.socket], selector: selectors.BaseSelector) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        try:
            selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass
        conn.close()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def main() -> None:
    path, parent = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    preload()
    serve(path, parent)


if __name__ == "__main__":
    main()
