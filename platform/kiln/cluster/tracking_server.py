"""An MLflow tracking server for jobs on a cluster: ``kiln tracking serve``.

Workers on other machines cannot write the submitter's sqlite file, so a cluster's runs go to one
``mlflow server``: a sqlite store in ``store_dir``, and artifacts proxied by the server
(``--serve-artifacts`` into ``store_dir/artifacts``), so neither workers nor clients need a shared
disk. Jobs get its URI through ``kiln submit --tracking-uri`` (MLFLOW_TRACKING_URI in the job's
runtime env).

With ``auth`` (the default when it binds beyond loopback) it runs MLflow's ``basic-auth`` app: every
request needs a user and password. Kiln creates the admin's credentials once, in
``store_dir/auth/credentials.json`` (0600 in a 0700 folder; never printed or logged), and hands
them to ``mlflow server`` through its environment. Clients and jobs pass them as
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (``kiln submit`` forwards those to the
job's environment, never to params, tags or logs).

For a cluster, the credentials live in MLflow's own client file instead (``credentials_file``:
``~/.mlflow/credentials``, an INI section ``[mlflow]`` with ``mlflow_tracking_username`` and
``mlflow_tracking_password``), which every MLflow client reads by itself, in every process of the
user: ``kiln tracking credentials`` creates it (0600 in a 0700 folder) where ``ray up`` runs,
``cluster.yaml``'s ``file_mounts`` copy it to every node as they copy Ray's token, and ``kiln
tracking serve --credentials-file`` makes its user the server's admin. Job drivers and training
ranks on any node then log with it, and the password is in no environment, command line, param,
tag or log.
"""

from __future__ import annotations

import configparser
import io
import ipaddress
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.files import atomic_write_text
from kiln.local_ray import port_in_use

ADMIN_USER = "kiln"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
# MLflow's client credentials file: MLflow reads it in every process (mlflow.utils.credentials)
CLIENT_CREDENTIALS = "~/.mlflow/credentials"
SECTION = "mlflow"


