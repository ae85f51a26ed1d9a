"""The embedded stack: a local Prefect server, MLflow server and worker under ``CQ_HOME``.

``cq up`` starts what is not already running (health-checked, pid files in ``CQ_HOME/run``, logs in
``CQ_HOME/logs``), ``cq down`` stops it (SIGTERM to each process group, then SIGKILL), ``cq status``
reports it. When ``PREFECT_API_URL`` / ``MLFLOW_TRACKING_URI`` point at other servers, cq uses those and
starts only the rest.

Layout::

    $CQ_HOME/stack.json          ports and URLs of the running stack
    $CQ_HOME/run/NAME.pid        one per service: prefect-server, mlflow-server, worker
    $CQ_HOME/logs/NAME.log
    $CQ_HOME/prefect/            Prefect home and SQLite database (or CQ_PREFECT_DATABASE_URL: PostgreSQL)
    $CQ_HOME/mlflow/             MLflow SQLite database and artifacts; auth/: its users (CQ_MLFLOW_AUTH)
    $CQ_HOME/spool/              metric points waiting for MLflow; spool/logs/: output lines waiting for Prefect

``CQ_PREFECT_DATABASE_URL`` puts the embedded Prefect server on another database, e.g.
``postgresql+asyncpg://postgres@127.0.0.1:5432/cq`` (the database must exist); ``cq up`` checks that it
answers before it starts anything.

``CQ_PREFECT_AUTH`` / ``CQ_MLFLOW_AUTH`` (``USER:PASSWORD``) make the servers require those credentials and
every process the stack starts send them (:mod:`cq_prefect.auth`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from cq_prefect import auth
from cq_prefect.errors import BadInput, StackError
from cq_prefect.paths import cq_home

# subprocess, signal and threading are imported where a service is started or stopped: the quick commands
# (`cq knowledge search`, `cq note`) only read the endpoints and ping them, and start in milliseconds.

HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOL = "local"
SERVICES = ("prefect-server", "mlflow-server", "worker")
DATABASE_DRIVERS = ("sqlite+aiosqlite", "postgresql+asyncpg")  # the two Prefect's server supports


@dataclass(frozen=True)
class Endpoints:
    """Where cq talks to: the Prefect API and UI, the MLflow tracking server and UI."""

    prefect_api_url: str
    prefect_ui_url: str
    mlflow_tracking_uri: str
    mlflow_ui_url: str


@dataclass(frozen=True)
class StackConfig:
    home: Path
    prefect_port: int
    mlflow_port: int
    pool: str
    prefect_database_url: str = ""  # empty: SQLite under CQ_HOME

    @classmethod
    def from_env(cls, prefect_port: int | None = None, mlflow_port: int | None = None, pool: str | None = None):
        home = cq_home()
        saved = _read_json(home / "stack.json")
        return cls(
            home=home,
            prefect_port=prefect_port or int(os.environ.get("CQ_PREFECT_PORT") or saved.get("prefect_port") or DEFAULT_PREFECT_PORT),
            mlflow_port=mlflow_port or int(os.environ.get("CQ_MLFLOW_PORT") or saved.get("mlflow_port") or DEFAULT_MLFLOW_PORT),
            pool=pool or os.environ.get("CQ_POOL") or DEFAULT_POOL,
            prefect_database_url=os.environ.get("CQ_PREFECT_DATABASE_URL", "").strip(),
        )

    @property
    def local_prefect_api_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def local_mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def database_url(self) -> str:
        """The Prefect server's database: ``CQ_PREFECT_DATABASE_URL`` or SQLite in ``CQ_HOME/prefect``."""
        return self.prefect_database_url or f"sqlite+aiosqlite:///{self.home / 'prefect' / 'prefect.db'}"

    def pid_file(self, service: str) -> Path:
        return self.home / "run" / f"{service}.pid"

    def log_file(self, service: str) -> Path:
        return self.home / "logs" / f"{service}.log"

    def external_prefect(self) -> str | None:
        """PREFECT_API_URL when it points at a server that is not this stack's own."""
        url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
        return url if url and url != self.local_prefect_api_url else None

    def external_mlflow(self) -> str | None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").rstrip("/")
        return uri if uri and uri != self.local_mlflow_uri else None

    def endpoints(self) -> Endpoints:
        api = self.external_prefect() or self.local_prefect_api_url
        mlflow = self.external_mlflow() or self.local_mlflow_uri
        ui = os.environ.get("PREFECT_UI_URL") or (api[: -len("/api")] if api.endswith("/api") else api)
        mlflow_ui = mlflow if mlflow.startswith("http") else ""
        return Endpoints(api, ui, mlflow, mlflow_ui)


