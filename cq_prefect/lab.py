"""A team's deployment on one machine: network namespaces as hosts, the team profile's servers as processes.

What ``deployments/team/compose.yaml`` runs in containers, this runs natively, so the multi-host, load and
fault tests (tests/test_team_hosts.py) and ``bench/team_load.py`` exercise the same topology:

- **the server host** is this machine's own network namespace. PostgreSQL and Redis are the machine's;
  the lab makes its own databases (``cq_lab_<id>_prefect``, ``…_mlflow``) and takes two empty Redis
  databases, and drops or flushes them on close. Two Prefect API servers (``prefect server start
  --no-services``) and one ``prefect server services start`` share them through prefect-redis, as the
  compose file sets them up; an MLflow tracking server stores runs in PostgreSQL. All four listen on
  127.0.0.1 only. HAProxy, with the compose profile's own ``haproxy.cfg`` (its addresses rewritten), is
  the one address the other hosts know: the bridge's ``.1``.
- **other hosts** are network namespaces on one Linux bridge (a free ``10.213.N.0/24``), each with its own
  hostname (a UTS namespace), ``CQ_HOME`` and Prefect home. GPU hosts can drop every inbound connection
  (nftables or iptables inside the namespace), as behind a NAT. The file system is shared, as an NFS
  home would be.

Prefect's API is protected by its server auth string (``CQ_PREFECT_AUTH`` on the clients). Needs root,
``ip``, ``unshare``, ``haproxy`` and nft or iptables; :func:`missing` names what this machine lacks.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cq_prefect.stack import _bin, _http_ok

SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deployments" / "team" / "haproxy" / "haproxy.cfg"
FIREWALL_TABLE = "cq_lab_inbound"
NFT_INBOUND_DROP = f"""
table inet {FIREWALL_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
    }}
}}
"""


class LabError(RuntimeError):
    """The lab could not start or change a part; the message names the part and its log."""


def tool(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH)


def missing() -> str | None:
    """Why this machine cannot run a lab, or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network and UTS namespaces"
    for name, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("haproxy", "haproxy")):
        if tool(name) is None:
            return f"`{name}` is not installed (apt-get install {package})"
    if tool("nft") is None and tool("iptables") is None:
        return "neither nft nor iptables is installed (apt-get install nftables)"
    with contextlib.suppress(ImportError):
        import prefect_redis  # noqa: F401

        return None
    return "prefect-redis is not installed (pip install prefect-redis): several Prefect servers need it"


def _run(*argv: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)


