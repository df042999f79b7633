"""Local servers (embedded PostgreSQL 18, pouchdb-server) and `chtsync demo` end to end."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from chtsync import demo as sample
from chtsync import localservers, paths


def test_embedded_postgres_18_starts_and_stops(tmp_path: Path) -> None:
    pg = localservers.EmbeddedPostgres(tmp_path / "pgdata").start()
    try:
        pid = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        pg.create_database("demo")
        pg.create_database("demo")  # idempotent
        with psycopg.connect(**pg.conninfo("demo")) as conn:
            assert conn.info.server_version >= 180000
        assert (pg.bin_dir / "psql").exists()
    finally:
        pg.stop()
    assert not _alive(pid)
    pg.stop()  # harmless when already stopped


def test_pouchdb_server_from_the_checkout(tmp_path: Path) -> None:
    binary = localservers.pouchdb_bin(install=False)
    assert binary == paths.home() / "node_modules" / ".bin" / "pouchdb-server"
    server = localservers.PouchDBServer(tmp_path / "pouch").start()
    try:
        assert httpx.put(f"{server.url}/x", auth=server.auth).status_code == 201
        assert httpx.put(f"{server.url}/y", auth=(server.auth[0], "wrong")).status_code == 401
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url, timeout=2)
    server.stop()


def test_missing_node_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(localservers.LocalServerError, match=r"Node\.js"):
        localservers.pouchdb_bin()


def test_demo_end_to_end(tmp_path: Path) -> None:
    """`chtsync demo --docs 2000 --seconds 5`: every model holds what the generator promised."""
    data_dir, summary_file = tmp_path / "demo", tmp_path / "summary.json"
    demo = Demo(
        ["--docs", "2000", "--seconds", "5", "--data-dir", str(data_dir), "--keep", "--summary-json", str(summary_file)]
    )
    try:
        demo.wait_for("press Ctrl-C", timeout=240)
        summary = json.loads(summary_file.read_text())
        counts = sample.expected_counts(2000, 1)
        net = summary["trickle"]["created"] - summary["trickle"]["deleted"]
        assert summary["trickle"]["created"] > 10 and summary["trickle"]["errors"] == 0
        expected = dict(counts.models)
        expected["data_record"] += net
        # pouchdb-server's _users holds _design/_auth, as CouchDB's does: it is synced too.
        expected["document_metadata"] += net + 1
        with psycopg.connect(**summary["postgres"]) as conn:
            rows = {
                name: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("v1", name))).fetchone()[0]
                for name in expected
            }
            errors = conn.execute("SELECT count(*) FROM v1.chtsync_errors").fetchone()[0]
            versions = conn.execute("SHOW server_version_num").fetchone()[0]
        assert rows == expected
        assert {name: m["rows"] for name, m in summary["models"].items() if name in expected} == rows
        assert errors == summary["errors"] == counts.refused == 1, "only the deliberately bad document"
        assert int(versions) >= 180000, "the demo's own PostgreSQL 18, not the system one"
        assert summary["ok"] is True
        assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"]
        assert [s["docs"] for s in summary["sources"]] == [
            counts.by_db["medic"] - counts.refused,
            counts.by_db["medic-users-meta"],
            counts.by_db["_users"] + 1,
        ]
        assert "psql" in demo.text() and "every checked model holds what was written" in demo.text()
        # The example form model and its data tests (sql/models.yaml).
        form = summary["models"]["pregnancy_home_visit"]
        assert form["rows"] == form["expected"] >= counts.forms["pregnancy_home_visit"] - summary["trickle"]["deleted"]
        assert {(t["name"], t["status"]) for t in summary["tests"]} == {
            ("casts", "pass"), ("accepted_values_visit_option", "pass")}
        assert "Data test pregnancy_home_visit.casts: pass" in demo.text()
        pouch_port = int(demo.text().split("at http://127.0.0.1:")[1].split()[0])
    finally:
        demo.interrupt()
    assert demo.proc.returncode == 0, demo.text()
    _assert_stopped(data_dir / "pgdata", pouch_port)
    assert (data_dir / "pgdata" / "PG_VERSION").exists(), "--keep keeps the data"


@pytest.mark.parametrize(
    ("docs", "moment"),
    [(40_000, "pouchdb-server (in memory) ready"), (2000, "Synced and modelled")],
    ids=["while-loading", "while-live"],
)
def test_ctrl_c_leaves_nothing_running(tmp_path: Path, docs: int, moment: str) -> None:
    data_dir = tmp_path / "demo"
    demo = Demo(["--docs", str(docs), "--seconds", "60", "--data-dir", str(data_dir)])
    try:
        demo.wait_for(moment, timeout=180)
        pouch_port = int(demo.text().split("at http://127.0.0.1:")[1].split()[0])
        time.sleep(1.0)  # pacing: Ctrl-C a moment into that phase, not at its first line
    finally:
        demo.interrupt()
    assert demo.proc.returncode == 130, demo.text()
    assert "Interrupted" in demo.text()
    _assert_stopped(data_dir / "pgdata", pouch_port)
    assert data_dir.exists() and not (data_dir / "pgdata").exists(), "only the demo's own folders go"


class Demo:
    """`chtsync demo` as a subprocess, its output collected line by line."""

    def __init__(self, args: list[str]) -> None:
        self.lines: list[str] = []
        self.queue: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chtsync", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=paths.home(),
            env={**os.environ, "COLUMNS": "200"},
            # as from a terminal: a shell's background job (a CI started with `&`) ignores
            # SIGINT, and an ignored signal stays ignored across exec, so Ctrl-C would be lost
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line)

    def text(self) -> str:
        while not self.queue.empty():
            self.lines.append(self.queue.get())
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                self.reader.join(10)  # its last lines
                pytest.fail(f"demo exited with {self.proc.returncode} before {needle!r}:\n{self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {needle!r} within {timeout} s:\n{self.text()}")
            time.sleep(0.2)

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)  # the output ends when the process and its children close it
        self.text()


def _assert_stopped(pgdata: Path, pouch_port: int) -> None:
    assert not (pgdata / "postmaster.pid").exists(), "PostgreSQL was stopped"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            assert str(pgdata) not in cmdline, f"a server is still running: {cmdline}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", pouch_port)) != 0, "pouchdb-server was stopped"


def _alive(pid: int) -> bool:
    """Running, not a zombie (in a container, PID 1 may never reap the exited postmaster)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