# -- health and processes -------------------------------------------------------------------------


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (local URL)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def prefect_healthy(api_url: str) -> bool:
    return _http_ok(api_url.rstrip("/") + "/health")


def mlflow_healthy(uri: str) -> bool:
    if not uri.startswith("http"):
        return True  # a database URI: nothing to ping
    return _http_ok(uri.rstrip("/") + "/health")


def check_mlflow_api(uri: str) -> None:
    """A real API call, not /health: MLflow exempts /health from its Host-header and auth checks, runs aren't.

    Raises :class:`~cq_prefect.errors.AuthRefused` when MLflow refuses this process's credentials."""
    if not uri.startswith(("http://", "https://")):
        return
    code, body = auth.http_status(auth.mlflow_probe_url(uri), auth.mlflow_header())
    if code == 401 or (code == 403 and "Permission denied" in body):
        raise auth.mlflow_refused(uri, code)
    if code == 403:
        host = urllib.parse.urlsplit(uri).netloc
        raise StackError(
            f"MLflow at {uri} refuses requests addressed to {host} (403: {body}); "
            f"on the MLflow server's host, allow it: MLFLOW_SERVER_ALLOWED_HOSTS (or CQ_MLFLOW_ALLOWED_HOSTS={host} "
            "before `cq up`), then restart that server"
        )
    # other answers, and unreachable servers, are reported by the health checks and the calls that follow


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


def read_pid(config: StackConfig, service: str) -> int | None:
    path = config.pid_file(service)
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(config: StackConfig, service: str) -> int | None:
    """The pid of a running service, or None; a stale pid file is removed (and says so)."""
    pid = read_pid(config, service)
    if pid is None:
        return None
    if pid_alive(pid):
        return pid
    config.pid_file(service).unlink(missing_ok=True)
    print(f"cq: removed stale pid file for {service} (pid {pid} is not running)", file=sys.stderr)
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


def _spawn(config: StackConfig, service: str, argv: list[str], env: dict[str, str], background: bool = False) -> int:
    """Start a service detached; ``background`` ones (the servers) run at bookkeeping priority."""
    import subprocess

    from cq_prefect.niceness import deprioritize_process

    config.log_file(service).parent.mkdir(parents=True, exist_ok=True)
    config.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
    log = config.log_file(service).open("ab")
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} cq starts {service}: {' '.join(argv)}\n".encode())
    log.flush()
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        cwd=config.home, start_new_session=True, preexec_fn=deprioritize_process if background else None,
    )
    log.close()
    config.pid_file(service).write_text(str(process.pid))
    return process.pid