def _must(*argv: str, stdin: str | None = None, timeout: float = 60) -> str:
    done = _run(*argv, stdin=stdin, timeout=timeout)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done.stdout


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.N.0/24 that no address or route of this machine touches."""
    taken = []
    for line in _must(tool("ip"), "-4", "-o", "addr", "show").splitlines():
        taken.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _must(tool("ip"), "-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        dest = words[1] if words[0] in ("local", "broadcast", "unicast", "unreachable", "blackhole") else words[0]
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(dest, strict=False)
            if network.prefixlen > 0:
                taken.append(network)
    for third in range(1, 255):
        candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise LabError("no free 10.213.N.0/24 on this machine for the lab's bridge")


# -- processes ------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A started process (its own process group) and the file its output goes to."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the group, wait ``grace``, SIGKILL what is left; reaps it."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crash, not a shutdown."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None) -> Proc:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=cwd, start_new_session=True)
    return Proc(name, argv, popen, log)


def _wait(proc: Proc, check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not proc.alive():
            break
        time.sleep(0.3)
    raise LabError(f"{what} did not come up within {timeout:.0f} s; {proc.log} ends:\n{proc.tail()}")


# -- hosts ----------------------------------------------------------------------------------------


@dataclass
class Host:
    """A network namespace on the lab's bridge, with its own hostname, CQ_HOME and Prefect home."""

    lab: Lab
    name: str
    ip: str
    netns: str
    link: str  # the bridge side of its veth pair: down = the host is cut off
    home: Path
    procs: list[Proc] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run on this host: in its network namespace, under its own hostname."""
        return [tool("ip"), "netns", "exec", self.netns, tool("unshare"), "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', self.name, *argv]

    def env(self, **extra: str) -> dict[str, str]:
        """A client's environment on this host: the lab's URLs and credentials, its own homes."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CQ_"))}
        env.update(
            PATH=os.pathsep.join([str(Path(sys.executable).parent), SYSTEM_PATH]),
            HOME=str(self.home),
            CQ_HOME=str(self.home / "cq"),
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_API_URL=self.lab.prefect_api_url,
            MLFLOW_TRACKING_URI=self.lab.mlflow_uri,
            CQ_PREFECT_AUTH=self.lab.prefect_auth,
            PREFECT_API_AUTH_STRING=self.lab.prefect_auth,  # for plain Prefect clients (cq sets it itself)
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def spawn(self, name: str, *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        proc = _spawn(f"{self.name}-{name}", self.argv(*argv), env or self.env(), self.lab.logs, cwd)
        self.procs.append(proc)
        return proc

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 180,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout,
                              env=env or self.env(), cwd=cwd, stdin=subprocess.DEVNULL)

    def cq(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.run(_bin("cq"), *args, timeout=timeout, env=env)

    def spawn_cq(self, name: str, *args: str) -> Proc:
        """``cq ARGS`` started in the background on this host."""
        return self.spawn(name, _bin("cq"), *args)

    def start_worker(self, pool: str, gpus: str, **env: str) -> Proc:
        """``cq worker start`` on this host, serving ``pool`` with the declared GPU ids ``gpus``."""
        return self.spawn(f"worker-{pool}", _bin("cq"), "worker", "start", "--pool", pool, "--gpus", gpus,
                          "--name", f"{self.name}-{pool}", env=self.env(**env))

    def drop_inbound(self) -> str:
        """Inside the namespace: loopback and replies in, every other inbound packet dropped."""
        nft = tool("nft")
        if nft:
            _must(*self._exec(nft, "-f", "-"), stdin=NFT_INBOUND_DROP)
            return _must(*self._exec(nft, "list", "table", "inet", FIREWALL_TABLE))
        iptables = tool("iptables")
        for rule in (["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                     ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                     ["-P", "INPUT", "DROP"]):
            _must(*self._exec(iptables, *rule))
        return _must(*self._exec(iptables, "-S", "INPUT"))

    def cut(self) -> None:
        """Cut the host off the network (its link down): its processes live on, nothing gets through."""
        _must(tool("ip"), "link", "set", self.link, "down")

    def reconnect(self) -> None:
        _must(tool("ip"), "link", "set", self.link, "up")

    def pids(self) -> list[int]:
        done = _run(tool("ip"), "netns", "pids", self.netns)
        return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []

    def power_off(self) -> None:
        """SIGKILL every process on the host at once, as a power cut would."""
        for _ in range(3):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)

    def _exec(self, *argv: str) -> list[str]:
        return [tool("ip"), "netns", "exec", self.netns, *argv]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(grace=5)
        self.power_off()
        _run(tool("ip"), "link", "del", self.link)
        _run(tool("ip"), "netns", "del", self.netns)


# -- the lab --------------------------------------------------------------------------------------


class Lab:
    """The server host's processes, a bridge, and hosts added with :meth:`add_host`. Use as a context."""

    def __init__(self, root: Path, *, postgres: str = "postgresql://postgres@127.0.0.1:5432/postgres",
                 redis: str = "redis://127.0.0.1:6379") -> None:
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.id = secrets.token_hex(3)
        self.postgres = postgres
        self.redis = redis
        self.prefect_auth = f"lab:{secrets.token_urlsafe(12)}"
        self.hosts: dict[str, Host] = {}
        self.api: list[Proc | None] = [None, None]
        self.api_ports = [free_port(), free_port()]
        self.mlflow_port = free_port()
        self.services: Proc | None = None
        self.mlflow: Proc | None = None
        self.haproxy: Proc | None = None
        self._databases: list[str] = []
        self._redis_dbs: list[int] = []
        self._bridge: str | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self.server_ip = ""
        self.proxy_ports = {"prefect": free_port(), "mlflow": free_port()}

    # -- addresses

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.server_ip}:{self.proxy_ports['prefect']}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.server_ip}:{self.proxy_ports['mlflow']}"

    def local_api_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.api_ports[index]}/api"

    # -- lifecycle

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        problem = missing()
        if problem:
            raise LabError(problem)
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_network()
        self._create_databases()
        self._take_redis_dbs()
        env = self.server_env()
        migrate = subprocess.run([_bin("prefect"), "server", "database", "upgrade", "-y"], env=env,
                                 capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        if migrate.returncode != 0:
            raise LabError(f"Prefect's migrations failed: {(migrate.stderr or migrate.stdout)[-2000:]}")
        self.start_mlflow(wait=False)
        # One server first: each registers Prefect's block types at start, and two at once collide on the
        # unique slugs (in compose, the loser restarts; here the second simply waits).
        self.start_api(0)
        self.start_api(1, wait=False)
        self.services = _spawn("prefect-services", [_bin("prefect"), "server", "services", "start"], env, self.logs,
                               self.root)
        self._start_haproxy()
        _wait(self.api[1], lambda: _http_ok(f"{self.local_api_url(1)}/health"), 120, "Prefect API server 2")
        self._wait_mlflow()
        self.wait_proxy_sees_all_up()

    def proxy_server_states(self) -> dict[str, str]:
        """'UP' or 'DOWN' for each server HAProxy has reported a change of (its log: 'Server b/s is UP')."""
        states = {}
        for match in re.finditer(r"Server (\S+/\S+) is (UP|DOWN)", self.haproxy.log.read_text(errors="replace")):
            states[match.group(1)] = match.group(2)
        return states

    def wait_proxy_sees_all_up(self, timeout: float = 60) -> None:
        """Until HAProxy routes to every server again (each that it marked DOWN has passed its checks)."""
        _wait(self.haproxy, lambda: "DOWN" not in self.proxy_server_states().values()
              and _http_ok(f"{self.prefect_api_url}/health") and _http_ok(f"{self.mlflow_uri}/health"),
              timeout, f"HAProxy to route to every server ({self.proxy_server_states()})")

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            with contextlib.suppress(Exception):
                host.close()
        for proc in (self.haproxy, self.mlflow, self.services, *self.api):
            if proc is not None:
                proc.stop(grace=10)
        if self._bridge:
            _run(tool("ip"), "link", "del", self._bridge)
        self._drop_databases()
        self._flush_redis_dbs()

    # -- the network

    def _start_network(self) -> None:
        self.subnet = _free_subnet()
        self.server_ip = str(next(self.subnet.hosts()))
        self._bridge = f"cqlab{self.id}"[:15]
        ip = tool("ip")
        _must(ip, "link", "add", self._bridge, "type", "bridge")
        _must(ip, "addr", "add", f"{self.server_ip}/{self.subnet.prefixlen}", "dev", self._bridge)
        _must(ip, "link", "set", self._bridge, "up")

    def add_host(self, name: str, *, inbound: bool = True) -> Host:
        """A new host on the bridge; ``inbound=False`` drops every connection it did not open itself."""
        if name in self.hosts:
            raise LabError(f"the lab already has a host named {name!r}")
        index = len(self.hosts) + 2
        ip_addr = str(list(self.subnet.hosts())[index - 1])
        ip = tool("ip")
        netns = f"cqlab-{self.id}-{name}"
        link, peer = f"cq{self.id}h{index}", f"cq{self.id}n{index}"
        home = self.root / "hosts" / name
        for sub in ("cq", "prefect"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        _must(ip, "netns", "add", netns)
        host = Host(self, name, ip_addr, netns, link, home)
        self.hosts[name] = host
        _must(ip, "link", "add", link, "type", "veth", "peer", "name", peer)
        _must(ip, "link", "set", link, "master", self._bridge)
        _must(ip, "link", "set", link, "up")
        _must(ip, "link", "set", peer, "netns", netns)
        _run(*host._exec("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"))
        _must(*host._exec(ip, "addr", "add", f"{ip_addr}/{self.subnet.prefixlen}", "dev", peer))
        _must(*host._exec(ip, "link", "set", "lo", "up"))
        _must(*host._exec(ip, "link", "set", peer, "up"))
        if not inbound:
            host.drop_inbound()
        return host

    # -- PostgreSQL and Redis

    def database_url(self, which: str, driver: str = "") -> str:
        base = self.postgres.rsplit("/", 1)[0]
        scheme, rest = base.split("://", 1)
        return f"{scheme}{'+' + driver if driver else ''}://{rest}/cq_lab_{self.id}_{which}"

    def _admin(self):
        import psycopg

        return psycopg.connect(self.postgres, autocommit=True)

    def _create_databases(self) -> None:
        with contextlib.closing(self._admin()) as connection, connection.cursor() as cursor:
            for which in ("prefect", "mlflow"):
                name = f"cq_lab_{self.id}_{which}"
                cursor.execute(f'CREATE DATABASE "{name}"')
                self._databases.append(name)

    def _drop_databases(self) -> None:
        if not self._databases:
            return
        with contextlib.suppress(Exception), contextlib.closing(self._admin()) as connection, \
                connection.cursor() as cursor:
            for name in self._databases:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._databases = []

    def _take_redis_dbs(self) -> None:
        import redis

        for db in range(15, 0, -1):
            client = redis.Redis.from_url(f"{self.redis}/{db}")
            if client.dbsize() == 0 and client.set(f"cq-lab-{self.id}", "1", nx=True):
                self._redis_dbs.append(db)
                if len(self._redis_dbs) == 2:
                    return
        raise LabError(f"no two empty Redis databases at {self.redis} (1-15) for the lab")

    def _flush_redis_dbs(self) -> None:
        import redis

        for db in self._redis_dbs:
            with contextlib.suppress(Exception):
                redis.Redis.from_url(f"{self.redis}/{db}").flushdb()
        self._redis_dbs = []

    # -- the servers

    def server_env(self) -> dict[str, str]:
        """The Prefect servers' settings: compose.yaml's x-prefect environment, with this lab's addresses."""
        redis_host, redis_port = self.redis.split("://", 1)[1].split(":")
        messaging, docket = self._redis_dbs
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CQ_"))}
        env.update(
            PREFECT_HOME=str(self.root / "prefect-server"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.database_url("prefect", "asyncpg"),
            PREFECT_API_DATABASE_MIGRATE_ON_START="false",
            PREFECT_SERVER_API_AUTH_STRING=self.prefect_auth,
            PREFECT_MESSAGING_BROKER="prefect_redis.messaging",
            PREFECT_MESSAGING_CACHE="prefect_redis.messaging",
            PREFECT_SERVER_EVENTS_CAUSAL_ORDERING="prefect_redis.ordering",
            PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect_redis.lease_storage",
            PREFECT_REDIS_MESSAGING_HOST=redis_host,
            PREFECT_REDIS_MESSAGING_PORT=redis_port,
            PREFECT_REDIS_MESSAGING_DB=str(messaging),
            # prefect-redis publishes in batches of 5 or every 10 s: task runs, events and logs then reach
            # the database up to 10 s late (a loop's child waits that long for its parent task run)
            PREFECT_REDIS_MESSAGING_PUBLISHER_PUBLISH_EVERY="1",
            PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE="prefect_redis.cleanup_queue",
            PREFECT_REDIS_WORKER_CLEANUP_QUEUE_HOST=redis_host,
            PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PORT=redis_port,
            PREFECT_REDIS_WORKER_CLEANUP_QUEUE_DB=str(messaging),
            PREFECT_SERVER_DOCKET_URL=f"{self.redis}/{docket}",
            PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
            PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_API_URL=self.prefect_api_url,
        )
        return env

    def start_api(self, index: int, *, wait: bool = True) -> Proc:
        """(Re)start Prefect API server ``index`` (0 or 1) on its port."""
        argv = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.api_ports[index]),
                "--no-services"]
        self.api[index] = _spawn(f"prefect-api-{index + 1}", argv, self.server_env(), self.logs, self.root)
        if wait:
            _wait(self.api[index], lambda: _http_ok(f"{self.local_api_url(index)}/health"), 120,
                  f"Prefect API server {index + 1}")
        return self.api[index]

    def start_mlflow(self, *, wait: bool = True) -> Proc:
        """(Re)start the MLflow tracking server on PostgreSQL; it serves the artifacts itself."""
        (self.root / "mlartifacts").mkdir(parents=True, exist_ok=True)
        argv = [_bin("mlflow"), "server", "--backend-store-uri", self.database_url("mlflow"),
                "--serve-artifacts", "--artifacts-destination", str(self.root / "mlartifacts"),
                "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "2"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "CQ_"))}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.mlflow = _spawn("mlflow", argv, env, self.logs, self.root)
        if wait:
            self._wait_mlflow()
        return self.mlflow

    def _wait_mlflow(self) -> None:
        _wait(self.mlflow, lambda: _http_ok(f"http://127.0.0.1:{self.mlflow_port}/health"), 180, "MLflow")

    def haproxy_config(self) -> str:
        """compose's haproxy.cfg for this lab: its binds on the bridge, its servers on 127.0.0.1 ports."""
        text = HAPROXY_CFG.read_text()
        text = re.sub(r"\nresolvers docker\n(?:[ \t]+.*\n)+", "\n", text)
        text = text.replace(" resolvers docker", "")
        text = text.replace("bind :4200", f"bind {self.server_ip}:{self.proxy_ports['prefect']}")
        text = text.replace("bind :5000", f"bind {self.server_ip}:{self.proxy_ports['mlflow']}")
        text = text.replace("bind :8404", f"bind 127.0.0.1:{free_port()}")
        for index in range(2):
            text = text.replace(f"prefect-api-{index + 1}:4200", f"127.0.0.1:{self.api_ports[index]}")
        text = text.replace("server mlflow mlflow:5000", f"server mlflow 127.0.0.1:{self.mlflow_port}")
        for needed in (str(self.api_ports[0]), str(self.api_ports[1]), str(self.mlflow_port), self.server_ip):
            if needed not in text:
                raise LabError(f"{HAPROXY_CFG} changed shape: the lab could not rewrite it for {needed}")
        return text

    def _start_haproxy(self) -> None:
        config = self.root / "haproxy.cfg"
        config.write_text(self.haproxy_config())
        _must(tool("haproxy"), "-c", "-q", "-f", str(config))
        self.haproxy = _spawn("haproxy", [tool("haproxy"), "-db", "-f", str(config)], dict(os.environ), self.logs)

    def kill_api(self, index: int) -> None:
        """SIGKILL Prefect API server ``index``: what a crashed container or host looks like to the proxy."""
        self.api[index].kill()

    def restart_mlflow(self, down_seconds: float = 0.0) -> float:
        """Stop MLflow (SIGKILL), wait ``down_seconds``, start it again; returns the seconds it was away."""
        stopped = time.monotonic()
        self.mlflow.kill()
        time.sleep(down_seconds)
        self.start_mlflow()
        return time.monotonic() - stopped

    def restart_postgres(self, down_seconds: float = 0.0) -> float:
        """Stop this machine's PostgreSQL cluster (fast shutdown: connections cut), wait, start it again;
        returns the seconds it was away. Only for a machine of its own (CI, this lab): every user of that
        cluster sees the restart."""
        port = self.postgres.rsplit(":", 1)[1].split("/", 1)[0]
        clusters = [line.split() for line in _must("pg_lsclusters", "--no-header").splitlines()]
        cluster = next((c for c in clusters if c[2] == port), None)
        if cluster is None:
            raise LabError(f"no local PostgreSQL cluster on port {port} (pg_lsclusters): cannot restart it")
        stopped = time.monotonic()
        _must("pg_ctlcluster", cluster[0], cluster[1], "stop", "-m", "fast", timeout=120)
        time.sleep(down_seconds)
        _must("pg_ctlcluster", cluster[0], cluster[1], "start", timeout=120)
        return time.monotonic() - stopped

    # -- what the proxy saw

    def api_requests(self, since: float = 0.0) -> list[tuple[float, int, int, str]]:
        """(time, total ms, status, 'METHOD path') of each Prefect API request HAProxy logged after ``since``
        (epoch seconds); websocket upgrades (101) are left out: their time is the connection's life."""
        out = []
        pattern = re.compile(
            r"\[(\d+)/(\w+)/(\d+):(\d+):(\d+):(\d+)\.(\d+)\] prefect prefect_api/\S+ "
            r"(-?\d+)/(-?\d+)/(-?\d+)/(-?\d+)/(-?\d+) (\d+) .*?\"(\w+) (\S+)")
        months = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                                              "Nov", "Dec"), 1)}
        for line in self.haproxy.log.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if not match:
                continue
            day, month, year, hh, mm, ss, ms = match.group(1, 2, 3, 4, 5, 6, 7)
            local = time.struct_time((int(year), months[month], int(day), int(hh), int(mm), int(ss), 0, 0, -1))
            when = time.mktime(local) + int(ms) / 1000
            total, status = int(match.group(12)), int(match.group(13))
            if when >= since and status != 101 and total >= 0:
                out.append((when, total, status, f"{match.group(14)} {match.group(15).split('?')[0]}"))
        return out


