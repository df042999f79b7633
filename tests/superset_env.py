"""A real Apache Superset for tests: pinned, in its own virtualenv, cached between runs.

The venv lives under ~/.cache/chtsync/superset-venv/<key>, where the key covers the pinned
packages and the Python version, so CI on the same machine reuses it and a pin change installs a
fresh one. If it is absent it installs itself (~1 minute, ~830 MB). See ../shared/notes/superset.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SUPERSET_VERSION = "6.1.0"
# 6.1.0 misses rich and cachetools; flask-caching 2.5 breaks its metastore cache.
PACKAGES = (
    f"apache-superset=={SUPERSET_VERSION}",
    "psycopg2-binary",
    "rich",
    "cachetools",
    "flask-caching<2.5",
)
ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin-" + "test"  # a throwaway Superset on loopback only


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chtsync" / "superset-venv"


def venv_key() -> str:
    spec = "\n".join((*PACKAGES, f"py{sys.version_info.major}.{sys.version_info.minor}"))
    return f"{SUPERSET_VERSION}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def ensure_venv() -> Path:
    """The cached venv's directory, installing it first if it is missing or half-built."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / venv_key()
    done = target / ".chtsync-complete"
    if done.exists():
        return target
    # One installer at a time: parallel test runs wait for the first one's venv.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return target
        # Venv scripts hard-code their path, so build in place; the marker file written last
        # tells a finished venv from one an interrupted run left behind.
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "--upgrade", "pip", "setuptools", "wheel"], check=True)
        subprocess.run([*pip, "install", *PACKAGES], check=True)
        done.write_text(" ".join(PACKAGES) + "\n")
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Superset:
    """One throwaway Superset: sqlite metadata in `home`, admin user, web server on loopback."""

    def __init__(self, home: Path, venv: Path | None = None) -> None:
        self.venv = venv or ensure_venv()
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "superset.log"
        config = home / "superset_config.py"
        config.write_text(
            "\n".join(
                [
                    f"SECRET_KEY = {secrets.token_urlsafe(32)!r}",
                    f"SQLALCHEMY_DATABASE_URI = 'sqlite:///{home / 'superset.db'}'",
                    "TALISMAN_ENABLED = False",
                    "WTF_CSRF_ENABLED = True",
                    "RATELIMIT_ENABLED = False",
                    "AUTH_RATE_LIMITED = False",
                    "CACHE_CONFIG = {'CACHE_TYPE': 'SimpleCache'}",
                    "DATA_CACHE_CONFIG = {'CACHE_TYPE': 'SimpleCache'}",
                    "FILTER_STATE_CACHE_CONFIG = {'CACHE_TYPE': 'SimpleCache'}",
                    "EXPLORE_FORM_DATA_CACHE_CONFIG = {'CACHE_TYPE': 'SimpleCache'}",
                    "FEATURE_FLAGS = {'THUMBNAILS': False, 'ALERT_REPORTS': False}",
                    "SUPERSET_WEBSERVER_TIMEOUT = 120",
                    "",
                ]
            )
        )
        self.env = {
            **os.environ,
            "SUPERSET_CONFIG_PATH": str(config),
            "SUPERSET_HOME": str(home),
            "FLASK_APP": "superset.app:create_app()",
            "PYTHONUNBUFFERED": "1",
        }
        # The test's own venv must not leak into Superset's interpreter.
        for key in ("PYTHONPATH", "VIRTUAL_ENV"):
            self.env.pop(key, None)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.venv / "bin" / "superset"), *args],
            env=self.env, cwd=self.home, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"superset {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def init(self) -> Superset:
        """Metadata database, admin user, roles and permissions (required before any import)."""
        self.cli("db", "upgrade")
        self.cli(
            "fab", "create-admin", "--username", ADMIN_USER, "--firstname", "Admin",
            "--lastname", "Test", "--email", "admin@example.org", "--password", ADMIN_PASSWORD,
        )
        self.cli("init")
        return self

    def start(self, timeout: float = 120.0) -> Superset:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the server's life
        self.proc = subprocess.Popen(
            [str(self.venv / "bin" / "superset"), "run", "-h", "127.0.0.1", "-p", str(self.port),
             "--with-threads"],
            env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"superset exited early; log:\n{self.log_tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"{self.url}/health", timeout=5
            ) as r:
                if r.status == 200:
                    return self
            time.sleep(0.5)
        raise RuntimeError(f"superset gave no /health in {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            # Only the process group this object started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)
        self.proc = None


@contextlib.contextmanager
def running(home: Path) -> Iterator[Superset]:
    server = Superset(home).init().start()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    print(ensure_venv())
