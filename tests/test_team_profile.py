"""deployments/team/: the team profile's server side (Docker Compose) and worker side (systemd unit, image).

No Docker Hub here, so nothing is started: Compose itself resolves and validates the file with the
placeholders of ``.env.example`` (``docker compose config``, or ``docker-compose config`` 1.29), and the
resolved topology is checked — PostgreSQL and Redis, two Prefect API servers without services on one
database, one services process, Prefect's Redis settings on every Prefect container (their names checked
against the installed Prefect's own settings), MLflow on PostgreSQL with basic auth and served artifacts,
the proxy in front, healthchecks, named volumes, ports on 127.0.0.1 — and that compose.yaml holds no secret.
The systemd unit goes through ``systemd-analyze verify`` where it exists; HAProxy's config through
``haproxy -c`` where it exists. CI installs docker-compose (.ci/run): there a missing one fails the test.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEAM = ROOT / "deployments" / "team"
COMPOSE = TEAM / "compose.yaml"
ENV_EXAMPLE = TEAM / ".env.example"
UNIT = TEAM / "worker" / "cq-worker.service"
WORKER_ENV = TEAM / "worker" / "worker.env.example"
DOCS = ROOT / "docs" / "team.md"

PREFECT_CONTAINERS = ("prefect-migrate", "prefect-api-1", "prefect-api-2", "prefect-services")
API_SERVERS = ("prefect-api-1", "prefect-api-2")
# What several Prefect server processes need instead of per-process memory (prefect/cli/_server_utils.py).
REDIS_SETTINGS = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
    "PREFECT_REDIS_MESSAGING_HOST": "redis",
    "PREFECT_REDIS_MESSAGING_PORT": "6379",
    "PREFECT_REDIS_MESSAGING_DB": "0",
}
SECRETS = ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "CQ_PREFECT_AUTH",
           "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY")


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as Compose's --env-file, systemd's EnvironmentFile= and docker's --env-file read them."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) where it works, else ``docker-compose`` (1.29), else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_compose(compose: list[str], env_path: Path, *args: str) -> subprocess.CompletedProcess:
    # A clean environment: Compose lets the shell's variables win over the env file, and this process
    # may well have CQ_PREFECT_AUTH or POSTGRES_PASSWORD set.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*compose, "-f", str(COMPOSE), "--env-file", str(env_path), *args],
                          capture_output=True, text=True, timeout=60, env=env, cwd=TEAM)


@pytest.fixture(scope="module")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        message = "Docker Compose is needed to check deployments/team/compose.yaml: apt-get install docker-compose"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it (.ci/run): the check is never skipped there
        pytest.skip(message)
    return command


@pytest.fixture(scope="module")
def config(compose) -> dict:
    """The file as Compose resolves it with .env.example's placeholders."""
    done = run_compose(compose, ENV_EXAMPLE, "config")
    assert done.returncode == 0, f"{' '.join(compose)} config failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return yaml.safe_load(done.stdout)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    value = service.get("command") or []
    return value.split() if isinstance(value, str) else [str(part) for part in value]