def _wait_healthy(config: StackConfig, service: str, pid: int, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not pid_alive(pid):
            break
        time.sleep(0.3)
    tail = _tail(config.log_file(service), 15)
    stop_service(config, service)
    raise StackError(
        f"{service} did not become healthy within {timeout:.0f} s; its log ({config.log_file(service)}) ends:\n{tail}"
    )


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _base_env(config: StackConfig, endpoints: Endpoints) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CQ_HOME=str(config.home),
        PREFECT_API_URL=endpoints.prefect_api_url,
        MLFLOW_TRACKING_URI=endpoints.mlflow_tracking_uri,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    auth.apply_client_environment(env)  # the worker and its flow runs send the credentials
    return env


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# -- up / down / status ---------------------------------------------------------------------------


def up(config: StackConfig | None = None, *, worker: bool = True, quiet: bool = False) -> Endpoints:
    """Start every part of the stack that is not running; returns the endpoints. Idempotent."""
    config = config or StackConfig.from_env()
    say = (lambda *_: None) if quiet else (lambda msg: print(f"cq: {msg}", file=sys.stderr))
    config.home.mkdir(parents=True, exist_ok=True)
    endpoints = config.endpoints()
    env = _base_env(config, endpoints)

    for name, url, healthy in (
        ("PREFECT_API_URL", config.external_prefect(), prefect_healthy),
        ("MLFLOW_TRACKING_URI", config.external_mlflow(), mlflow_healthy),
    ):
        if url and not healthy(url):
            raise StackError(f"{name}={url} does not answer; start that server or unset {name} to use the embedded one")
    start_prefect_server = not config.external_prefect() and (
        running_pid(config, "prefect-server") is None or not prefect_healthy(endpoints.prefect_api_url)
    )
    if start_prefect_server:
        check_database_url(config.database_url)  # before anything starts: a bad URL leaves nothing behind
    started: list[str] = []
    try:
        waits = []  # start both servers, then wait for both: their cold starts overlap
        if start_prefect_server:
            waits.append(_start_prefect(config, env, say))
            started.append("prefect-server")
        if not config.external_mlflow() and (
            running_pid(config, "mlflow-server") is None or not mlflow_healthy(endpoints.mlflow_tracking_uri)
        ):
            waits.append(_start_mlflow(config, env, say))
            started.append("mlflow-server")
        for wait in waits:
            wait()
        _check_auth(config, endpoints)  # before the first authenticated call below
    except BaseException:
        for service in started:  # nothing half-started
            stop_service(config, service)
        raise

    _write_json(
        config.home / "stack.json",
        {**asdict(endpoints), "prefect_port": config.prefect_port, "mlflow_port": config.mlflow_port, "pool": config.pool},
    )
    with prefect_settings(endpoints):
        from cq_prefect.crash import ensure_crash_automation
        from cq_prefect.deployment import ensure_experiment_deployment

        ensure_experiment_deployment(config.pool)
        ensure_crash_automation()  # runs whose process dies become Crashed (cq_prefect.crash)
        from prefect.client.orchestration import get_client

        from cq_prefect.loop_submission import ensure_loop_deployment

        with get_client(sync_client=True) as client:  # research-loop/default on the CPU pool cq-loops
            ensure_loop_deployment(client)
    if worker and running_pid(config, "worker") is None:
        _start_worker(config, env, say)
        with prefect_settings(endpoints):
            name = _worker_name(config)
            pid = read_pid(config, "worker")
            online = lambda: any(w["name"] == name and w["status"] == "ONLINE" for w in _workers())  # noqa: E731
            _wait_healthy(config, "worker", pid, online, 90)
    say(f"Prefect UI {endpoints.prefect_ui_url} · MLflow UI {endpoints.mlflow_ui_url} · pool '{config.pool}'")
    return endpoints


def _check_auth(config: StackConfig, endpoints: Endpoints) -> None:
    """The servers want the credentials this process sends, and the embedded ones want them at all.

    An embedded server that answers without credentials although ``CQ_*_AUTH`` is set was started
    before it was: an error, since it is open to anyone. The embedded MLflow's admin is set to
    ``CQ_MLFLOW_AUTH`` when it refuses it (rotation: MLflow reads its admin settings only once).
    """
    prefect, mlflow = auth.prefect_credentials(), auth.mlflow_credentials()
    for variable, creds, external, url in (
        (auth.PREFECT_ENV, prefect, config.external_prefect(), auth.prefect_probe_url(endpoints.prefect_api_url)),
        (auth.MLFLOW_ENV, mlflow, config.external_mlflow(), auth.mlflow_probe_url(endpoints.mlflow_tracking_uri)),
    ):
        if creds and not external and auth.http_status(url, None)[0] == 200:
            server = "Prefect" if variable == auth.PREFECT_ENV else "MLflow"
            raise StackError(
                f"{variable} is set, but the running {server} server answers requests without credentials: it was "
                f"started before {variable} was set; restart the stack to protect it: cq down && cq up"
            )
    if mlflow and not config.external_mlflow():
        folder = config.home / "mlflow" / "auth"
        recorded = auth.mlflow_admin_name(folder)
        refused = auth.http_status(auth.mlflow_probe_url(endpoints.mlflow_tracking_uri), mlflow.header())[0] == 401
        if refused or (recorded and recorded != mlflow.username):
            auth.set_mlflow_admin(folder, mlflow)
        elif recorded is None:  # MLflow made this admin from its settings: remember it, for a later rename
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            (folder / "admin").write_text(mlflow.username)
    auth.check_prefect(endpoints.prefect_api_url)
    check_mlflow_api(endpoints.mlflow_tracking_uri)


def _require_free_port(port: int, server: str, flag: str) -> None:
    if not _port_free(port):
        raise StackError(
            f"port {port} is taken by another program, so the {server} server cannot start; free it or pick "
            f"another: `cq up --{flag}-port {port + 10}` (or CQ_{flag.upper()}_PORT)"
        )


def _start_prefect(config: StackConfig, env: dict[str, str], say):
    _require_free_port(config.prefect_port, "Prefect", "prefect")
    prefect_home = config.home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    env = dict(env)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_DATABASE_CONNECTION_URL=config.database_url,
        PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
        PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
        PREFECT_UI_API_URL=config.local_prefect_api_url,
        PREFECT__SERVER_FINAL="1",  # as `prefect server start` sets: this process creates one app only
    )
    creds = auth.prefect_credentials(env)
    if creds:  # Prefect's own server auth: every API request but GET /health needs it (the UI asks for it)
        env[auth.PREFECT_SERVER_ENV] = creds.joined()
    env = _without(env, auth.MLFLOW_ENV, auth.MLFLOW_PASSWORD_ENV)  # each server gets only its own secret
    say(f"starting Prefect server on {HOST}:{config.prefect_port} (log: {config.log_file('prefect-server')})")
    pid = _spawn(config, "prefect-server", prefect_server_argv(config.prefect_port, env), env, background=True)
    return lambda: _wait_healthy(config, "prefect-server", pid, lambda: prefect_healthy(config.local_prefect_api_url), 120)


