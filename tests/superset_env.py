"""A real Apache Superset for tests: pinned, in its own virtualenv, cached between runs.

The venv lives under ~/.cache/chtsync/superset-venv/<key>, where the key covers the pinned
packages and the Python version, so CI on the same machine reuses it and a pin change installs a
fresh one. If it is absent it installs itself (~1 minute, ~830 MB). See ../shared/notes/superset.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.cookiejar
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from chtsync.localservers import free_port

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
        log_path = root / f"{venv_key()}.install.log"
        pip = [str(target / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        with open(log_path, "w") as log:
            for step in (
                [sys.executable, "-m", "venv", str(target)],
                [*pip, "install", "--upgrade", "pip", "setuptools", "wheel"],
                [*pip, "install", *PACKAGES],
            ):
                log.write(f"$ {' '.join(step)}\n")
                log.flush()
                if subprocess.run(step, stdout=log, stderr=subprocess.STDOUT).returncode:
                    tail = log_path.read_text(errors="replace").splitlines()[-30:]
                    raise RuntimeError(f"installing Superset failed ({log_path}):\n"
                                       + "\n".join(tail))
        done.write_text(" ".join(PACKAGES) + "\n")
    return target


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
                    # Render every chart at once (no lazy loading) for the screenshot.
                    "FEATURE_FLAGS = {'THUMBNAILS': False, 'ALERT_REPORTS': False,"
                    " 'DASHBOARD_VIRTUALIZATION': False}",
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
        """Metadata database, admin user, roles and permissions (required before any import).

        The three CLI calls take ~25 s; their result (no secrets encrypted in it yet) is kept
        beside the venv and copied for the next test.
        """
        template = self.venv / ".chtsync-metadata.db"
        target = self.home / "superset.db"
        if template.is_file():
            shutil.copyfile(template, target)
            return self
        self.cli("db", "upgrade")
        self.cli(
            "fab", "create-admin", "--username", ADMIN_USER, "--firstname", "Admin",
            "--lastname", "Test", "--email", "admin@example.org", "--password", ADMIN_PASSWORD,
        )
        self.cli("init")
        partial = template.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(target, partial)
        os.replace(partial, template)  # atomic: a parallel run sees the whole file or none
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


# --- screenshot: headless Chromium driven over the DevTools protocol ----------------------------


def login_cookie(url: str, user: str = ADMIN_USER, password: str = ADMIN_PASSWORD) -> str:
    """The `session` cookie of a browser login (the /login/ form, with its CSRF token)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{url}/login/", timeout=30) as r:
        page = r.read().decode()
    match = re.search(r'id="csrf_token"\s*value="([^"]+)"', page)
    if not match:
        raise RuntimeError("no CSRF token on Superset's login page")
    form = urllib.parse.urlencode(
        {"csrf_token": match.group(1), "username": user, "password": password}
    ).encode()
    with opener.open(f"{url}/login/", data=form, timeout=30):
        pass
    for cookie in jar:
        if cookie.name == "session" and cookie.value:
            return cookie.value
    raise RuntimeError("Superset set no session cookie at login")


def screenshot(server: Superset, slug: str, out: Path, width: int = 1600,
               charts: int | None = None) -> None:
    """Render a dashboard in headless Chromium and save a PNG of the whole page.

    Runs in Superset's venv, which has websocket-client (a Superset dependency).
    """
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium")
    cookie = login_cookie(server.url)
    subprocess.run(
        [str(server.venv / "bin" / "python"), __file__, "cdp", chromium, server.url, slug,
         str(out), str(width), str(charts or 0)],
        check=True, timeout=300, env={**os.environ, "CHTSYNC_SESSION": cookie},
    )


def _cdp_capture(chromium: str, url: str, slug: str, out: str, width: int, charts: int) -> None:
    import base64
    import json
    import tempfile

    import websocket  # type: ignore[import-not-found]  # only in Superset's venv

    port = free_port()
    profile = tempfile.mkdtemp(prefix="chtsync-chromium-")
    browser = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        pages: list[dict[str, str]] = []
        while time.monotonic() < deadline and not pages:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/json/list", timeout=2
            ) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            time.sleep(0.3)
        if not pages:
            raise RuntimeError("chromium did not open its DevTools port")
        ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                         suppress_origin=True)
        counter = iter(range(1, 10**6))

        def call(method: str, **params: object) -> dict[str, object]:
            msg_id = next(counter)
            ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(ws.recv())
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

        def evaluate(expr: str) -> object:
            result = call("Runtime.evaluate", expression=expr, returnByValue=True)
            return result.get("result", {}).get("value")  # type: ignore[union-attr]

        call("Network.enable")
        call("Network.setCookie", name="session", value=os.environ["CHTSYNC_SESSION"],
             url=url, httpOnly=True)
        call("Emulation.setDeviceMetricsOverride", width=width, height=1200,
             deviceScaleFactor=1, mobile=False)
        call("Page.enable")
        call("Page.navigate", url=f"{url}/superset/dashboard/{slug}/?standalone=1")
        # Ready when every chart holder shows a canvas, a table or a big number, and no spinner.
        ready = """(() => {
            const holders = [...document.querySelectorAll('.dashboard-component-chart-holder')]
                .filter(h => !h.querySelector('.dashboard-markdown'));
            const done = holders.filter(h => h.querySelector(
                'canvas, table, .header-line, .superset-legacy-chart-big-number, .big_number'));
            const spinning = document.querySelectorAll('.loading, [aria-label="Loading"]').length;
            return [holders.length, done.length, spinning];
        })()"""
        def wait_ready() -> None:
            deadline = time.monotonic() + 120
            state: object = None
            while time.monotonic() < deadline:
                state = evaluate(ready)
                # Markdown blocks are holders too: with a chart count given, count charts only.
                if (isinstance(state, list) and state[1] and not state[2]
                        and state[1] >= (charts or state[0])):
                    time.sleep(3)  # chart animations
                    return
                time.sleep(1)
            raise RuntimeError(f"dashboard did not finish rendering: {state}")

        wait_ready()
        height = evaluate("document.documentElement.scrollHeight")
        call("Emulation.setDeviceMetricsOverride", width=width, height=int(str(height or 1200)),
             deviceScaleFactor=1, mobile=False)
        wait_ready()  # charts re-render for the new viewport
        # Not captureBeyondViewport: Superset's grid then renders blank; the viewport is the page.
        shot = call("Page.captureScreenshot", format="png")
        Path(out).write_bytes(base64.b64decode(str(shot["data"])))
        ws.close()
    finally:
        os.killpg(browser.pid, 15)
        browser.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "cdp":
        _, _, chromium_path, base, dash_slug, target, px, n = sys.argv
        _cdp_capture(chromium_path, base, dash_slug, target, int(px), int(n))
    else:
        print(ensure_venv())