def depends(service: dict) -> dict[str, str]:
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port, short syntax (1.29) or long (v2)."""
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.append((str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            ip = parts[0] if len(parts) == 3 else ""
            ports.append((ip, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return ports


# -- the server side ----------------------------------------------------------------------------------


def test_compose_config_resolves_with_the_example_env_file(config):
    services = config["services"]
    assert set(services) == {"postgres", "redis", "prefect-migrate", "prefect-api-1", "prefect-api-2",
                             "prefect-services", "mlflow", "proxy"}
    example = env_file(ENV_EXAMPLE)
    # the placeholders went in where the file refers to them
    assert environment(services["prefect-api-1"])["PREFECT_SERVER_API_AUTH_STRING"] == example["CQ_PREFECT_AUTH"]
    assert environment(services["mlflow"])["MLFLOW_AUTH_ADMIN_PASSWORD"] == example["MLFLOW_ADMIN_PASSWORD"]
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]


def test_a_missing_secret_stops_compose_naming_it(compose, tmp_path):
    partial = tmp_path / "partial.env"
    partial.write_text("".join(f"{k}={v}\n" for k, v in env_file(ENV_EXAMPLE).items() if k != "CQ_PREFECT_AUTH"))
    done = run_compose(compose, partial, "config")
    assert done.returncode != 0
    assert "CQ_PREFECT_AUTH" in done.stdout + done.stderr


def test_two_prefect_api_servers_without_services_and_one_services_process_share_one_database(config):
    services = config["services"]
    urls = {name: environment(services[name])["PREFECT_API_DATABASE_CONNECTION_URL"] for name in PREFECT_CONTAINERS}
    assert len(set(urls.values())) == 1, urls
    url = next(iter(urls.values()))
    assert url.startswith("postgresql+asyncpg://prefect:") and url.endswith("@postgres:5432/prefect"), url
    for name in API_SERVERS:
        argv = command(services[name])
        assert argv[:3] == ["prefect", "server", "start"] and "--no-services" in argv, argv
        assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "4200"
        # migrations run once, by prefect-migrate, not by two servers at once
        assert environment(services[name])["PREFECT_API_DATABASE_MIGRATE_ON_START"].lower() == "false"
        assert depends(services[name]) == {"postgres": "service_healthy", "redis": "service_healthy",
                                           "prefect-migrate": "service_completed_successfully"}
        assert "/api/health" in " ".join(services[name]["healthcheck"]["test"])
    assert command(services["prefect-services"]) == ["prefect", "server", "services", "start"]
    assert depends(services["prefect-services"]) == depends(services["prefect-api-1"])
    assert command(services["prefect-migrate"]) == ["prefect", "server", "database", "upgrade", "-y"]
    assert services["prefect-migrate"]["restart"] == "no"
    assert depends(services["prefect-migrate"]) == {"postgres": "service_healthy"}
    images = {services[name]["image"] for name in PREFECT_CONTAINERS}
    assert len(images) == 1 and next(iter(images)).startswith("prefecthq/prefect:")


def test_every_prefect_container_uses_redis_and_the_same_credentials(config):
    services = config["services"]
    example = env_file(ENV_EXAMPLE)
    for name in PREFECT_CONTAINERS:
        env = environment(services[name])
        for key, value in REDIS_SETTINGS.items():
            assert env.get(key) == value, (name, key, env.get(key))
        assert env["PREFECT_SERVER_DOCKET_URL"].startswith("redis://redis:6379/")
        assert re.search(r"(^|\s)prefect-redis==", env["EXTRA_PIP_PACKAGES"]), env["EXTRA_PIP_PACKAGES"]
        assert env["PREFECT_SERVER_API_AUTH_STRING"] == example["CQ_PREFECT_AUTH"]
        assert env["PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED"] == "true"  # cq watch streams live logs


def test_the_prefect_setting_names_are_prefects_own(config, tmp_path):
    """Prefect ignores a misspelt variable; the installed Prefect must read every one to the value given."""
    env = environment(config["services"]["prefect-api-1"])
    probe = {k: v for k, v in env.items() if k.startswith("PREFECT_") and not k.startswith("PREFECT_REDIS_")}
    script = """
