"""Credentials for the two servers cq talks to over the network: the Prefect API and MLflow tracking.

Opt-in, from the environment of ``cq up``, of every ``cq`` command and of every worker host::

    CQ_PREFECT_AUTH=USER:PASSWORD   the embedded Prefect server requires it (Prefect's server setting
                                    PREFECT_SERVER_API_AUTH_STRING); cq's clients send it as Prefect's own
                                    client setting PREFECT_API_AUTH_STRING (HTTP basic auth)
    CQ_MLFLOW_AUTH=USER:PASSWORD    the embedded MLflow server runs MLflow's basic-auth app with this admin
                                    (users in CQ_HOME/mlflow/auth/auth.db); cq's clients send it as MLflow's own
                                    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD

    >>> parse("cq:a-long-password", "CQ_MLFLOW_AUTH")
    Credentials(username='cq', password=SecretStr('**********'))

A ``CQ_*`` value wins over Prefect's and MLflow's own variables in cq's processes (it is what the embedded
servers were started with); without it those variables work as usual, e.g. for servers cq did not start.

Why the environment and not a Prefect ``Secret`` block: a client needs the Prefect credentials before it can
read any block, so they cannot live in one; the MLflow ones could, but every worker and flow-run process
would then make a Prefect request before its first MLflow one, and anyone holding the Prefect credentials
could read them. The environment is what Prefect's and MLflow's own clients read, so one variable per
server serves cq, ``prefect`` and ``mlflow`` alike.

The password stays a :class:`~pydantic.SecretStr` until it goes into an environment variable or a
header. Messages name the variable and the user, never the password; nothing here logs.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cq_prefect.errors import AuthRefused, BadInput

PREFECT_ENV = "CQ_PREFECT_AUTH"
MLFLOW_ENV = "CQ_MLFLOW_AUTH"
PREFECT_CLIENT_ENV = "PREFECT_API_AUTH_STRING"
PREFECT_SERVER_ENV = "PREFECT_SERVER_API_AUTH_STRING"
MLFLOW_USER_ENV, MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
MLFLOW_MIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter passwords (mlflow.utils.validation)
# Only the servers and cq's own processes need these; an experiment's command gets the clients' variables.
SERVER_ONLY = frozenset({PREFECT_ENV, MLFLOW_ENV, PREFECT_SERVER_ENV, "MLFLOW_AUTH_ADMIN_PASSWORD"})
if TYPE_CHECKING:
    from pydantic import SecretStr  # imported when a value is parsed: quick commands without auth skip it

_EXAMPLE = "cq:$(python -c 'import secrets; print(secrets.token_urlsafe(18))')"


@dataclass(frozen=True)
class Credentials:
    """A user and a password for HTTP basic auth; the password never prints."""

    username: str
    password: SecretStr

    def joined(self) -> str:
        """``USER:PASSWORD``: Prefect's auth string, and what basic auth encodes."""
        return f"{self.username}:{self.password.get_secret_value()}"

    def header(self) -> str:
        return basic_header(self.joined())


def basic_header(user_colon_password: str) -> str:
    return "Basic " + base64.b64encode(user_colon_password.encode()).decode()


def parse(value: str, variable: str, *, min_password: int = 0) -> Credentials:
    """``USER:PASSWORD`` from ``variable``; :class:`BadInput` naming the problem and the fix otherwise."""
    fix = f"set {variable}=USER:PASSWORD, e.g. {variable}={_EXAMPLE}, or unset it to turn auth off"
    username, colon, password = value.partition(":")
    if not colon:
        raise BadInput(f"{variable} has no ':' between a user and a password; {fix}")
    if not username.strip():
        raise BadInput(f"{variable} names no user before the ':'; {fix}")
    if not password:
        raise BadInput(f"{variable} has an empty password after '{username}:'; {fix}")
    if any(c in value for c in "\r\n"):
        raise BadInput(f"{variable} contains a line break (a header cannot carry it); {fix}")
    if len(password) < min_password:
        raise BadInput(f"{variable}: MLflow's basic-auth app needs a password of at least {min_password} "
                       f"characters (this one has {len(password)}); {fix}")
    from pydantic import SecretStr

    return Credentials(username, SecretStr(password))


def prefect_credentials(env: Mapping[str, str] | None = None) -> Credentials | None:
    """``CQ_PREFECT_AUTH``, parsed; None when unset."""
    value = (os.environ if env is None else env).get(PREFECT_ENV)
    return parse(value, PREFECT_ENV) if value else None


