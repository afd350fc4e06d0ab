"""`suite dashboard`: the MLflow UI on the project's tracking store, stopped cleanly by Ctrl-C.

The server (`python -m mlflow server`, one worker) runs in its own process group, so a Ctrl-C
or SIGTERM here stops it and every process it started, and `suite dashboard` exits 0.
Its output goes to a log file, named on start and quoted when the server fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from suite import tracking

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# MLflow 3's UI opens in its GenAI view; the suite's runs live in the "Model training" view
LANDING = "#/experiments?workflowType=machine_learning"
STOP_GRACE_S = 10.0


class DashboardError(ValueError):
    """The dashboard cannot start: busy port, missing store, or a server that never answers."""


class _Stop(Exception):
    """Raised from the SIGINT/SIGTERM handler to leave the wait loop."""


def allowed_hosts(host: str) -> str | None:
    """--allowed-hosts for MLflow's DNS-rebinding check; None keeps its default (localhost and
    private IPs), which is right for a loopback bind. Otherwise localhost plus the bound name,
    or this machine's names for a wildcard bind (0.0.0.0, ::)."""
    if host in LOOPBACK:
        return None
    names = {socket.gethostname(), socket.getfqdn()} if host in ("0.0.0.0", "::") else {host}
    names = {f"[{n}]" if ":" in n else n for n in names} | {"localhost", "127.0.0.1"}
    return ",".join(sorted(names) + sorted(f"{n}:*" for n in names))


def server_command(store: str, host: str, port: int, hosts: str | None = None) -> list[str]:
    """The `mlflow server` command line for store (sqlite: artifacts in mlartifacts/ beside it)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    root = tracking.artifact_root(store)
    if root is not None:
        cmd += ["--default-artifact-root", root.as_uri(), "--artifacts-destination", root.as_uri()]
    hosts = hosts or allowed_hosts(host)
    return cmd + ["--allowed-hosts", hosts] if hosts else cmd


def _check_store(store: str) -> None:
    """A one-line error for a store the dashboard cannot serve."""
    scheme = urllib.parse.urlparse(store).scheme
    if scheme in ("http", "https"):
        raise DashboardError(f"{store} is already a tracking server: open it in a browser")
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///") :]).is_file():
        raise DashboardError(
            f"no MLflow store at {store[len('sqlite:///') :]}: run a stage first or pass --store"
        )


def _check_port(host: str, port: int) -> None:
    """A one-line error when host:port is taken (the server would fail less clearly)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _url(host: str, port: int) -> str:
    """Where a browser on this machine reaches the server."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def _last_line(log: Path) -> str:
    """The server log's last line, and where the rest is."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return f"{lines[-1] if lines else '(no output)'} (log: {log})"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll url/health until it answers 200; error if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DashboardError(f"mlflow server exited ({proc.returncode}): {_last_line(log)}")
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise DashboardError(
                f"mlflow server did not answer {url} within {timeout:.0f}s (log: {log})"
            )
        time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL whatever is left after STOP_GRACE_S."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)  # the group outlives a leader that exits first
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _raise_stop(signum: int, frame: object) -> None:
    """First SIGINT/SIGTERM: ignore further ones and leave the wait loop."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise _Stop


def cmd_dashboard(args: argparse.Namespace) -> int:
    store = args.store or tracking.store_uri(Path.cwd())
    _check_store(store)
    _check_port(args.host, args.port)
    url = _url(args.host, args.port)
    fd, name = tempfile.mkstemp(prefix=f"suite-dashboard-{args.port}-", suffix=".log")
    log = Path(name)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # GenAI jobs: 8 idle processes
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped = False
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            server_command(store, args.host, args.port, args.allowed_hosts),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped as one
        )
    try:
        for sig in old:
            signal.signal(sig, _raise_stop)
        _wait_healthy(url, proc, log, args.timeout)
        print(f"MLflow dashboard: {url}{LANDING}", flush=True)
        print(f"  store {store}; server log {log}; Ctrl-C stops it", flush=True)
        while proc.poll() is None:
            time.sleep(0.5)
        raise DashboardError(f"mlflow server exited ({proc.returncode}): {_last_line(log)}")
    except _Stop:
        print("stopping the dashboard", file=sys.stderr, flush=True)
        stopped = True
        return 0
    finally:
        for sig in old:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        _stop(proc)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if stopped:
            log.unlink(missing_ok=True)  # kept, and named in the error, when the server failed


def add_parsers(sub: argparse._SubParsersAction) -> None:
    dash = sub.add_parser("dashboard", help="serve the MLflow UI on the project's tracking store")
    dash.add_argument("--port", type=int, default=5000)
    dash.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    dash.add_argument(
        "--store",
        help="tracking store URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)",
    )
    dash.add_argument(
        "--allowed-hosts",
        help="Host headers MLflow accepts (default: localhost; with a non-loopback --host, that "
        "name or this machine's names too)",
    )
    dash.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the server to answer"
    )
    dash.set_defaults(func=cmd_dashboard)