@dataclass
class TrackingServer:
    host: str
    port: int
    store_dir: Path
    workers: int = 1
    auth: bool = False  # MLflow's basic-auth app: every request needs the credentials
    client_credentials: Path | None = None  # MLflow's client file holding the admin's user

    @property
    def uri(self) -> str:
        """The tracking URI clients and jobs use."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.store_dir / 'mlflow.db'}"

    @property
    def artifacts_dir(self) -> Path:
        return self.store_dir / "artifacts"

    @property
    def auth_dir(self) -> Path:
        return self.store_dir / "auth"

    @property
    def credentials_file(self) -> Path:
        """Where the admin's user and password are: MLflow's client file given to
        ``--credentials-file``, else ``DIR/auth/credentials.json`` (JSON, 0600), created once."""
        return self.client_credentials or self.auth_dir / "credentials.json"

    def command(self) -> list[str]:
        """The ``mlflow server`` command line (run with this Python, so it is the MLflow Kiln
        uses)."""
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts_dir),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *(["--app-name", "basic-auth"] if self.auth else []),
        ]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_server(
    host: str = "127.0.0.1",
    port: int = 5000,
    store_dir: str | Path = "runs/tracking",
    workers: int = 1,
    auth: bool | None = None,
    credentials_file: str | Path | None = None,
) -> TrackingServer:
    """Check the port and create the store folder (and, with ``auth``, default: on unless the host
    is loopback or ``credentials_file`` is given, the credentials). ``credentials_file``: MLflow's
    client file (``ensure_client_credentials``) whose user becomes the admin. Raises KilnError
    when the port is taken or ``credentials_file`` is given with ``auth`` off."""
    if credentials_file is not None and auth is False:
        raise KilnError("--credentials-file needs the server's authentication: drop --no-auth")
    if not 0 < port < 65536:
        raise KilnError(f"--port {port}: not a TCP port")
    bind_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if port_in_use(port, "0.0.0.0" if host in ("0.0.0.0", "::") else bind_host):
        raise KilnError(f"port {port} on {host} is in use; pass another --port")
    server = TrackingServer(
        host=host,
        port=port,
        store_dir=Path(store_dir).expanduser().resolve(),
        workers=workers,
        auth=(not is_loopback(host) or credentials_file is not None) if auth is None else auth,
        client_credentials=None
        if credentials_file is None
        else Path(credentials_file).expanduser().absolute(),
    )
    server.artifacts_dir.mkdir(parents=True, exist_ok=True)
    if server.auth:
        ensure_credentials(server)
    return server


def _private_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def ensure_client_credentials(path: str | Path = CLIENT_CREDENTIALS) -> tuple[Path, bool]:
    """MLflow's client credentials file at ``path`` (default ``~/.mlflow/credentials``): created
    with user ``kiln`` and a random password when absent; the folder 0700 and the file 0600 (both
    fixed when found looser). Returns (path, whether it was created). Raises KilnError when the
    file exists without both values."""
    path = Path(path).expanduser().absolute()
    _private_folder(path.parent)
    if path.is_file():
        path.chmod(0o600)
        read_client_credentials(path)
        return path, False
    config = configparser.ConfigParser()
    config[SECTION] = {
        USERNAME_ENV.lower(): ADMIN_USER,
        PASSWORD_ENV.lower(): secrets.token_urlsafe(24),
    }
    text = io.StringIO()
    config.write(text)
    atomic_write_text(path, text.getvalue(), mode=0o600)
    return path, True


def read_client_credentials(path: str | Path) -> tuple[str, str]:
    """(user, password) from MLflow's client credentials file. Raises KilnError when it lacks
    them."""
    path = Path(path).expanduser()
    config = configparser.ConfigParser()
    try:
        config.read_string(path.read_text())
        section = config[SECTION]
        user, password = section[USERNAME_ENV.lower()], section[PASSWORD_ENV.lower()]
    except (OSError, configparser.Error, KeyError):
        user = password = ""
    if not user or not password:
        raise KilnError(
            f"{path} holds no [{SECTION}] {USERNAME_ENV.lower()} and {PASSWORD_ENV.lower()}; "
            "create it with `kiln tracking credentials`"
        )
    return user, password


def ensure_credentials(server: TrackingServer) -> dict[str, str]:
    """The server's credentials ({"username", "password", "secret_key"}), created once: the folder
    0700, the file 0600 (both fixed when found looser). With ``server.client_credentials`` the user
    and password come from that file (created when absent) and the Flask secret from
    ``DIR/auth/secret_key``."""
    _private_folder(server.auth_dir)
    if server.client_credentials is not None:
        user, password = read_client_credentials(
            ensure_client_credentials(server.credentials_file)[0]
        )
        secret = server.auth_dir / "secret_key"
        if not secret.is_file():
            atomic_write_text(secret, secrets.token_urlsafe(32), mode=0o600)
        secret.chmod(0o600)
        return {"username": user, "password": password, "secret_key": secret.read_text().strip()}
    path = server.credentials_file
    if path.is_file():
        path.chmod(0o600)
        try:
            found: dict[str, str] = json.loads(path.read_text())
            if {"username", "password", "secret_key"} <= set(found):
                return found
        except ValueError:
            pass
        raise KilnError(f"{path} is not Kiln's credentials file; move it aside to create new ones")
    created = {
        "username": ADMIN_USER,
        "password": secrets.token_urlsafe(24),
        "secret_key": secrets.token_urlsafe(32),
    }
    atomic_write_text(path, json.dumps(created), mode=0o600)
    return created


def auth_environment(server: TrackingServer) -> dict[str, str]:
    """What MLflow's basic-auth app reads: its config (an auth database beside the store, no access
    by default), the admin's password (used once, when its user is created) and the Flask secret."""
    creds = ensure_credentials(server)
    config = server.auth_dir / "basic_auth.ini"
    atomic_write_text(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{server.auth_dir / 'basic_auth.db'}\n"
        f"admin_username = {creds['username']}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        mode=0o600,
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": creds["password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["secret_key"],
    }


def exec_server(server: TrackingServer) -> None:
    """Replace this process with ``mlflow server`` (signals such as Ctrl-C then reach MLflow
    itself)."""
    sys.stdout.flush()
    sys.stderr.flush()
    cmd = server.command()
    os.execve(cmd[0], cmd, server_environment(server))


def server_environment(server: TrackingServer | None = None) -> dict[str, str]:
    """The environment ``mlflow server`` runs with: this process's, MLflow's job runner off unless
    the user set it (GenAI scorer jobs: about eight extra processes that serve nothing Kiln uses),
    and with ``server.auth`` what the basic-auth app needs."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if server is not None and server.auth:
        env.update(auth_environment(server))
    return env