def mlflow_credentials(env: Mapping[str, str] | None = None) -> Credentials | None:
    """``CQ_MLFLOW_AUTH``, parsed (MLflow's password policy included); None when unset."""
    value = (os.environ if env is None else env).get(MLFLOW_ENV)
    return parse(value, MLFLOW_ENV, min_password=MLFLOW_MIN_PASSWORD) if value else None


def apply_client_environment(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Put ``CQ_PREFECT_AUTH`` / ``CQ_MLFLOW_AUTH`` into the variables Prefect's and MLflow's clients read.

    Call it before Prefect is imported (Prefect reads its settings once); MLflow reads its variables at
    every request. Returns ``env`` (default ``os.environ``); a malformed value raises :class:`BadInput`.
    """
    env = os.environ if env is None else env
    prefect = prefect_credentials(env)
    if prefect:
        env[PREFECT_CLIENT_ENV] = prefect.joined()
    mlflow = mlflow_credentials(env)
    if mlflow:
        env[MLFLOW_USER_ENV] = mlflow.username
        env[MLFLOW_PASSWORD_ENV] = mlflow.password.get_secret_value()
    return env


def sources(env: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Which variable gives each server's credentials (``cq status``): never the values."""
    env = os.environ if env is None else env
    prefect = PREFECT_ENV if env.get(PREFECT_ENV) else PREFECT_CLIENT_ENV if env.get(PREFECT_CLIENT_ENV) else None
    mlflow = (MLFLOW_ENV if env.get(MLFLOW_ENV)
              else MLFLOW_USER_ENV if env.get(MLFLOW_USER_ENV) and env.get(MLFLOW_PASSWORD_ENV)
              else "MLFLOW_TRACKING_TOKEN" if env.get("MLFLOW_TRACKING_TOKEN") else None)
    return {"prefect": prefect, "mlflow": mlflow}


def prefect_header(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    creds = prefect_credentials(env)
    auth_string = creds.joined() if creds else env.get(PREFECT_CLIENT_ENV)
    return basic_header(auth_string) if auth_string else None


def mlflow_header(env: Mapping[str, str] | None = None) -> str | None:
    """The ``Authorization`` header MLflow's client would send: basic auth (``CQ_MLFLOW_AUTH`` first), else
    ``MLFLOW_TRACKING_TOKEN`` as a bearer token (mlflow.utils.rest_utils, same order)."""
    env = os.environ if env is None else env
    creds = mlflow_credentials(env)
    if creds:
        return creds.header()
    user, password = env.get(MLFLOW_USER_ENV), env.get(MLFLOW_PASSWORD_ENV)
    if user and password:
        return basic_header(f"{user}:{password}")
    return f"Bearer {env['MLFLOW_TRACKING_TOKEN']}" if env.get("MLFLOW_TRACKING_TOKEN") else None


# -- checking and explaining refusals -------------------------------------------------------------


def http_status(url: str, header: str | None, timeout: float = 10.0) -> tuple[int, str]:
    """(status, first 200 characters of the body) of GET ``url``; (0, reason) when nothing answers."""
    import urllib.error  # here: every cq command imports this module, few probe a server
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": header} if header else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (a server URL)
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:200]
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, str(exc)


def prefect_probe_url(api_url: str) -> str:
    return api_url.rstrip("/") + "/admin/version"  # small, and behind the auth check (/health is not)


def mlflow_probe_url(uri: str) -> str:
    return uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"  # /health skips auth


def check_prefect(api_url: str, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`AuthRefused` when the Prefect API refuses this process's credentials (or their absence)."""
    code, _ = http_status(prefect_probe_url(api_url), prefect_header(env))
    if code == 401:
        raise prefect_refused(api_url, env)


def prefect_refused(api_url: str, env: Mapping[str, str] | None = None) -> AuthRefused:
    env = os.environ if env is None else env
    source = sources(env)["prefect"]
    if source == PREFECT_ENV:
        what = f"the credentials in {PREFECT_ENV} (user '{env[PREFECT_ENV].partition(':')[0]}') are not the server's"
    elif source:
        what = f"the auth string in {PREFECT_CLIENT_ENV} is not the server's"
    else:
        what = f"no credentials were sent ({PREFECT_ENV} is not set)"
    return AuthRefused(
        f"the Prefect API at {api_url} refused the request (401 Unauthorized): {what}. Set {PREFECT_ENV}=USER:PASSWORD "
        f"to the credentials its server was started with, here and on every worker host ({PREFECT_CLIENT_ENV} for a "
        f"server cq did not start); after changing {PREFECT_ENV} for cq's own stack, restart it: cq down && cq up"
    )


def mlflow_refused(uri: str, code: int = 401, env: Mapping[str, str] | None = None) -> AuthRefused:
    env = os.environ if env is None else env
    source = sources(env)["mlflow"]
    user = (env.get(MLFLOW_ENV) or "").partition(":")[0] if source == MLFLOW_ENV else env.get(MLFLOW_USER_ENV)
    if code == 403:
        return AuthRefused(
            f"MLflow at {uri} denied user '{user}' (403 Permission denied); give that user permission through "
            f"MLflow's auth API, or set {MLFLOW_ENV}=USER:PASSWORD to an admin of that server"
        )
    if source == MLFLOW_ENV:
        what = f"it does not accept user '{user}' with the password in {MLFLOW_ENV}"
    elif source == MLFLOW_USER_ENV:
        what = f"the credentials in {MLFLOW_USER_ENV} / {MLFLOW_PASSWORD_ENV} are wrong"
    elif source:
        what = f"the token in {source} is not accepted"
    else:
        what = f"no credentials were sent ({MLFLOW_ENV} is not set)"
    return AuthRefused(
        f"MLflow at {uri} refused the request (401 Unauthorized): {what}. Set {MLFLOW_ENV}=USER:PASSWORD to a user of "
        f"that server, here and on every worker host ({MLFLOW_USER_ENV} and {MLFLOW_PASSWORD_ENV} for a server cq "
        f"did not start); cq up makes {MLFLOW_ENV} the embedded server's admin"
    )


def refusal(exc: BaseException) -> AuthRefused | None:
    """The :class:`AuthRefused` behind a Prefect or MLflow client error (or its causes), or None.

    For the CLI: a 401 from deep inside a client becomes one sentence naming the variable to set.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, AuthRefused):
            return exc
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401 and hasattr(response, "request"):  # httpx; Prefect's client, not another API's
            url, api = str(response.request.url), os.environ.get("PREFECT_API_URL", "").rstrip("/")
            if api and url.startswith(api):
                return prefect_refused(api)
            if type(exc).__module__.startswith("prefect"):
                return prefect_refused(url.split("/api/")[0] + "/api")
        code = getattr(exc, "error_code", None) if type(exc).__module__.startswith("mlflow") else None
        uri = os.environ.get("MLFLOW_TRACKING_URI", "MLflow")
        if code == "UNAUTHENTICATED":
            return mlflow_refused(uri, 401)
        if code == "PERMISSION_DENIED" and "Permission denied" in str(exc):  # not the Host-header 403
            return mlflow_refused(uri, 403)
        exc = exc.__cause__ or exc.__context__
    return None


# -- the embedded MLflow server's basic-auth app --------------------------------------------------


def mlflow_server_environment(folder, credentials: Credentials) -> dict[str, str]:
    """What ``mlflow server --app-name basic-auth`` needs: its config file (written into ``folder``, mode
    0600: no secret in it) and the admin, whose password goes in the environment, not on disk."""
    import secrets
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the user database holds password hashes
    config = folder / "basic_auth.ini"
    # default_permission READ: MLflow's default; users added through its API may read every experiment.
    text = (
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = {credentials.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": credentials.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password.get_secret_value(),
        # The app's CSRF key (its sign-up form only); one server process, so a fresh one per start will do.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY") or secrets.token_urlsafe(32),
    }


def set_mlflow_admin(folder, credentials: Credentials) -> None:
    """Make ``credentials`` the admin of the auth database in ``folder``: created, or its password set.

    MLflow uses its admin settings only to create the first admin, so a changed ``CQ_MLFLOW_AUTH`` would
    otherwise be refused forever. The admin cq made before under another name is deleted (the name is
    kept in ``folder/admin``), so a rotated user stops working; users added through MLflow's API stay.
    """
    import warnings
    from pathlib import Path

    with warnings.catch_warnings():  # importing MLflow's server warns about Starlette; not ours to print
        warnings.simplefilter("ignore")
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{folder / 'auth.db'}")
    name, password = credentials.username, credentials.password.get_secret_value()
    if store.has_user(name):
        store.update_user(name, password=password, is_admin=True)
    else:
        store.create_user(name, password, is_admin=True)
    previous = _read(folder / "admin")
    if previous and previous != name and store.has_user(previous):
        store.delete_user(previous)
    (folder / "admin").write_text(name)


def mlflow_admin_name(folder) -> str | None:
    from pathlib import Path

    return _read(Path(folder) / "admin")


def _read(path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
