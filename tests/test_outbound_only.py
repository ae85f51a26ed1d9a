"""Outbound only, proven: a worker that no one can connect to still runs an experiment end to end.

The worker runs in a network namespace whose firewall drops every inbound new connection. Its one link
is a veth pair on a link-local /30 (host .1, namespace .2) with no default route, no NAT and no change to
the host's own firewall or forwarding. The session's Prefect and MLflow servers listen on the host's
127.0.0.1 only; a small TCP forwarder in this test makes them reachable at the host's end of the link.
If the worker needed an inbound port, or reached for any address but the link's, the run would fail.

Needs root (CAP_NET_ADMIN), `ip netns`, and nft or iptables; skips, naming the missing piece, without.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import CQ, PYTHON, pid_alive, wait_for, write_script

SYSTEM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


def _tool(name: str) -> str | None:
    return shutil.which(name, path=SYSTEM_PATH)


def _run(*argv: str, stdin: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)


def _must(*argv: str, stdin: str | None = None) -> str:
    done = _run(*argv, stdin=stdin)
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}"
    return done.stdout


def _missing_capability() -> str | None:
    """Why this machine cannot run the test (checked at collection, before the session's stack starts)."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create a network namespace and a veth pair"
    ip = _tool("ip")
    if ip is None or _run(ip, "netns", "list").returncode != 0:
        return "no `ip netns` on this machine (install iproute2)"
    if _tool("nft") is None and _tool("iptables") is None:
        return "neither nft nor iptables is installed: no way to firewall the namespace"
    return None


MISSING_CAPABILITY = _missing_capability()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(MISSING_CAPABILITY is not None, reason=MISSING_CAPABILITY or "")]

# MLflow's server answers 403 to a Host header outside localhost and the private ranges; a remote worker
# knows it by an address of its own (here 169.254.x.1). tests/conftest.py sets CQ_MLFLOW_ALLOWED_HOSTS,
# which `cq up` adds to MLflow's defaults, before the session's stack starts.

FIREWALL_TABLE = "cq_outbound_only"
NFT_RULESET = f"""
table inet {FIREWALL_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
    }}
}}
"""

# Runs inside the namespace. Listens on the namespace's link address (the target of the inbound check)
# and, as canaries, on the namespace's own 127.0.0.1 at the servers' ports: anything in the namespace that
# used the host-style loopback URLs instead of the link would land there. Logs every accepted connection.
PROBE = """
import json, select, socket, sys
link_ip, canary_ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
target = socket.create_server((link_ip, 0))
canaries = [socket.create_server(("127.0.0.1", port)) for port in canary_ports]
print(json.dumps({"listening": target.getsockname()[1]}), flush=True)
while True:
    for server in select.select([target, *canaries], [], [])[0]:
        conn, peer = server.accept()
        print(json.dumps({"accepted": list(server.getsockname()), "peer": list(peer)}), flush=True)
        conn.close()
"""

# Runs inside the namespace: tries to connect to each HOST:PORT and prints {target: "connected" | errno}.
CONNECT = """
import errno, json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    sock = socket.socket()
    sock.settimeout(3)
    try:
        sock.connect((host, int(port)))
        out[target] = "connected"
    except socket.timeout:
        out[target] = "timeout"
    except OSError as exc:
        out[target] = errno.errorcode.get(exc.errno, str(exc))
    finally:
        sock.close()
print(json.dumps(out))
"""

TRAIN = """
import os
print("netns", os.readlink("/proc/self/ns/net"), flush=True)
print("tracking", os.environ["MLFLOW_TRACKING_URI"], flush=True)
for i in range(5):
    print(f"epoch {i} @step={10 * i} @loss={1.0 / (i + 1):.4f}", flush=True)
print("done", flush=True)
"""


def _connect_from_host(ip: str, port: int, timeout: float = 1.5) -> str:
    """'connected', 'timeout' or the errno name of a connect from the host to ip:port."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))


def _require_mlflow_accepts_host(tracking_uri: str, host: str) -> None:
    """Fail early, naming the fix, when the MLflow server would refuse requests addressed to ``host``."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 (the session's server)
            return
    except urllib.error.HTTPError as exc:
        assert exc.code != 403, (
            f"the session's MLflow server refuses Host {host} ({exc.read().decode(errors='replace')}); it must "
            "start with MLFLOW_SERVER_ALLOWED_HOSTS covering 169.254.* (this module sets it at import)"
        )