# `prefect server start`'s defaults for the uvicorn options it takes from Prefect settings; an environment
# variable of the same name overrides each, as it would for Prefect's CLI.
_UVICORN_SETTINGS = (
    ("--timeout-keep-alive", "PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", "5"),
    ("--ws-ping-interval", "PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL", "20"),
    ("--ws-ping-timeout", "PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT", "20"),
    ("--log-level", "PREFECT_SERVER_LOGGING_LEVEL", "warning"),
)


def prefect_server_argv(port: int, env: dict[str, str]) -> list[str]:
    """The command that serves the Prefect API and UI on ``HOST:port``.

    The one ``prefect server start --background`` runs (prefect/cli/_server_utils.py ``_run_in_background``)
    with our factory, :func:`cq_prefect.prefect_server.create_app`: Prefect's app with SQLite-busy 503s
    retried inside the server. ``--log-level`` is what the foreground ``prefect server start`` passes
    (Prefect's server logging level, WARNING by default: no per-request access lines in the log). The other settings
    that command exports (scheduler, late runs, UI, analytics, logging level) are the values the server
    process reads itself from this same environment, so they need no copy here.
    """
    import importlib.util

    site = Path(importlib.util.find_spec("prefect").origin).parent.parent  # found, not imported: 1 s saved
    argv = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(site),
        "--factory", "cq_prefect.prefect_server:create_app", "--host", HOST, "--port", str(port), "--workers", "1",
    ]
    for flag, setting, default in _UVICORN_SETTINGS:
        argv += [flag, (env.get(setting) or default).lower()]
    return argv


def start_prefect(config: StackConfig | None = None, *, quiet: bool = True) -> None:
    """Start the embedded Prefect server on ``config``'s port and database and wait until it answers.

    For bringing the server back after :func:`stop_service`; clients (workers, running flows) that retry
    carry on. ``up`` is the way to start the whole stack::

        stop_service(config, "prefect-server"); ...; start_prefect(config)
    """
    config = config or StackConfig.from_env()
    say = (lambda *_: None) if quiet else (lambda msg: print(f"cq: {msg}", file=sys.stderr))
    check_database_url(config.database_url)
    _start_prefect(config, _base_env(config, config.endpoints()), say)()


def restart_prefect(config: StackConfig | None = None, *, quiet: bool = True) -> None:
    """Stop the embedded Prefect server and start it again on the same port and database."""
    config = config or StackConfig.from_env()
    stop_service(config, "prefect-server")
    start_prefect(config, quiet=quiet)