# -- load ------------------------------------------------------------------------------------------

# Prints POINTS @loss points over SECONDS, then appends {name, host, gpus, start, end} to RECORDS.
LOAD_JOB = """\
import json, os, socket, sys, time
name, points, seconds, records = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
start = time.time()
for step in range(points):
    print(f"@step={step} @loss={1.0 / (step + 1):.5f}", flush=True)
    time.sleep(seconds / points)
with open(records, "a") as fh:
    fh.write(json.dumps({"name": name, "host": socket.gethostname(), "gpus": os.environ.get("CQ_GPU_IDS", ""),
                         "start": start, "end": time.time()}) + "\\n")
"""

# Runs on the submitting host: pause the pool, submit every experiment, resume it; prints one JSON line.
LOAD_SUBMIT = """\
import json, sys, time
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolUpdate
from cq_prefect.submission import submit
pool, workdir, count, points, seconds, records = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
with get_client(sync_client=True) as client:
    client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
    started = time.time()
    handles = [submit(name=f"load-{i}", workdir=workdir, pool=pool, gpu_count=1,
                      command=f"{sys.executable} job.py load-{i} {points} {seconds} {records}")
               for i in range(count)]
    queued = time.time()
    client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))
print(json.dumps({"submit_seconds": queued - started, "released": time.time(),
                  "runs": [[h.flow_run_id, h.mlflow_run_id] for h in handles]}), flush=True)
"""


