"""Auth on both servers (CQ_PREFECT_AUTH, CQ_MLFLOW_AUTH): refusals, a run end to end, no secret anywhere.

The e2e tests use one stack of their own with auth on (own CQ_HOME and ports), started once for the module
with `cq up` and driven only through `cq` processes and plain HTTP, so the session's stack and this
process's Prefect settings stay as they are. The others need no server: parsing, the clients' variables,
refusals as one sentence, rotation of the embedded MLflow's admin.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_port, run_cq, write_script
from cq_prefect import auth
from cq_prefect.errors import AuthRefused, BadInput

AUTH_VARS = ("CQ_PREFECT_AUTH", "CQ_MLFLOW_AUTH", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _isolated_env(home: Path, **extra: str) -> dict[str, str]:
    """A user with no stack yet: own CQ_HOME and ports, no server URLs, no credentials but ``extra``."""
    drop = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CQ_PREFECT_DATABASE_URL", *AUTH_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(CQ_HOME=str(home / "cqhome"), PREFECT_HOME=str(home / "prefect-client"),
               CQ_PREFECT_PORT=str(free_port()), CQ_MLFLOW_PORT=str(free_port()))
    env.update(extra)
    return env


def _http(method: str, url: str, body: dict | None = None, auth: str | None = None) -> tuple[int, object]:
    """(status, JSON or text) of one request; ``auth`` is ``USER:PASSWORD`` for basic auth."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def auth_stack():
    folder = Path(tempfile.mkdtemp(prefix="cq-auth-"))
    prefect = f"cq-prefect:{secrets.token_urlsafe(18)}"
    mlflow = f"cq-mlflow:{secrets.token_urlsafe(18)}"
    env = _isolated_env(folder, CQ_PREFECT_AUTH=prefect, CQ_MLFLOW_AUTH=mlflow, CQ_POOL="local")
    try:
        up = run_cq("up", "--json", env=env, timeout=300)
        assert up.returncode == 0, up.stderr
        endpoints = json.loads(up.stdout)
        yield SimpleNamespace(env=env, home=Path(env["CQ_HOME"]), prefect=prefect, mlflow=mlflow, up=up,
                              api=endpoints["prefect_api_url"], mlflow_uri=endpoints["mlflow_tracking_uri"])
    finally:
        run_cq("down", env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def _secrets(stack) -> list[str]:
    """Every form a credential could leak in: the passwords, USER:PASSWORD, and its basic-auth encoding."""
    forms = []
    for joined in (stack.prefect, stack.mlflow):
        forms += [joined.partition(":")[2], joined, base64.b64encode(joined.encode()).decode()]
    return forms


def _prefect_counts(stack) -> tuple[int, int]:
    flows = _http("POST", f"{stack.api}/flows/count", {}, stack.prefect)
    runs = _http("POST", f"{stack.api}/flow_runs/count", {}, stack.prefect)
    assert flows[0] == runs[0] == 200, (flows, runs)
    return flows[1], runs[1]


def _mlflow_counts(stack) -> tuple[int, int, int]:
    """(experiments, runs, users), read as the admin."""
    status, found = _http("POST", f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search",
                          {"max_results": 1000, "view_type": "ALL"}, stack.mlflow)
    assert status == 200, found
    ids = [e["experiment_id"] for e in found.get("experiments", [])]
    status, runs = _http("POST", f"{stack.mlflow_uri}/api/2.0/mlflow/runs/search",
                         {"experiment_ids": ids, "max_results": 1000, "run_view_type": "ALL"}, stack.mlflow)
    assert status == 200, runs
    status, users = _http("GET", f"{stack.mlflow_uri}/api/2.0/mlflow/users/list", None, stack.mlflow)
    assert status == 200, users
    return len(ids), len(runs.get("runs", [])), len(users.get("users", []))


def _wrong(joined: str) -> list[str | None]:
    """No credentials, the right user with a wrong password, a wrong user with the right password."""
    user, _, password = joined.partition(":")
    return [None, f"{user}:{secrets.token_urlsafe(18)}", f"intruder:{password}"]


@pytest.mark.e2e
def test_prefect_api_refuses_requests_without_the_credentials_and_creates_nothing(auth_stack):
    before = _prefect_counts(auth_stack)
    for credentials in _wrong(auth_stack.prefect):
        for method, path, body in (
            ("POST", "/flows/", {"name": "intruder-flow"}),
            ("POST", "/flow_runs/filter", {}),
            ("POST", "/deployments/filter", {}),
            ("GET", "/admin/version", None),
        ):
            status, answer = _http(method, auth_stack.api + path, body, credentials)
            assert status == 401, (credentials is None, path, status, answer)
    assert _prefect_counts(auth_stack) == before
    status, flows = _http("POST", f"{auth_stack.api}/flows/filter",
                          {"flows": {"name": {"any_": ["intruder-flow"]}}}, auth_stack.prefect)
    assert status == 200 and flows == []
    assert _http("GET", f"{auth_stack.api}/health")[0] == 200  # health probes stay open, as Prefect has them


@pytest.mark.e2e
def test_mlflow_refuses_requests_without_the_credentials_and_creates_nothing(auth_stack):
    before = _mlflow_counts(auth_stack)
    uri = auth_stack.mlflow_uri
    for credentials in _wrong(auth_stack.mlflow):
        for method, path, body in (
            ("POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder-experiment"}),
            ("POST", "/ajax-api/2.0/mlflow/experiments/create", {"name": "intruder-experiment"}),
            ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0", "run_name": "intruder-run"}),
            ("POST", "/api/2.0/mlflow/users/create", {"username": "intruder", "password": secrets.token_urlsafe(18)}),
            ("POST", "/api/2.0/mlflow/experiments/search", {"max_results": 10}),
        ):
            status, answer = _http(method, uri + path, body, credentials)
            assert status == 401, (credentials is None, path, status, answer)
    assert _mlflow_counts(auth_stack) == before
    status, found = _http("GET", f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=intruder-experiment",
                          None, auth_stack.mlflow)
    assert status == 404, found
    assert _http("GET", f"{uri}/health")[0] == 200