import json
from prefect.settings import get_current_settings
s = get_current_settings().server
print(json.dumps({
    "PREFECT_API_DATABASE_CONNECTION_URL": s.database.connection_url.get_secret_value(),
    "PREFECT_API_DATABASE_MIGRATE_ON_START": str(s.database.migrate_on_start).lower(),
    "PREFECT_SERVER_API_AUTH_STRING": s.api.auth_string.get_secret_value(),
    "PREFECT_MESSAGING_BROKER": s.events.messaging_broker,
    "PREFECT_MESSAGING_CACHE": s.events.messaging_cache,
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": s.events.causal_ordering,
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": s.concurrency.lease_storage,
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": s.worker_channel.cleanup_queue_storage,
    "PREFECT_SERVER_DOCKET_URL": s.docket.url,
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": str(s.logs.stream_out_enabled).lower(),
    "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": str(s.logs.stream_publishing_enabled).lower(),
    "PREFECT_SERVER_ANALYTICS_ENABLED": str(s.analytics_enabled).lower(),
    "PREFECT_UI_API_URL": s.ui.api_url,
}))
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    clean.update(probe, PREFECT_HOME=str(tmp_path / "prefect-home"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean)
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(read) == set(probe), set(probe) ^ set(read)  # every variable given is one checked here
    assert read == probe


def test_mlflow_runs_on_postgres_with_basic_auth_and_serves_the_artifacts(config):
    mlflow = config["services"]["mlflow"]
    argv = command(mlflow)
    assert argv[:2] == ["mlflow", "server"]
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert "--serve-artifacts" in argv
    destination = argv[argv.index("--artifacts-destination") + 1]
    env = environment(mlflow)
    # --backend-store-uri through its variable (MLflow's click option reads MLFLOW_BACKEND_STORE_URI)
    assert re.fullmatch(r"postgresql://mlflow:[^@]+@postgres:5432/mlflow", env["MLFLOW_BACKEND_STORE_URI"])
    assert re.fullmatch(r"postgresql://mlflow:[^@]+@postgres:5432/mlflow_auth", env["MLFLOW_AUTH_DATABASE_URI"])
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] and len(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]  # one CSRF key for all of MLflow's worker processes
    assert "localhost" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")  # its healthchecks use it
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in mlflow["volumes"]]
    assert any(m.startswith("mlflow-artifacts:") and m.split(":")[1] == destination for m in mounts), mounts
    assert depends(mlflow) == {"postgres": "service_healthy"}
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    # the image's CMD is the same command (compose.yaml spells it out so the topology reads in one file)
    dockerfile = (TEAM / "mlflow" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*?\])", dockerfile, re.S | re.M).group(1).replace("\\\n", ""))
    assert cmd == argv


def test_mlflow_entrypoint_writes_a_private_auth_config(tmp_path):
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path),
           "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:pw_-9@postgres:5432/mlflow_auth",
           "MLFLOW_AUTH_ADMIN_USERNAME": "cq"}
    show = 'ls -l "$MLFLOW_AUTH_CONFIG_PATH" && cat "$MLFLOW_AUTH_CONFIG_PATH"'
    done = subprocess.run(["sh", str(TEAM / "mlflow" / "mlflow-entrypoint.sh"), "sh", "-c", show],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    listing, _, text = done.stdout.partition("\n")
    assert listing.startswith("-rw-------")
    parser = configparser.ConfigParser()  # MLflow reads it with configparser (interpolation on)
    parser.read_string(text)
    assert dict(parser["mlflow"]) == {
        "default_permission": "READ", "database_uri": env["MLFLOW_AUTH_DATABASE_URI"], "admin_username": "cq",
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    missing = subprocess.run(["sh", str(TEAM / "mlflow" / "mlflow-entrypoint.sh"), "true"], capture_output=True,
                             text=True, timeout=30, env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)})
    assert missing.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in missing.stderr


