"""`chtsync run` end to end as a subprocess: real Postgres, real CouchDB 3.4, models refreshed
by the service itself, status and metrics read while it runs, clean SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psycopg

from chtsync import db, state
from tests.conftest import PG_HOST, PG_PORT, make_config
from tests.servers import CouchAdmin, TcpProxy, free_port
from tests.syncutil import assert_equal, wait_until


def report(i: int, form: str = "delivery") -> dict:
    return {"_id": f"report-{i}", "type": "data_record", "form": form,
            "reported_date": 1735689600000 + i * 60000, "contact": {"_id": "chw-1"}}


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name}{{{want}}} not found")


def test_run_end_to_end(couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection, tmp_path) -> None:
    couch.create_db("medic")
    couch.bulk("medic", [report(i) for i in range(300)])
    port = free_port()
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1],
               COUCHDB_DBS="medic", POSTGRES_HOST=PG_HOST, POSTGRES_PORT=str(PG_PORT), POSTGRES_USER="postgres",
               POSTGRES_DB=dbname, METRICS_PORT=str(port), METRICS_HOST="127.0.0.1", CHTSYNC_CONFIG=os.devnull,
               LOG_LEVEL="DEBUG")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env, stdout=log, stderr=log)
    try:
        def models_have(n: int) -> bool:
            try:
                return pg.execute("SELECT count(*) FROM data_record").fetchone()[0] == n
            except psycopg.errors.UndefinedTable:
                return False

        wait_until(lambda: models_have(300), timeout=60, what="initial models")
        # A new report reaches the model through the service alone (no refresh call here).
        couch.put("medic", report(1000, form="pnc_visit"))
        took = wait_until(lambda: models_have(301), timeout=20, what="new report in data_record")
        assert took < 10
        # An edit and a delete too.
        doc = couch.get("medic", "report-1")
        doc["form"] = "edited_form"
        couch.put("medic", doc)
        couch.delete("medic", "report-2")
        wait_until(lambda: models_have(300) and pg.execute(
            "SELECT form FROM data_record WHERE uuid = 'report-1'").fetchone() == ("edited_form",),
            timeout=20, what="edit and delete in data_record")

        status = subprocess.run([sys.executable, "-m", "chtsync", "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        doc = json.loads(status.stdout)
        (src,) = doc["sources"]
        assert src["source"] == "127.0.0.1/medic" and src["state"] == "following"
        assert src["docs"] == 300 and src["deleted"] == 1 and src["pending"] == 0
        assert src["owner"] and src["lag_seconds"] == 0
        models = {m["name"]: m for m in doc["models"]}
        assert models["data_record"]["rows"] == 300 and models["data_record"]["status"] == "ok"

        def metrics_text() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

        wait_until(lambda: metric(metrics_text(), "chtsync_model_rows", model="data_record") == 300,
                   timeout=20, what="model rows metric")
        text = metrics_text()
        assert metric(text, "chtsync_source_up", source="127.0.0.1/medic") == 1
        assert metric(text, "chtsync_docs_written_total", source="127.0.0.1/medic") == 303
        assert metric(text, "chtsync_source_pending", source="127.0.0.1/medic") == 0
        # The seq's number is CouchDB's own hint (a sum over shards), not a count chtsync makes up.
        update_seq = str(couch.http.get("/medic").json()["update_seq"])
        assert metric(text, "chtsync_source_seq_number", source="127.0.0.1/medic") == int(update_seq.split("-")[0])
        assert metric(text, "chtsync_source_lag_seconds", source="127.0.0.1/medic") == 0
        assert metric(text, "chtsync_model_last_success_timestamp", model="data_record") > time.time() - 120
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200 and ready.json()["sources"] == {"127.0.0.1/medic": "following"}

        # A last write, then SIGTERM: clean exit within 10 s and nothing lost.
        couch.put("medic", report(2000))
        wait_until(lambda: pg.execute("SELECT 1 FROM couchdb WHERE _id = 'report-2000'").fetchone() is not None,
                   timeout=20, what="the last write in the raw table")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_equal(pg, couch, "medic", "127.0.0.1/medic")
    output = log_path.read_text()
    assert "SIGTERM received" in output and "stopped" in output
    # Secrets: the CouchDB password appears nowhere in a full debug run's output.
    assert couch_server.auth[1] not in output + status.stdout + status.stderr + text


def test_models_wait_for_the_initial_sync(couch: CouchAdmin, couch_server, dbname: str, pg: psycopg.Connection,
                                          tmp_path) -> None:
    """A catch-up with more pending than CHTSYNC_HOLD_PENDING: the models wait (said in the log
    and in status), then each is built once from (nearly) every document, not re-derived round
    after round while the sync runs."""
    docs, hold, batch = 3000, 300, 20
    couch.create_db("medic")
    for start in range(0, docs, 1000):
        couch.bulk("medic", [report(i) for i in range(start, start + 1000)])
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST=PG_HOST,
               POSTGRES_PORT=str(PG_PORT), POSTGRES_USER="postgres", POSTGRES_DB=dbname,
               CHTSYNC_CONFIG=os.devnull, BATCH_SIZE=str(batch), CHTSYNC_HOLD_PENDING=str(hold),
               DATAEMON_INTERVAL="1", LOG_LEVEL="INFO")
    cfg = make_config(dbname, couch_server.url, CHTSYNC_HOLD_PENDING=str(hold))
    waits: list[tuple[str, int]] = []  # (status's models_wait, data_record rows just before)

    def models_built() -> bool:
        try:
            rows = pg.execute("SELECT count(*) FROM data_record").fetchone()[0]
            # Read after the rows: while status says "wait", no round has built data_record yet.
            wait = state.gather(cfg, pg, counts=False)["models_wait"]
        except psycopg.errors.UndefinedTable:
            return False
        if wait:
            waits.append((wait, rows))
        # built and recorded (a first build's rows are committed before the round records it)
        recorded = pg.execute("SELECT last_status = 'ok' FROM chtsync_models WHERE name = 'data_record'").fetchone()
        return rows == docs and recorded == (True,)

    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env, stdout=log, stderr=log)
    try:
        wait_until(models_built, timeout=120, what="data_record built")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    output = log_path.read_text()
    assert waits and all(rows == 0 for _, rows in waits), waits
    assert waits[0][0].startswith("models wait for the initial sync (127.0.0.1/medic: ")
    held = output.index("models wait for the initial sync (127.0.0.1/medic: ")
    done = output.index("models refresh: the initial sync is done")
    assert held < done
    # No model refreshed while the sync ran; data_record built once, from all but the last
    # pending changes (the hold ends at `hold` pending; a page or more may land meanwhile).
    assert "model refreshed" not in output[held:done]
    # built once: alone in one statement, or in a group reading each range once (as timed)
    assert len(re.findall(r"model built name=data_record |model build shared done names=(?:\S+,)?data_record[ ,]",
                          output)) == 1, output
    first = re.search(r"model refreshed name=data_record kind=incremental rows=(\d+) changed=None", output)
    assert first and int(first.group(1)) >= docs - hold - batch, first


def test_healthz_waits_for_postgres_migrations_and_models(couch: CouchAdmin, couch_server, dbname: str,
                                                         pg: psycopg.Connection, tmp_path) -> None:
    """/healthz is what a container health check and compose's `service_healthy` wait for: 503
    while Postgres is not up yet (chtsync waits for it), 200 only once the model plan is applied,
    so superset-import never starts before the models exist. A SIGTERM during that wait stops
    `run` and `sync` at once."""
    couch.create_db("medic")
    couch.bulk("medic", [report(i) for i in range(10)])
    proxy = TcpProxy(PG_HOST, PG_PORT)
    proxy.refusing = True  # accepts and hangs up at once, as a Postgres still starting does
    port = free_port()
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST="127.0.0.1",
               POSTGRES_PORT=str(proxy.port), POSTGRES_USER="postgres", POSTGRES_DB=dbname,
               CHTSYNC_CONFIG=os.devnull, METRICS_PORT=str(port), LOG_LEVEL="INFO")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env, stdout=log, stderr=log)
    procs = [proc]

    def healthz() -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        except httpx.TransportError:
            return None

    try:
        wait_until(lambda: "retrying in" in log_path.read_text(), timeout=30, what="the wait for Postgres")
        answer = healthz()
        assert answer is not None and answer.status_code == 503 and b"preparing" in answer.content
        # `docker compose stop` while Postgres is still away: a clean exit at once, not a SIGKILL
        # 30 s later. `sync` waits the same way.
        for command in (["run"], ["sync"]):
            other_log = tmp_path / f"{command[0]}-stopped.log"
            with open(other_log, "w") as log:
                other = subprocess.Popen([sys.executable, "-m", "chtsync", *command], stdout=log, stderr=log,
                                         env=dict(env, METRICS_PORT=""))
            procs.append(other)
            wait_until(lambda path=other_log: "retrying in" in path.read_text(), timeout=30, what=f"{command} waiting")
            other.send_signal(signal.SIGTERM)
            assert other.wait(10) == 0, other_log.read_text()  # before the fix: waited for Postgres
        proxy.refusing = False
        wait_until(lambda: (r := healthz()) is not None and r.status_code == 200, timeout=60, what="healthy")
        # Healthy implies the models are there (created empty or built: either way they exist).
        assert pg.execute("SELECT to_regclass('data_record') IS NOT NULL").fetchone() == (True,)
        assert pg.execute("SELECT count(*) FROM chtsync_models").fetchone()[0] > 10
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        for p in procs:  # none left behind, whatever failed
            if p.poll() is None:
                p.kill()
        proxy.close()


def test_a_stop_while_another_chtsync_holds_the_migration_lock(couch: CouchAdmin, couch_server, dbname: str,
                                                               pg: psycopg.Connection, tmp_path) -> None:
    """Another replica migrating or rebuilding holds the lock `run` and `sync` wait for at start:
    a SIGTERM then ends them at once (the wait is abandoned), not when the lock comes free."""
    couch.create_db("medic")
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST=PG_HOST,
               POSTGRES_PORT=str(PG_PORT), POSTGRES_USER="postgres", POSTGRES_DB=dbname,
               CHTSYNC_CONFIG=os.devnull, LOG_LEVEL="INFO")
    key = (db.LOCK_CLASS, db.lock_key(make_config(dbname, couch_server.url), "migrate"))
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname=dbname, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", key)

        def waiting() -> int:
            return pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                              ).fetchone()[0]

        for command in ("run", "sync"):
            before = waiting()
            log_path = tmp_path / f"{command}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen([sys.executable, "-m", "chtsync", command], env=env, stdout=log, stderr=log)
            try:
                # waiting on the lock: its session shows in pg_stat_activity
                wait_until(lambda: waiting() == before + 1, timeout=30,  # noqa: B023
                           what=f"{command} waiting for the migration lock")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0, log_path.read_text()  # before the fix: until the lock was free
                assert "Traceback" not in log_path.read_text()
            finally:
                if proc.poll() is None:
                    proc.kill()
        # An abandoned wait ends when the lock comes free: its session finds its client gone.
        holder.execute("SELECT pg_advisory_unlock(%s, %s)", key)
    wait_until(lambda: pg.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0,
               timeout=10, what="no session left holding or waiting for the lock")


def test_a_second_stop_ends_run_while_postgres_hangs(couch: CouchAdmin, couch_server, dbname: str,
                                                    pg: psycopg.Connection, tmp_path) -> None:
    """Postgres stops answering but keeps its connections open (a hung host): the first SIGTERM
    cannot finish the page in flight; the second ends the process at once, and nothing is lost
    (the next run writes the page again)."""
    couch.create_db("medic")
    couch.bulk("medic", [report(i) for i in range(20)])
    proxy = TcpProxy(PG_HOST, PG_PORT)
    env = dict(os.environ, COUCHDB_URL=couch_server.url, COUCHDB_USER=couch_server.auth[0],
               COUCHDB_PASSWORD=couch_server.auth[1], COUCHDB_DBS="medic", POSTGRES_HOST="127.0.0.1",
               POSTGRES_PORT=str(proxy.port), POSTGRES_USER="postgres", POSTGRES_DB=dbname,
               CHTSYNC_CONFIG=os.devnull, LOG_LEVEL="INFO")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chtsync", "run"], env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: pg.execute("SELECT count(*) FROM couchdb").fetchone()[0] == 20, timeout=60,
                   what="the first documents")
        wait_until(lambda: "refresh round" in log_path.read_text(), timeout=60, what="a refresh round")
        proxy.frozen.set()
        couch.bulk("medic", [report(i) for i in range(20, 40)])  # a page that cannot be written now
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 1, log_path.read_text()  # before the fix: hung with Postgres
        assert "second SIGTERM: exiting now" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    r = subprocess.run([sys.executable, "-m", "chtsync", "sync", "--once"], env=dict(env, POSTGRES_PORT=str(PG_PORT)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert_equal(pg, couch, "medic", "127.0.0.1/medic")