@pytest.mark.e2e
def test_cq_with_wrong_or_missing_credentials_says_which_variable_to_set(auth_stack, tmp_path):
    before = _prefect_counts(auth_stack), _mlflow_counts(auth_stack)
    wrong_prefect = _wrong(auth_stack.prefect)[1]
    wrong_mlflow = _wrong(auth_stack.mlflow)[1]
    cases = [
        (("status", "--json"), {"CQ_PREFECT_AUTH": wrong_prefect}, "CQ_PREFECT_AUTH (user 'cq-prefect')"),
        (("status",), {"CQ_MLFLOW_AUTH": auth_stack.mlflow}, "no credentials were sent (CQ_PREFECT_AUTH is not set)"),
        (("submit", "--name", "nope", "--workdir", str(tmp_path), "--command", "true"),
         {"CQ_PREFECT_AUTH": auth_stack.prefect, "CQ_MLFLOW_AUTH": wrong_mlflow},
         "user 'cq-mlflow' with the password in CQ_MLFLOW_AUTH"),
        (("submit", "--name", "nope", "--workdir", str(tmp_path), "--command", "true"),
         {"CQ_PREFECT_AUTH": auth_stack.prefect}, "no credentials were sent (CQ_MLFLOW_AUTH is not set)"),
        (("knowledge", "search", "anything"), {}, "no credentials were sent (CQ_MLFLOW_AUTH is not set)"),
    ]
    for args, given, expected in cases:
        env = {k: v for k, v in auth_stack.env.items() if k not in AUTH_VARS}
        output = run_cq(*args, env={**env, **given}, timeout=120)
        assert output.returncode == 2, (args, output.stdout, output.stderr)
        assert expected in output.stderr, (args, output.stderr)
        assert "Traceback" not in output.stderr and "USER:PASSWORD" in output.stderr
        assert not any(secret in output.stdout + output.stderr for secret in _secrets(auth_stack) + [wrong_mlflow])
    assert (_prefect_counts(auth_stack), _mlflow_counts(auth_stack)) == before