def test_only_the_proxy_publishes_ports_on_localhost_in_front_of_both_api_servers(config):
    services = config["services"]
    for name, service in services.items():
        if name != "proxy":
            assert not service.get("ports"), f"{name} publishes ports; only the proxy should"
    ports = published(services["proxy"])
    assert sorted((ip, target) for ip, _, target in ports) == [("127.0.0.1", "4200"), ("127.0.0.1", "5000")], ports
    assert COMPOSE.read_text().count("${PROXY_BIND_ADDRESS:-127.0.0.1}:") == 2  # also without .env's value
    assert services["proxy"]["image"].startswith("haproxy:")
    assert any("haproxy.cfg" in str(v) for v in services["proxy"]["volumes"])
    cfg = (TEAM / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server\s+\S+\s+(\S+)", cfg, re.M)
    assert servers == ["prefect-api-1:4200", "prefect-api-2:4200", "mlflow:5000"]
    assert "uri /api/health" in cfg and "check" in cfg


def test_haproxy_accepts_its_config(tmp_path):
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed here (apt-get install haproxy); the image haproxy:3.0-alpine reads it")
    done = subprocess.run([haproxy, "-c", "-f", str(TEAM / "haproxy" / "haproxy.cfg")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[ALERT]" not in done.stdout + done.stderr


def test_healthchecks_and_named_volumes(config):
    services = config["services"]
    for name in ("postgres", "redis", "prefect-api-1", "prefect-api-2", "mlflow", "proxy"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert {"postgres-data", "redis-data", "mlflow-artifacts"} <= set(config["volumes"])
    assert any(str(v).startswith("postgres-data:/var/lib/postgresql/data") or
               (isinstance(v, dict) and v.get("source") == "postgres-data") for v in services["postgres"]["volumes"])
    assert any("init-databases.sh" in str(v) for v in services["postgres"]["volumes"])
    for name, service in services.items():
        if name != "prefect-migrate":
            assert service.get("restart") == "unless-stopped", name


def test_compose_file_holds_no_secret_only_references():
    text = COMPOSE.read_text()
    raw = yaml.safe_load(text)
    example = env_file(ENV_EXAMPLE)
    for name in SECRETS:
        assert re.search(r"\$\{" + name + r":\?[^}]+\}", text), f"compose.yaml should require ${{{name}:?…}}"
        assert example[name] not in text
    assert "CHANGE-ME" not in text

    def walk(value, path=""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from walk(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from walk(item, f"{path}[{index}]")
        else:
            yield path, str(value)

    reference = r"\$\{[A-Z_]+(:\?[^}]*)?\}"
    urls_with_password = set()
    for path, value in walk(raw):
        key = path.rsplit(".", 1)[-1]
        if re.search(r"PASSWORD|SECRET|AUTH_STRING", key):
            assert re.fullmatch(reference, value), f"{path} = {value!r} is not a ${{VAR}} reference"
        for password in re.findall(r"://[^/:@\s]+:(\$\{[^}]*\}|[^@\s]*)@", value):  # USER:PASSWORD@ in a URL
            assert re.fullmatch(reference, password), f"{path} has a password in a URL: {value!r}"
            urls_with_password.add(value)
    assert len(urls_with_password) == 3  # Prefect's database URL, MLflow's tracking and auth database URLs
    ignored = subprocess.run(["git", "check-ignore", "-q", str(TEAM / ".env")], cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, "deployments/team/.env must be ignored by git"


def test_example_credentials_are_well_formed():
    from cq_prefect import auth

    example = env_file(ENV_EXAMPLE)
    auth.parse(example["CQ_PREFECT_AUTH"], "CQ_PREFECT_AUTH")
    admin = f"{example['MLFLOW_ADMIN_USER']}:{example['MLFLOW_ADMIN_PASSWORD']}"
    auth.parse(admin, "CQ_MLFLOW_AUTH", min_password=auth.MLFLOW_MIN_PASSWORD)
    for name in SECRETS:  # URL-safe: the database passwords go into URLs, MLflow's into an ini file
        assert re.fullmatch(r"[A-Za-z0-9_:-]+", example[name]), name


# -- the worker side ----------------------------------------------------------------------------------


def unit_keys() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_worker_unit_runs_cq_worker_as_a_service_user():
    keys = unit_keys()
    service = {k: v[-1] for k, v in keys["Service"].items()}
    assert service["ExecStart"].split() == ["/opt/cq/bin/cq", "worker", "start", "--pool", "gpu", "--gpus", "auto"]
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"] == "2"  # bad input: cq exits 2, a restart cannot mend it
    assert service["EnvironmentFile"] == "/etc/cq/worker.env"
    assert service["User"] not in ("root", "0") and service["User"] == "cq"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    # Prefect's worker gives each run's process 30 s, then the supervisor CQ_KILL_GRACE_SECONDS (10)
    assert int(service["TimeoutStopSec"]) >= 30 + 10
    assert service["Environment"] == "CQ_HOME=/var/lib/cq" and service["StateDirectory"] == "cq"
    assert keys["Unit"]["After"] == ["network-online.target"] and keys["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_accepts_the_worker_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the unit's keys are checked by the test above")
    # verify wants ExecStart's program to exist: the same unit, pointing at a stand-in for /opt/cq/bin/cq
    stand_in = tmp_path / "cq"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "cq-worker.service"
    unit.write_text(UNIT.read_text().replace("/opt/cq/bin/cq", str(stand_in)))
    done = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # unknown keys and bad values are only warned about: there must be none
    assert (done.stdout + done.stderr).strip() == ""


def test_worker_env_example_names_the_servers_and_valid_credentials():
    from cq_prefect import auth

    env = env_file(WORKER_ENV)
    assert env["PREFECT_API_URL"].endswith("/api") and env["MLFLOW_TRACKING_URI"].startswith("http")
    assert auth.prefect_credentials(env) and auth.mlflow_credentials(env)
    assert not any(value.startswith(("'", '"')) for value in env.values())  # docker --env-file keeps quotes


def test_versions_agree_between_the_servers_and_the_worker_image():
    compose = COMPOSE.read_text()
    worker = (TEAM / "worker" / "Dockerfile").read_text()
    mlflow = (TEAM / "mlflow" / "Dockerfile").read_text()
    prefect_version = re.search(r"prefecthq/prefect:(\d+\.\d+\.\d+)-", compose).group(1)
    mlflow_version = re.search(r"ARG MLFLOW_VERSION=(\S+)", mlflow).group(1)
    assert re.search(r"ARG PREFECT_VERSION=(\S+)", worker).group(1) == prefect_version
    assert re.search(r"ARG MLFLOW_VERSION=(\S+)", worker).group(1) == mlflow_version
    assert f"image: cq-team-mlflow:{mlflow_version}" in compose
    assert '"cq", "worker", "start", "--pool", "gpu", "--gpus", "auto"' in worker
    docs = DOCS.read_text()
    assert f'"prefect=={prefect_version}" "mlflow[auth]=={mlflow_version}"' in docs  # the GPU host's install


# -- the docs -----------------------------------------------------------------------------------------


def test_team_docs_cover_install_hosts_rotation_backups_and_failures():
    docs = DOCS.read_text()
    headings = re.findall(r"^#+ (.+)$", docs, re.M)
    for heading in ("Installing the server side", "Adding a GPU host", "Rotating credentials", "Backing up",
                    "When something fails"):
        assert heading in headings, heading
    install = docs[docs.index("## Adding a GPU host"):]
    block = install[install.index("```bash") + 8:install.index("```", install.index("```bash") + 8)]
    assert len([line for line in block.splitlines() if line.strip()]) == 3  # "a GPU host in three commands"
    assert "worker.env" in block and "cq-worker.service" in block
    failures = docs[docs.index("## When something fails"):]
    for fault in ("cut off from the network for 60 s", "Prefect API servers killed", "PostgreSQL restarted",
                  "MLflow restarted", "parent killed, and the loop resumed elsewhere"):
        assert fault in failures, fault
    # each fault's paragraph quotes what its test in tests/test_team_hosts.py measured
    assert "tests/test_team_hosts.py" in failures and failures.count("*Measured:*") == 5
    for topic in ("docker compose up -d", "pg_dump", "CQ_PREFECT_AUTH", "update-password", "\\password"):
        assert topic in docs, topic