# -- the namespace ---------------------------------------------------------------------------------


@dataclass
class Namespace:
    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    net: str  # the link's /30
    ip: str  # path of the ip tool

    def exec_argv(self, *argv: str) -> list[str]:
        return [self.ip, "netns", "exec", self.name, *argv]

    def run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return _run(*self.exec_argv(*argv), stdin=stdin)

    def pids(self) -> list[int]:
        done = _run(self.ip, "netns", "pids", self.name)
        return [int(pid) for pid in done.stdout.split()] if done.returncode == 0 else []

    @property
    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino


def _free_link_net() -> ipaddress.IPv4Network:
    """A link-local /30 that no host address sits in and no specific host route covers."""
    ip = _tool("ip")
    addresses = [ipaddress.ip_interface(line.split()[3]) for line in _must(ip, "-4", "-o", "addr", "show").splitlines()]
    routes = []
    for line in _must(ip, "-4", "route", "show", "table", "all").splitlines():
        words = line.split()
        route_types = ("local", "broadcast", "unicast", "unreachable", "blackhole", "prohibit")
        dest = words[1] if words[0] in route_types else words[0]
        with contextlib.suppress(ValueError):
            routes.append(ipaddress.ip_network(dest, strict=False))
    for third in range(77, 255):
        candidate = ipaddress.ip_network(f"169.254.{third}.0/30")
        if any(a.ip in candidate for a in addresses):
            continue
        if any(r.prefixlen >= 24 and r.overlaps(candidate) for r in routes):
            continue
        return candidate
    pytest.skip("no free link-local /30 in 169.254.77.0–169.254.254.0 on this host")