def check_database_url(url: str, timeout: float = 5.0) -> None:
    """Raise :class:`BadInput` unless ``url`` is a database the Prefect server can use and that answers.

    ``sqlite+aiosqlite:////abs/path.db`` (its folder is created) or ``postgresql+asyncpg://USER@HOST:PORT/DB``
    (the database must exist and accept the user).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    fix = (
        "set CQ_PREFECT_DATABASE_URL to postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT/DATABASE or "
        "sqlite+aiosqlite:////ABSOLUTE/PATH/prefect.db, or unset it for SQLite under CQ_HOME"
    )
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise BadInput(f"CQ_PREFECT_DATABASE_URL={url!r} is not a database URL; {fix}") from exc
    shown = parsed.render_as_string(hide_password=True)
    if parsed.drivername not in DATABASE_DRIVERS:
        backend = parsed.get_backend_name()
        hint = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}.get(backend)
        better = f" (use {parsed.set(drivername=hint).render_as_string(hide_password=True)})" if hint else ""
        raise BadInput(
            f"CQ_PREFECT_DATABASE_URL={shown} uses driver '{parsed.drivername}', which the Prefect server "
            f"cannot use: it takes {' or '.join(DATABASE_DRIVERS)}{better}; {fix}"
        )
    if parsed.drivername.startswith("sqlite"):
        path = Path(parsed.database or "")
        if not parsed.database or parsed.database == ":memory:" or not path.is_absolute():
            raise BadInput(f"CQ_PREFECT_DATABASE_URL={shown} needs an absolute file path (four slashes); {fix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInput(f"CQ_PREFECT_DATABASE_URL={shown}: cannot create {path.parent} ({exc}); {fix}") from exc
        return
    if not parsed.database:
        raise BadInput(f"CQ_PREFECT_DATABASE_URL={shown} names no database (…/DATABASE at the end); {fix}")
    problem = _postgres_problem(parsed, timeout)
    if problem:
        raise BadInput(f"CQ_PREFECT_DATABASE_URL={shown}: {problem}")


def _postgres_problem(parsed, timeout: float) -> str | None:
    """Connect once with asyncpg (Prefect's own driver); a sentence naming the problem and fix, or None."""
    import asyncio
    import threading

    import asyncpg

    host, port, user = parsed.host or "localhost", parsed.port or 5432, parsed.username or os.environ.get("USER", "")
    where = f"{host}:{port}"

    async def ping() -> None:
        connection = await asyncpg.connect(
            dsn=parsed.set(drivername="postgresql").render_as_string(hide_password=False), timeout=timeout
        )
        try:
            await connection.fetchval("SELECT 1")
        finally:
            await connection.close()

    outcome: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(lambda: asyncio.run(ping()))), daemon=True)
    thread.start()  # a thread of its own: up() may be called while an event loop runs in this one
    thread.join(timeout + 5)
    error = outcome[0] if outcome else TimeoutError()
    if error is None:
        return None
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        return (
            f"database '{parsed.database}' does not exist on {where}; create it "
            f"(`createdb -h {host} -p {port} -U {user} {parsed.database}`) or name another"
        )
    if isinstance(error, (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)):
        return f"PostgreSQL at {where} refused user '{user}' ({error}); fix the user or password in the URL"
    if isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError)):
        return f"no PostgreSQL answers at {where} ({type(error).__name__}: {error}); start it or fix the host and port"
    return f"PostgreSQL at {where} did not accept the connection ({type(error).__name__}: {error})"


def _capture(call) -> BaseException | None:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (handed to the caller, which names it)
        return exc
    return None


