"""A throw-away PostgreSQL server on loopback for the many-machine tests (Debian's package).

Usage::

    with Postgres(require_postgres()) as pg:     # skip (locally) or fail (CI=true) when absent
        url = pg.database("optuna")              # postgresql://suite@127.0.0.1:<port>/optuna
        with MlflowServer(pg.database("mlflow"), tmp) as server:   # server.url: http://...
            ...

The cluster lives in a fresh folder under the system temp dir and is removed on exit. The server
refuses to run as root, so as root it runs as the `postgres` system user (or `nobody`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from browser import free_port

INSTALL_HINT = "apt-get install postgresql, pip install 'psycopg[binary]' (.ci/run does this)"


def find_bindir() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's newest /usr/lib/postgresql/N/bin, else PATH's."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
    )
    if debian:
        return debian[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path and shutil.which("initdb") else None


def require_postgres() -> Path:
    """The server's bin folder; a skip with the reason when absent, a failure on CI (CI=true)."""
    bindir = find_bindir()
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's driver for postgresql://: Optuna, MLflow)
    except ImportError:
        bindir = None
    if bindir is None:
        message = f"PostgreSQL server or psycopg not found: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{message}; CI must have them")
        pytest.skip(message)
    return bindir


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run the server")


class Postgres:
    """initdb, start on 127.0.0.1:<free port> with trust auth for user `suite`, stop, remove."""

    def __init__(self, bindir: Path):
        self.bindir, self.user, self.port = bindir, _server_user(), free_port()
        self.root = Path(tempfile.mkdtemp(prefix="suite-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        proc = subprocess.run(
            [*prefix, str(self.bindir / cmd[0]), *cmd[1:]], capture_output=True, text=True
        )
        if proc.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}{log}")

    def __enter__(self) -> Postgres:
        if self.user:
            shutil.chown(self.root, self.user)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "suite", "--no-sync",
                  "-E", "UTF8", "--locale=C")  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -F"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w",
                  "-t", "60", "start")  # fmt: skip
        return self

    def database(self, name: str) -> str:
        """Create database `name`; its SQLAlchemy URL."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run in a transaction
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="suite", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://suite@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with its runs in a PostgreSQL database: the
    shared dashboard several machines log to. Its own process group, stopped as one."""

    def __init__(self, store: str, root: Path):
        from suite import dashboard

        self.port, self.root = free_port(), root
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = dashboard.server_command(store, "127.0.0.1", self.port)
        self.cmd += ["--artifacts-destination", (root / "artifacts").as_uri()]

    def __enter__(self) -> MlflowServer:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
        self.log = (self.root / "mlflow-server.log").open("wb")
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: stopped as one
        )  # fmt: skip
        deadline = time.monotonic() + 180  # a fresh database: MLflow's migrations first
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                tail = (self.root / "mlflow-server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server did not start: {tail}")
            time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.log.close()