@pytest.mark.e2e
def test_a_run_with_the_credentials_succeeds_and_no_secret_is_recorded(auth_stack, tmp_path):
    write_script(tmp_path, "train.py", """
        import os
        print("env:", sorted(k for k in os.environ if "AUTH" in k or "PASSWORD" in k or "USERNAME" in k))
        print("@loss=1.5")
    """)
    submit = run_cq("submit", "--name", "auth-e2e", "--workdir", str(tmp_path), "--command", "python train.py",
                    "--param", "lr=0.1", "--watch", "--json", env=auth_stack.env, timeout=240)
    assert submit.returncode == 0, submit.stderr
    handle = json.loads(submit.stdout)
    flow_run_id, mlflow_run_id = handle["flow_run_id"], handle["mlflow_run_id"]

    status, run = _http("GET", f"{auth_stack.mlflow_uri}/api/2.0/mlflow/runs/get?run_id={mlflow_run_id}",
                        None, auth_stack.mlflow)
    assert status == 200, run
    assert {m["key"]: m["value"] for m in run["run"]["data"]["metrics"]} == {"loss": 1.5}
    assert run["run"]["info"]["status"] == "FINISHED"

    # The command keeps MLflow's and Prefect's client variables, not cq's copies or the servers' secrets.
    env_line = next(line for line in submit.stderr.splitlines() if "env: [" in line)
    assert "MLFLOW_TRACKING_PASSWORD" in env_line and "PREFECT_API_AUTH_STRING" in env_line
    assert "CQ_PREFECT_AUTH" not in env_line and "CQ_MLFLOW_AUTH" not in env_line
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env_line and "MLFLOW_AUTH_ADMIN_PASSWORD" not in env_line

    status_json = run_cq("status", "--json", env=auth_stack.env, timeout=60)
    assert status_json.returncode == 0, status_json.stderr
    report = json.loads(status_json.stdout)
    assert report["auth"] == {"prefect": "CQ_PREFECT_AUTH", "mlflow": "CQ_MLFLOW_AUTH"}
    assert any(w["status"] == "ONLINE" for w in report["workers"])

    status, flow_run = _http("GET", f"{auth_stack.api}/flow_runs/{flow_run_id}", None, auth_stack.prefect)
    assert status == 200 and flow_run["state_type"] == "COMPLETED", flow_run
    status, logs = _http("POST", f"{auth_stack.api}/logs/filter",
                         {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}, auth_stack.prefect)
    assert status == 200 and any("@loss=1.5" in log["message"] for log in logs)
    status, artifacts = _http("POST", f"{auth_stack.api}/artifacts/filter",
                              {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}, auth_stack.prefect)
    assert status == 200 and artifacts, artifacts

    recorded = {
        "cq up": auth_stack.up.stdout + auth_stack.up.stderr,
        "cq submit": submit.stdout + submit.stderr,
        "cq status --json": status_json.stdout + status_json.stderr,
        "flow run (parameters, job variables)": json.dumps(flow_run),
        "flow run logs": json.dumps(logs),
        "artifacts": json.dumps(artifacts),
        "MLflow run (params, tags)": json.dumps(run),
    }
    # Every file under CQ_HOME: the stack's logs, stack.json, the auth config, spools, both servers'
    # databases and artifacts (MLflow's user database holds salted hashes, not passwords).
    for path in auth_stack.home.rglob("*"):
        if path.is_file():
            recorded[str(path)] = path.read_bytes().decode("latin-1")
    assert any(name.endswith("logs/worker.log") for name in recorded)
    for where, text in recorded.items():
        for secret in _secrets(auth_stack):
            assert secret not in text, f"a credential appears in {where}"


# -- without servers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("nocolon", "no ':' between a user and a password"),
        (":a-long-password", "names no user"),
        ("cq:", "empty password after 'cq:'"),
        ("cq:pass\nword-long", "line break"),
    ],
)
def test_malformed_values_name_the_fix(value, problem):
    with pytest.raises(BadInput) as caught:
        auth.parse(value, "CQ_PREFECT_AUTH")
    assert problem in str(caught.value)
    assert "set CQ_PREFECT_AUTH=USER:PASSWORD" in str(caught.value)


def test_mlflow_passwords_meet_mlflows_policy():
    with pytest.raises(BadInput, match="at least 12 characters"):
        auth.mlflow_credentials({"CQ_MLFLOW_AUTH": "cq:short"})
    creds = auth.mlflow_credentials({"CQ_MLFLOW_AUTH": "cq:pass:with:colons"})
    assert creds.username == "cq" and creds.password.get_secret_value() == "pass:with:colons"
    assert "with:colons" not in repr(creds) and "with:colons" not in str(creds)