@dataclass
class LoadResult:
    experiments: int
    gpus: int
    points_each: int
    seconds_each: float
    submit_seconds: float
    makespan: float  # pool released → last command's end
    ideal: float  # max(GPU-seconds / GPUs, one job): no schedule is shorter
    states: dict[str, int]
    points_missing: int
    points_duplicated: int
    double_booked: list[tuple[str, str]]
    api_p50_ms: float
    api_p95_ms: float
    api_requests: int
    api_errors: dict[int, int]
    hosts: dict[str, int]
    fault: dict = field(default_factory=dict)
    cpu_busy: float = 0.0  # share of this machine's CPU time in use while the runs ran (every host shares it)

    def lines(self) -> list[str]:
        return [
            f"{self.experiments} experiments × {self.points_each} points, {self.seconds_each:g} s each, 1 GPU each, "
            f"on {self.gpus} declared GPUs; queued in {self.submit_seconds:.1f} s (pool paused)",
            f"states: {self.states} · per host: {self.hosts}",
            f"makespan (pool released → last end) {self.makespan:.1f} s · ideal {self.ideal:.1f} s · "
            f"{self.makespan / self.ideal:.2f}x · the machine's {os.cpu_count()} cores {self.cpu_busy:.0%} busy meanwhile",
            f"MLflow: {self.experiments * self.points_each - self.points_missing} of "
            f"{self.experiments * self.points_each} points, {self.points_missing} missing, "
            f"{self.points_duplicated} duplicated · GPUs double-booked: {len(self.double_booked)}",
            f"Prefect API through the proxy during the run: {self.api_requests} requests, p50 {self.api_p50_ms:.0f} ms, "
            f"p95 {self.api_p95_ms:.0f} ms, non-2xx/3xx {self.api_errors or 'none'}",
        ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def load(lab: Lab, submitter: Host, pool: str, workdir: Path, *, experiments: int = 100, points: int = 20,
         seconds: float = 3.0, gpus: int = 16, fault=None, fault_after: int = 0, timeout: float = 900) -> LoadResult:
    """``experiments`` one-GPU runs queued at once on ``pool`` from ``submitter``, then released; waits for all.

    ``fault`` (a callable returning a dict of what it did) is called once ``fault_after`` runs have ended.
    Every number of :class:`LoadResult` is measured: states from Prefect, points from MLflow, GPU ids
    and times from what each command itself wrote, latencies from HAProxy's log.
    """
    import json

    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "job.py").write_text(LOAD_JOB)
    records = workdir / "records.jsonl"
    records.unlink(missing_ok=True)
    done = submitter.run(sys.executable, "-c", LOAD_SUBMIT, pool, str(workdir), str(experiments), str(points),
                         str(seconds), str(records), timeout=600)
    if done.returncode != 0:
        raise LabError(f"submitting the load failed: {done.stderr[-3000:]}")
    submitted = json.loads(done.stdout.strip().splitlines()[-1])
    released, runs = submitted["released"], submitted["runs"]
    api = RestApi(lab)
    ids = [flow_run_id for flow_run_id, _ in runs]
    fired: dict = {}
    deadline = time.monotonic() + timeout
    cpu_start = _cpu_times()
    while True:
        states = api.states(ids)
        ended = sum(1 for s in states.values() if s in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"))
        if fault is not None and not fired and ended >= fault_after:
            fired = fault() or {"fired": True}
        if ended == len(ids):
            break
        if time.monotonic() > deadline:
            raise LabError(f"the load did not end within {timeout:.0f} s: {_count(states.values())}")
        time.sleep(1.0)
    cpu_end = _cpu_times()
    rows = [json.loads(line) for line in records.read_text().splitlines()] if records.exists() else []
    last_end = max((r["end"] for r in rows), default=time.time())
    mlflow = MlflowClient(lab.mlflow_uri)
    missing = duplicated = 0
    for _, mlflow_run_id in runs:
        steps = [m.step for m in mlflow.get_metric_history(mlflow_run_id, "loss")]
        missing += len(set(range(points)) - set(steps))
        duplicated += len(steps) - len(set(steps))
    double = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            same = a["host"] == b["host"] and set(a["gpus"].split(",")) & set(b["gpus"].split(","))
            if same and a["start"] < b["end"] and b["start"] < a["end"]:
                double.append((a["name"], b["name"]))
    requests = lab.api_requests(since=released)
    requests = [r for r in requests if r[0] <= last_end]
    totals = [r[1] for r in requests]
    # 4xx and 5xx, but not the 422 of /api/csrf-token: Prefect's answer when CSRF protection is off
    errors = _count(r[2] for r in requests if (r[2] >= 400 and r[3] != "GET /api/csrf-token") or r[2] < 100)
    return LoadResult(
        experiments=experiments, gpus=gpus, points_each=points, seconds_each=seconds,
        submit_seconds=submitted["submit_seconds"], makespan=last_end - released,
        ideal=max(experiments * seconds / gpus, seconds), states=_count(states.values()),
        points_missing=missing, points_duplicated=duplicated, double_booked=double,
        api_p50_ms=_percentile(totals, 50), api_p95_ms=_percentile(totals, 95), api_requests=len(totals),
        api_errors=errors, hosts=_count(r["host"] for r in rows), fault=fired,
        cpu_busy=1 - (cpu_end[1] - cpu_start[1]) / max(1e-9, cpu_end[0] - cpu_start[0]),
    )


def _cpu_times() -> tuple[float, float]:
    """(all, idle + iowait) jiffies of this machine since boot (/proc/stat)."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def _count(values) -> dict[str, int]:
    return dict(sorted(collections.Counter(values).items()))


class RestApi:
    """Prefect's REST API through the proxy, with the lab's credentials."""

    def __init__(self, lab: Lab) -> None:
        import base64

        self.url = lab.prefect_api_url
        self.auth = "Basic " + base64.b64encode(lab.prefect_auth.encode()).decode()

    def post(self, path: str, body: dict | None = None):
        import json

        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body or {}).encode(), method="POST",
                                         headers={"Authorization": self.auth, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (the lab's proxy)
            return json.loads(answer.read() or b"null")

    def workers(self, pool: str) -> list[dict]:
        import urllib.error

        try:
            return self.post(f"/work_pools/{pool}/workers/filter", {})
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # no such pool (yet)
                return []
            raise

    def states(self, ids: list[str]) -> dict[str, str]:
        out = {}
        for start in range(0, len(ids), 200):
            for run in self.post("/flow_runs/filter", {"flow_runs": {"id": {"any_": ids[start:start + 200]}},
                                                       "limit": 200}):
                out[run["id"]] = (run.get("state") or {}).get("type", "SCHEDULED")
        return out