def _start_mlflow(config: StackConfig, env: dict[str, str], say):
    _require_free_port(config.mlflow_port, "MLflow", "mlflow")
    mlflow_home = config.home / "mlflow"
    (mlflow_home / "artifacts").mkdir(parents=True, exist_ok=True)
    say(f"starting MLflow server on {HOST}:{config.mlflow_port} (log: {config.log_file('mlflow-server')})")
    argv = [
        _bin("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{mlflow_home / 'mlflow.db'}",
        "--artifacts-destination", str(mlflow_home / "artifacts"),
        "--host", HOST, "--port", str(config.mlflow_port), "--workers", "1",
    ]
    # MLflow 3's job runner (8 extra processes, busy after start) serves no cq feature: keep it off.
    env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    env = _without(env, auth.PREFECT_ENV, auth.PREFECT_CLIENT_ENV, auth.PREFECT_SERVER_ENV)
    creds = auth.mlflow_credentials(env)
    if creds:  # MLflow's basic-auth app: every request but /health needs a user of CQ_HOME/mlflow/auth/auth.db
        argv += ["--app-name", "basic-auth"]
        env.update(auth.mlflow_server_environment(mlflow_home / "auth", creds))
    extra_hosts = os.environ.get("CQ_MLFLOW_ALLOWED_HOSTS", "").strip()
    if extra_hosts and not env.get("MLFLOW_SERVER_ALLOWED_HOSTS"):
        # MLflow answers 403 to a Host header outside localhost and private ranges (DNS-rebinding guard):
        # workers that know this server by another name or address need it listed, on top of the defaults.
        from mlflow.server.security_utils import get_default_allowed_hosts

        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join([*get_default_allowed_hosts(), extra_hosts])
    pid = _spawn(config, "mlflow-server", argv, env, background=True)
    return lambda: _wait_healthy(config, "mlflow-server", pid, lambda: mlflow_healthy(config.local_mlflow_uri), 120)


def _start_worker(config: StackConfig, env: dict[str, str], say) -> None:
    env = dict(env)
    env.setdefault("PREFECT_WORKER_PREFETCH_SECONDS", "5")
    say(f"starting a worker for pool '{config.pool}' (log: {config.log_file('worker')})")
    argv = [_bin("cq"), "worker", "start", "--pool", config.pool, "--gpus", os.environ.get("CQ_GPUS", "auto"),
            "--name", _worker_name(config)]
    _spawn(config, "worker", argv, env)


def _worker_name(config: StackConfig) -> str:
    return f"cq-local-{socket.gethostname()}-{config.pool}"


def stop_service(config: StackConfig, service: str, grace: float = 15.0) -> bool:
    """SIGTERM the service's process group, wait, SIGKILL; True if something was stopped."""
    import signal

    pid = read_pid(config, service)
    config.pid_file(service).unlink(missing_ok=True)
    if pid is None or not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def down(config: StackConfig | None = None, quiet: bool = False) -> list[str]:
    """Stop the worker, then MLflow, then Prefect; returns the names of what was stopped."""
    config = config or StackConfig.from_env()
    stopped = [service for service in reversed(SERVICES) if stop_service(config, service)]
    if not quiet:
        print(f"cq: stopped {', '.join(stopped)}" if stopped else "cq: nothing was running", file=sys.stderr)
    return stopped


def status(config: StackConfig | None = None) -> dict:
    """The stack's URLs, health, processes and the workers the Prefect server knows."""
    config = config or StackConfig.from_env()
    endpoints = config.endpoints()
    report = {
        **asdict(endpoints),
        "prefect_healthy": prefect_healthy(endpoints.prefect_api_url),
        "mlflow_healthy": mlflow_healthy(endpoints.mlflow_tracking_uri),
        "processes": {service: read_pid(config, service) for service in SERVICES if running_pid(config, service)},
        "workers": [],
        "auth": auth.sources(),  # which variable gives each server's credentials, never the values
    }
    if report["prefect_healthy"]:
        auth.check_prefect(endpoints.prefect_api_url)  # refused credentials: say which variable to set
        with prefect_settings(endpoints):
            report["workers"] = _workers()
    if report["mlflow_healthy"]:
        check_mlflow_api(endpoints.mlflow_tracking_uri)
    return report


def _workers() -> list[dict]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        out = []
        for pool in client.read_work_pools():
            for worker in client.read_workers_for_work_pool(pool.name):
                out.append(
                    {
                        "name": worker.name,
                        "pool": pool.name,
                        "pool_type": pool.type,
                        "status": str(getattr(worker.status, "value", worker.status)),
                        "last_heartbeat": worker.last_heartbeat_time.isoformat() if worker.last_heartbeat_time else None,
                    }
                )
        return out


# -- connecting -----------------------------------------------------------------------------------


def connect(start: bool = True, quiet: bool = False, worker: bool = True) -> Endpoints:
    """The endpoints to use; when nothing answers and ``start``, start the embedded stack (and say so).

    ``worker=False`` starts the servers only (for ``cq worker start``, which is the worker).
    """
    config = StackConfig.from_env()
    endpoints = config.endpoints()
    if prefect_healthy(endpoints.prefect_api_url) and mlflow_healthy(endpoints.mlflow_tracking_uri):
        return endpoints
    if not start:
        raise StackError("no cq stack is running; start it with `cq up`")
    if not quiet:
        print(f"cq: no running stack found; starting the embedded one under {config.home} (`cq up`)", file=sys.stderr)
    return up(config, quiet=quiet, worker=worker)


@contextlib.contextmanager
def prefect_settings(endpoints: Endpoints):
    """Point Prefect's client at ``endpoints``, with the credentials (its settings are read once, at import)."""
    auth.apply_client_environment()
    os.environ["PREFECT_API_URL"] = endpoints.prefect_api_url
    os.environ["MLFLOW_TRACKING_URI"] = endpoints.mlflow_tracking_uri
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {}
    if PREFECT_API_URL.value() != endpoints.prefect_api_url:
        updates[PREFECT_API_URL] = endpoints.prefect_api_url
    auth_string = os.environ.get(auth.PREFECT_CLIENT_ENV)
    if auth_string and PREFECT_API_AUTH_STRING.value() != auth_string:
        updates[PREFECT_API_AUTH_STRING] = auth_string
    if not updates:
        yield  # already pointing there: rebuilding the settings costs ~0.2 s per call
        return
    with temporary_settings(updates=updates):
        yield


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
