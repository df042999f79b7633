"""Real servers for tests: Apache CouchDB 3.4 (the reference), pouchdb-server (a second CouchDB-API
implementation) and a cuttable TCP proxy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

from chtsync.localservers import PouchDBServer, free_port

ROOT = Path(__file__).resolve().parent.parent
POUCHDB_BIN = ROOT / "node_modules" / ".bin" / "pouchdb-server"
ADMIN = ("admin", "s3cret-Pa55")
COUCHDB_RELEASE = "couchdb-3.4.3-debian12-x86_64.tar.gz"


def _find_tarball() -> Path:
    """The Apache CouchDB release built for these machines (see ../shared/couchdb/README.md).

    CHTSYNC_TEST_COUCHDB_TARBALL names another copy; otherwise `shared/couchdb/` beside the
    checkout or beside any folder above it (a git worktree lives deeper than the main checkout).
    """
    if os.environ.get("CHTSYNC_TEST_COUCHDB_TARBALL"):
        return Path(os.environ["CHTSYNC_TEST_COUCHDB_TARBALL"])
    candidates = [p / "shared" / "couchdb" / COUCHDB_RELEASE for p in ROOT.parents]
    return next((c for c in candidates if c.exists()), candidates[0])


# Absent: tests use CHTSYNC_TEST_COUCHDB_URL, else skip (fail under CI=true).
COUCHDB_TARBALL = _find_tarball()


class PouchServer(PouchDBServer):
    """The package's pouchdb-server launcher (in memory, loopback) with the tests' admin user."""

    kind = "pouchdb"

    def __init__(self, port: int | None = None) -> None:
        if not POUCHDB_BIN.exists():
            raise RuntimeError("pouchdb-server missing: run `npm ci --ignore-scripts` in the repo")
        super().__init__(Path(tempfile.mkdtemp(prefix="pouchdb-")), port, POUCHDB_BIN)
        self.auth = ADMIN

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> CouchAdmin:
        return CouchAdmin(self.url, self.auth)


class CouchDBServer:
    """A real Apache CouchDB 3 from the release tarball: single node, loopback, its own data dir.

    `kill()` is kill -9 of the server; `start()` again on the same data dir keeps the data.
    """

    auth = ADMIN
    kind = "couchdb"

    def __init__(self, tarball: Path = COUCHDB_TARBALL, port: int | None = None) -> None:
        self.tarball = tarball
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="couchdb-"))
        self.datadir = self.workdir / "data"
        self.pid: int | None = None
        with tarfile.open(tarball) as tar:
            tar.extractall(self.workdir, filter="tar")
        [self.release] = [p for p in self.workdir.iterdir() if (p / "start-couchdb.sh").exists()]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CouchDBServer:
        proc = subprocess.run(
            [str(self.release / "start-couchdb.sh"), str(self.port), str(self.datadir), *ADMIN],
            capture_output=True, text=True, timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"CouchDB did not start: {proc.stderr.strip()[-2000:]}")
        self.pid = int(proc.stdout.strip().splitlines()[-1])
        return self

    def kill(self) -> None:
        """kill -9: no shutdown, as a crash or an OOM kill would leave it."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid)
            self.pid = None

    def stop(self) -> None:
        if self.pid is not None:
            subprocess.run([str(self.release / "stop-couchdb.sh"), str(self.pid)],
                           capture_output=True, timeout=60)
            self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def client(self) -> CouchAdmin:
        return CouchAdmin(self.url, self.auth)


class ExternalCouchDB:
    """A CouchDB 3 the developer runs (e.g. in Docker), named by CHTSYNC_TEST_COUCHDB_URL.

    The URL carries the admin credentials: http://admin:pass@127.0.0.1:5984.
    """

    kind = "couchdb"

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        self.auth = (parsed.username or ADMIN[0], parsed.password or ADMIN[1])
        self.host = parsed.host
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)

    def start(self) -> ExternalCouchDB:
        """Fail in one line when the named server does not answer as an admin."""
        try:
            r = httpx.get(self.url + "/_session", auth=self.auth, timeout=10)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"CHTSYNC_TEST_COUCHDB_URL {self.url} is unreachable: {exc}") from None
        if r.status_code != 200 or "_admin" not in r.json().get("userCtx", {}).get("roles", []):
            raise RuntimeError(f"CHTSYNC_TEST_COUCHDB_URL {self.url}: the URL's user is not a server admin"
                               f" (HTTP {r.status_code}); put an admin in it: http://admin:pass@host:5984")
        return self

    def client(self) -> CouchAdmin:
        return CouchAdmin(self.url, self.auth)

    def close(self) -> None:
        pass


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} still alive after {timeout} s")


class CouchAdmin:
    """A small synchronous client to arrange CouchDB state in tests."""

    def __init__(self, url: str, auth: tuple[str, str] = ADMIN) -> None:
        self.http = httpx.Client(base_url=url, auth=auth, timeout=60,
                                 headers={"Content-Type": "application/json"})

    def create_db(self, db: str) -> None:
        r = self.http.put(f"/{db}")
        assert r.status_code in (201, 412), r.text

    def delete_db(self, db: str) -> None:
        self.http.delete(f"/{db}")

    def bulk(self, db: str, docs: list[dict]) -> list[dict]:
        r = self.http.post(f"/{db}/_bulk_docs", content=json.dumps({"docs": docs}))
        assert r.status_code == 201, r.text
        return r.json()

    def put(self, db: str, doc: dict) -> str:
        r = self.http.put(f"/{db}/{doc['_id']}", content=json.dumps(doc))
        assert r.status_code == 201, r.text
        return r.json()["rev"]

    def get(self, db: str, doc_id: str) -> dict:
        return self.http.get(f"/{db}/{doc_id}").json()

    def delete(self, db: str, doc_id: str) -> str:
        rev = self.get(db, doc_id)["_rev"]
        r = self.http.delete(f"/{db}/{doc_id}", params={"rev": rev})
        assert r.status_code == 200, r.text
        return r.json()["rev"]

    def state(self, db: str) -> dict[str, tuple[str, bool]]:
        """{_id: (winning rev, deleted)} for every document, tombstones included."""
        r = self.http.get(f"/{db}/_changes", params={"style": "main_only"})
        r.raise_for_status()
        return {
            c["id"]: (c["changes"][0]["rev"], bool(c.get("deleted")))
            for c in r.json()["results"]
        }


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `cut()` resets every open connection."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.refusing = False
        self.frozen = threading.Event()  # set: bytes are held, connections stay open (a hung host)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen.is_set() and not self.closed:
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Reset every connection now open; return how many were cut."""
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            # shutdown first: close() alone does not wake a thread blocked in recv() on the
            # socket, and the peer would never learn that the connection is gone.
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        return len(conns) // 2

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.cut()