def test_cq_values_become_the_clients_variables_and_win():
    env = {"CQ_PREFECT_AUTH": "p:prefect-password", "CQ_MLFLOW_AUTH": "m:mlflow-password",
           "PREFECT_API_AUTH_STRING": "stale:value", "MLFLOW_TRACKING_USERNAME": "stale"}
    auth.apply_client_environment(env)
    assert env["PREFECT_API_AUTH_STRING"] == "p:prefect-password"
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("m", "mlflow-password")
    assert auth.sources(env) == {"prefect": "CQ_PREFECT_AUTH", "mlflow": "CQ_MLFLOW_AUTH"}
    assert auth.sources({}) == {"prefect": None, "mlflow": None}
    bare = {"MLFLOW_TRACKING_USERNAME": "u", "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "t"}
    assert auth.mlflow_header(bare) == auth.basic_header("u:pw")  # MLflow's own order: basic before a token
    assert auth.mlflow_header({"MLFLOW_TRACKING_TOKEN": "t"}) == "Bearer t"


def test_client_errors_become_one_sentence_naming_the_variable(monkeypatch):
    import httpx
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import UNAUTHENTICATED

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:2")
    monkeypatch.setenv("CQ_PREFECT_AUTH", "alice:not-her-password")
    monkeypatch.delenv("CQ_MLFLOW_AUTH", raising=False)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    request = httpx.Request("POST", "http://127.0.0.1:1/api/flow_runs/filter")
    error = httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))
    try:
        try:
            raise error
        except httpx.HTTPStatusError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        refused = auth.refusal(wrapped)
    assert isinstance(refused, AuthRefused) and refused.exit_code == 2
    assert "Prefect API at http://127.0.0.1:1/api" in str(refused) and "CQ_PREFECT_AUTH (user 'alice')" in str(refused)
    assert "not-her-password" not in str(refused)

    refused = auth.refusal(MlflowException("API request failed with error code 401", error_code=UNAUTHENTICATED))
    assert "MLflow at http://127.0.0.1:2" in str(refused) and "CQ_MLFLOW_AUTH is not set" in str(refused)
    assert auth.refusal(ValueError("unrelated")) is None
    other = httpx.Request("POST", "https://api.anthropic.com/v1/messages")  # another API's 401 is not ours to explain
    assert auth.refusal(httpx.HTTPStatusError("401", request=other, response=httpx.Response(401, request=other))) is None


def test_the_embedded_mlflow_admin_follows_the_configured_credentials(tmp_path):
    folder = tmp_path / "auth"
    first = auth.parse("alice:first-password-1", "CQ_MLFLOW_AUTH", min_password=12)
    env = auth.mlflow_server_environment(folder, first)
    assert "first-password-1" not in (folder / "basic_auth.ini").read_text()  # the password is not on disk
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "first-password-1"
    auth.set_mlflow_admin(folder, first)
    auth.set_mlflow_admin(folder, auth.parse("alice:second-password-2", "CQ_MLFLOW_AUTH"))  # password rotated
    auth.set_mlflow_admin(folder, auth.parse("bob:third-password-33", "CQ_MLFLOW_AUTH"))  # user rotated
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore  # imported (quietly) by set_mlflow_admin

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{folder / 'auth.db'}")
    assert store.authenticate_user("bob", "third-password-33") and store.get_user("bob").is_admin
    assert not store.has_user("alice")  # the previous admin cq made no longer gets in
    assert auth.mlflow_admin_name(folder) == "bob"


def test_cq_up_with_a_malformed_value_exits_2_before_anything_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(CQ_HOME=str(tmp_path / "cqhome"), CQ_PREFECT_PORT=str(free_port()), CQ_MLFLOW_PORT=str(free_port()))
    for variable, value, problem in (("CQ_PREFECT_AUTH", "nocolon", "no ':'"),
                                     ("CQ_MLFLOW_AUTH", "cq:short", "at least 12 characters")):
        output = run_cq("up", env={**env, variable: value}, timeout=60)
        assert output.returncode == 2, output.stderr
        assert f"{variable}" in output.stderr and problem in output.stderr and "Traceback" not in output.stderr
    assert not Path(env["CQ_HOME"]).exists()