@pytest.fixture
def namespace():
    """A network namespace joined to the host by one veth pair on a link-local /30; removed afterwards."""
    ip = _tool("ip")
    net = _free_link_net()
    host_ip, ns_ip = (str(a) for a in net.hosts())
    pid = os.getpid()  # interface names have at most 15 characters
    ns = Namespace(f"cqtest-{pid}", f"cqh{pid}", f"cqn{pid}", host_ip, ns_ip, str(net), ip)
    added = _run(ip, "netns", "add", ns.name)
    if added.returncode != 0:
        pytest.skip(f"the kernel refuses a network namespace (`ip netns add`: {added.stderr.strip()})")
    try:
        veth = _run(ip, "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
        if veth.returncode != 0:
            pytest.skip(f"the kernel refuses a veth pair (`ip link add … type veth`: {veth.stderr.strip()})")
        _must(ip, "link", "set", ns.ns_if, "netns", ns.name)
        _must(ip, "addr", "add", f"{host_ip}/30", "dev", ns.host_if)
        _must(ip, "link", "set", ns.host_if, "up")
        # IPv4 on the link only: no IPv6 link-local path around the firewall's view of the test.
        ns.run("sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6")
        _must(*ns.exec_argv(ip, "addr", "add", f"{ns_ip}/30", "dev", ns.ns_if))
        _must(*ns.exec_argv(ip, "link", "set", "lo", "up"))
        _must(*ns.exec_argv(ip, "link", "set", ns.ns_if, "up"))
        yield ns
    finally:
        _kill_all(ns)
        _run(ip, "link", "del", ns.host_if)
        _run(ip, "netns", "del", ns.name)


def _kill_all(ns: Namespace, grace: float = 5.0) -> None:
    """SIGTERM every process in the namespace, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = ns.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in ns.pids()):
            time.sleep(0.1)


def _install_inbound_drop(ns: Namespace) -> str:
    """Inside the namespace: accept loopback and established/related, drop every other inbound packet.

    nftables first, iptables as the fallback; returns the installed rules as the tool lists them.
    """
    problems = []
    nft = _tool("nft")
    if nft:
        done = ns.run(nft, "-f", "-", stdin=NFT_RULESET)
        if done.returncode == 0:
            return _must(*ns.exec_argv(nft, "list", "table", "inet", FIREWALL_TABLE))
        problems.append(f"nft: {done.stderr.strip()}")
    iptables = _tool("iptables")
    if iptables:
        rules = [["-A", "INPUT", "-i", "lo", "-j", "ACCEPT"],
                 ["-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
                 ["-P", "INPUT", "DROP"]]
        failed = next((d for d in (ns.run(iptables, *rule) for rule in rules) if d.returncode != 0), None)
        if failed is None:
            ip6tables = _tool("ip6tables")  # IPv6 is off in the namespace; these are a second belt only
            for rule in rules if ip6tables else []:
                ns.run(ip6tables, *rule)
            return _must(*ns.exec_argv(iptables, "-S", "INPUT"))
        problems.append(f"iptables: {failed.stderr.strip()}")
    pytest.skip("the kernel refuses a firewall inside the namespace (" + "; ".join(problems) + ")")


# -- processes in the namespace ---------------------------------------------------------------------


@dataclass
class NsProcess:
    process: subprocess.Popen
    log: Path

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines()[-count:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM its process group, wait, SIGKILL; reaps it."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


@pytest.fixture
def spawn_in(namespace, tmp_path):
    """Start a process inside the namespace in its own process group; every one is stopped afterwards."""
    started: list[NsProcess] = []

    def spawn(name: str, *argv: str, env: dict[str, str] | None = None) -> NsProcess:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                namespace.exec_argv(*argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        started.append(NsProcess(process, log))
        return started[-1]

    yield spawn
    for proc in reversed(started):
        proc.stop()


# -- the forwarder ---------------------------------------------------------------------------------


@dataclass
class TcpForwarder:
    """Listens on listen_ip:port and relays each connection to 127.0.0.1:port; remembers the peers."""

    listen_ip: str
    port: int
    peers: list[str] = field(default_factory=list)
    _conns: set = field(default_factory=set)
    _threads: list = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> TcpForwarder:
        self._server = socket.create_server((self.listen_ip, self.port))
        self._server.settimeout(0.2)  # so the accept loop sees _stop
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, peer = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            self._spawn(self._relay, client)

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._conns.update((client, upstream))
        back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        back.start()
        self._pipe(client, upstream)
        back.join()
        for sock in (client, upstream):
            self._conns.discard(sock)
            sock.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        for sock in list(self._conns):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        self._server.close()


@pytest.fixture
def forwarders(stack, namespace):
    """The host end of the link forwards the Prefect and MLflow ports to the servers on 127.0.0.1."""
    ports = {"prefect": urlparse(stack.prefect_api_url).port, "mlflow": urlparse(stack.mlflow_tracking_uri).port}
    started = {}
    try:
        for name, port in ports.items():
            started[name] = TcpForwarder(namespace.host_ip, port).start()
        yield started
    finally:
        for forwarder in started.values():
            forwarder.close()


# -- the test --------------------------------------------------------------------------------------


def test_worker_behind_a_firewall_that_drops_inbound_runs_an_experiment(
    stack, namespace, forwarders, spawn_in, workdir, tmp_path, mlflow_client, prefect_client
):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.exceptions import ObjectNotFound

    import cq_prefect

    ns = namespace
    prefect_port, mlflow_port = forwarders["prefect"].port, forwarders["mlflow"].port
    _require_mlflow_accepts_host(stack.mlflow_tracking_uri, f"{ns.host_ip}:{mlflow_port}")

    # The namespace's only route is the link: no default route, so nothing else is reachable.
    routes = _must(*ns.exec_argv(ns.ip, "-4", "route", "show")).strip().splitlines()
    assert len(routes) == 1 and routes[0].startswith(f"{ns.net} dev {ns.ns_if}"), routes

    probe = spawn_in("probe", PYTHON, "-c", PROBE, ns.ns_ip, str(prefect_port), str(mlflow_port))
    events = lambda: [json.loads(line) for line in probe.lines() if line.startswith("{")]  # noqa: E731

    def listening_port() -> int | None:
        if probe.process.poll() is not None:
            pytest.fail(f"the probe in the namespace exited:\n{probe.tail()}")
        return next((e["listening"] for e in events() if "listening" in e), None)

    listening = wait_for(listening_port, timeout=20, what="the listener in the namespace")

    # Control: before the firewall the listener in the namespace takes a connection from the host.
    assert _connect_from_host(ns.ns_ip, listening) == "connected"
    wait_for(lambda: len([e for e in events() if "accepted" in e]) == 1, timeout=5, what="the control connection")

    ruleset = _install_inbound_drop(ns)
    assert "drop" in ruleset.lower(), ruleset

    # Inbound is now dropped: the same connect times out and the listener never sees it.
    assert _connect_from_host(ns.ns_ip, listening) == "timeout"

    # Outbound: the host's end of the link answers; any other host address has no route.
    others = [line.split()[3].split("/")[0] for line in _must(_tool("ip"), "-4", "-o", "addr", "show").splitlines()
              if not line.split()[3].startswith(("127.", ns.host_ip + "/"))]
    targets = [f"{ns.host_ip}:{prefect_port}", *(f"{addr}:{prefect_port}" for addr in others), "1.1.1.1:443"]
    reach = json.loads(_must(*ns.exec_argv(PYTHON, "-c", CONNECT, *targets)))
    assert reach.pop(f"{ns.host_ip}:{prefect_port}") == "connected"
    assert reach and set(reach.values()) == {"ENETUNREACH"}, reach

    # The worker, inside the namespace, knows the servers only by the link address.
    api_url, tracking_uri = f"http://{ns.host_ip}:{prefect_port}/api", f"http://{ns.host_ip}:{mlflow_port}"
    pool = f"outbound-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CQ_PREFECT_PORT", "CQ_MLFLOW_PORT", "CQ_POOL") and "proxy" not in k.lower()}
    env.update(
        PREFECT_API_URL=api_url, MLFLOW_TRACKING_URI=tracking_uri, CQ_HOME=str(tmp_path / "ns-cq-home"),
        PREFECT_HOME=str(tmp_path / "ns-prefect-home"), PREFECT_WORKER_QUERY_SECONDS="1",
    )
    worker = spawn_in("worker", CQ, "worker", "start", "--pool", pool, env=env)

    def worker_online() -> bool:
        if worker.process.poll() is not None:
            pytest.fail(f"the worker in the namespace exited ({worker.process.returncode}):\n{worker.tail()}")
        try:
            prefect_client.read_work_pool(pool)  # the worker creates it
        except ObjectNotFound:
            return False
        workers = prefect_client.read_workers_for_work_pool(pool)
        return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)

    wait_for(worker_online, timeout=45, interval=0.5, what=f"the namespace's worker to poll pool {pool}")

    write_script(workdir, "train.py", TRAIN)
    handle = cq_prefect.submit(name="outbound-only", workdir=str(workdir), command=f"{PYTHON} train.py", pool=pool)
    result = handle.wait(timeout=60)
    assert result.outcome == "success", f"{result.message}\nworker log:\n{worker.tail()}"

    # Every point reached MLflow, through the link.
    history = [(m.step, m.value) for m in sorted(mlflow_client.get_metric_history(handle.mlflow_run_id, "loss"),
                                                 key=lambda m: m.step)]
    assert history == [(0, 1.0), (10, 0.5), (20, 0.3333), (30, 0.25), (40, 0.2)]
    run = mlflow_client.get_run(handle.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cq.prefect.flow_run_url"].startswith(f"http://{ns.host_ip}:{prefect_port}/")

    # Every line reached the Prefect run log; the command ran in the namespace with the link's MLflow URL.
    flow_run = prefect_client.read_flow_run(uuid.UUID(handle.flow_run_id))
    assert flow_run.work_pool_name == pool
    logs = prefect_client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(handle.flow_run_id)])), limit=200
    )
    text = "\n".join(log.message for log in logs)
    epochs = [f"epoch {i} @step={10 * i} @loss={1.0 / (i + 1):.4f}" for i in range(5)]
    for line in (f"netns net:[{ns.inode}]", f"tracking {tracking_uri}", *epochs, "done"):
        assert line in text, f"{line!r} missing from the run log:\n{text}"
    assert f"net:[{os.stat('/proc/self/ns/net').st_ino}]" not in text  # not the host's namespace

    # Both servers were reached only from the namespace's link address, never via its own loopback.
    assert forwarders["prefect"].peers and set(forwarders["prefect"].peers) == {ns.ns_ip}
    assert forwarders["mlflow"].peers and set(forwarders["mlflow"].peers) == {ns.ns_ip}
    accepted = [e for e in events() if "accepted" in e]
    assert len(accepted) == 1 and accepted[0]["accepted"][0] == ns.ns_ip, accepted  # only the control…
    assert accepted[0]["peer"][0] == ns.host_ip  # …which came over the link

    # Stopping the worker leaves nothing running in the namespace.
    worker.stop()
    probe.stop()
    wait_for(lambda: not ns.pids(), timeout=10, what="every process in the namespace to end")
