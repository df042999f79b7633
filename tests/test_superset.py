"""The Superset bundle: built offline, then imported into a real Superset and checked end to end.

The end-to-end test installs (or reuses) a pinned Superset in its own venv, fills Postgres from
the sample generator through the ingest function and the pipeline, runs `chtsync superset import`
and compares every chart's data, asked through Superset's REST API, with SQL on the models.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import re
import shutil
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from chtsync import cli, db, logs
from chtsync import superset as ss
from chtsync.config import Config
from tests.conftest import make_config

SAMPLE_N = 3000
SAMPLE_SEED = 11
PAGE = 1000


# --- offline: the bundle -----------------------------------------------------------------------


def _files(schema: str = "v1", uri: str = "postgresql://chtsync:pw@db:5432/cht") -> dict[str, Any]:
    return ss.build_files(schema, ss.DatabaseURI.parse(uri))


def _columns_used(query: dict[str, Any]) -> Iterator[str]:
    for col in query.get("columns", []):
        yield col["sqlExpression"] if isinstance(col, dict) else col
    for f in query.get("filters", []):
        yield f["col"]


def test_bundle_references_resolve() -> None:
    files = _files()
    datasets = {f["uuid"]: f for n, f in files.items() if n.startswith("datasets/")}
    charts = {n: f for n, f in files.items() if n.startswith("charts/")}
    (dash,) = [f for n, f in files.items() if n.startswith("dashboards/")]
    assert len(datasets) >= 8 and len(charts) >= 10
    for name, chart in charts.items():
        ds = datasets[chart["dataset_uuid"]]
        columns = {c["column_name"] for c in ds["columns"]}
        metrics = {m["metric_name"] for m in ds["metrics"]}
        qc = json.loads(chart["query_context"])
        assert qc["form_data"]["viz_type"] == chart["viz_type"], name
        for query in qc["queries"]:
            assert set(_columns_used(query)) <= columns, name
            assert set(query.get("metrics", [])) <= metrics, name
            for key, _ in query.get("orderby", []):
                assert key in metrics | columns, name
        # The browser builds its query from params: they must name the same things.
        params = chart["params"]
        used = {*params.get("metrics", []), *([params["metric"]] if "metric" in params else [])}
        assert used <= metrics, name
        for key in ("groupby", "all_columns"):
            assert set(params.get(key, [])) <= columns, name
        for f in params.get("adhoc_filters", []):
            if f["expressionType"] == "SIMPLE":
                assert f["subject"] in columns, name
    # Every chart is on the dashboard exactly once, with its uuid.
    placed = [v["meta"]["uuid"] for v in dash["position"].values()
              if isinstance(v, dict) and v.get("type") == "CHART"]
    assert sorted(placed) == sorted(c["uuid"] for c in charts.values())
    filters = dash["metadata"]["native_filter_configuration"]
    assert {f["name"] for f in filters} == {"Time range", "District", "Health facility"}
    for f in filters:
        for target in f["targets"]:
            if target:
                ds = next(d for d in datasets.values() if d["uuid"] == target["datasetUuid"])
                assert target["column"]["name"] in {c["column_name"] for c in ds["columns"]}


def test_zip_layout_and_masked_password(tmp_path: Path) -> None:
    files = _files(uri="postgresql://reader:s3cr%40t@db.example.org:5433/cht?sslmode=require")
    data = ss.to_zip(files)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
        assert all(n.startswith(f"{ss.ZIP_ROOT}/") for n in names)
        assert f"{ss.ZIP_ROOT}/metadata.yaml" in names
        database = yaml.safe_load(zf.read(f"{ss.ZIP_ROOT}/{ss.DATABASE_FILE}"))
        everything = b"".join(zf.read(n) for n in names)
    assert database["sqlalchemy_uri"] == (
        "postgresql+psycopg2://reader:XXXXXXXXXX@db.example.org:5433/cht?sslmode=require"
    )
    assert b"s3cr" not in everything
    # One zip per import endpoint, each with the type that endpoint checks.
    absent = {"Database": "datasets/", "SqlaTable": "charts/", "Slice": "dashboards/"}
    for kind, prefix in absent.items():
        with zipfile.ZipFile(io.BytesIO(ss.to_zip(files, kind))) as zf:
            assert yaml.safe_load(zf.read(f"{ss.ZIP_ROOT}/metadata.yaml"))["type"] == kind
            assert not [n for n in zf.namelist() if n.startswith(f"{ss.ZIP_ROOT}/{prefix}")]


def test_schema_is_substituted() -> None:
    files = _files(schema="cht_prod")
    for name, f in files.items():
        if name.startswith("datasets/"):
            assert f["schema"] == "cht_prod"
            if f.get("sql"):
                assert "v1." not in f["sql"] and "cht_prod." in f["sql"], name
    assert ss.substitute_schema('FROM v1."user" u JOIN v1.data_record', "Cht") == (
        'FROM "Cht"."user" u JOIN "Cht".data_record'
    )
    # Only schema qualifiers change, never a column or alias that happens to end in v1.
    assert ss.substitute_schema("SELECT xv1.a, 'v1.x' FROM v1.t", "s") == (
        "SELECT xv1.a, 's.x' FROM s.t"
    )


def test_database_uri_from_config() -> None:
    cfg = make_config("chtdb", POSTGRES_PASSWORD="pa:ss/word", POSTGRES_HOST="postgres")
    uri = ss.DatabaseURI.from_config(cfg)
    assert uri.masked == "postgresql+psycopg2://postgres:XXXXXXXXXX@postgres:5432/chtdb"
    assert uri.password == "pa:ss/word"
    trusting = ss.DatabaseURI.from_config(make_config("chtdb"))
    assert trusting.password is None and ":XXXXXXXXXX" not in trusting.masked


def _config_file(tmp_path: Path, dbname: str, **postgres: str) -> Path:
    cfg = {
        "couchdb": {"url": "http://127.0.0.1:9", "dbs": "medic"},
        "postgres": {"host": "127.0.0.1", "port": 5432, "user": "postgres", "db": dbname,
                     **postgres},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> tuple[int, str, str]:
    """chtsync's command line in-process, output captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(args))
    finally:
        logs.setup()  # the CLI's log handler wrote to `err`: back to the real stderr
    return rc, out.getvalue(), err.getvalue()


def test_bundle_command(tmp_path: Path) -> None:
    config = _config_file(tmp_path, "cht", schema="cht_prod", password="hunter22")
    out = tmp_path / "cht.zip"
    rc, stdout, stderr = _cli("superset", "bundle", "--config", str(config), "--out", str(out))
    assert rc == 0, stderr
    assert "hunter22" not in stdout + stderr
    with zipfile.ZipFile(out) as zf:
        ds = yaml.safe_load(zf.read(f"{ss.ZIP_ROOT}/datasets/chtsync/cht_reports.yaml"))
        assert ds["schema"] == "cht_prod"
        assert b"hunter22" not in b"".join(zf.read(n) for n in zf.namelist())


def test_import_unreachable_url(tmp_path: Path) -> None:
    from tests.superset_env import free_port

    config = _config_file(tmp_path, "cht")
    url = f"http://127.0.0.1:{free_port()}"
    rc, _, err = _import(config, url, "--user", "admin", "--password", "nope")
    err = err.strip()
    assert rc == 1
    assert err.startswith("chtsync superset import: cannot reach Superset at") and "\n" not in err


# --- end to end: a real Superset ---------------------------------------------------------------


def _changes_pages(docs: list[dict[str, Any]], start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """CouchDB _changes bodies of PAGE changes each, as the follower receives them."""
    for i in range(0, len(docs), PAGE):
        chunk = docs[i:i + PAGE]
        results = []
        for j, doc in enumerate(chunk):
            rev = doc.get("_rev") or f"1-{abs(hash(doc['_id'])) % 10**12:012x}"
            results.append({"seq": start + i + j, "id": doc["_id"], "changes": [{"rev": rev}],
                            "doc": {**doc, "_rev": rev}})
        yield len(chunk), {"results": results, "last_seq": str(start + i + len(chunk))}


def ingest_sample(pg: psycopg.Connection, n: int, seed: int, end_ms: int) -> Counter[str]:
    """The sample, through the real ingest function, one transaction per _changes page."""
    from chtsync import demo as sample

    by_db: dict[str, list[dict[str, Any]]] = {}
    for couch_db, doc in sample.generate(n, seed, end_ms=end_ms, bad=False):
        by_db.setdefault(couch_db, []).append(doc)
    written: Counter[str] = Counter()
    for couch_db, docs in by_db.items():
        for _, page in _changes_pages(docs, 1):
            with pg.transaction():
                row = pg.execute(
                    "SELECT * FROM chtsync_ingest_v2('v1.couchdb'::regclass, %s, %s::jsonb, %s)",
                    (f"localhost/{couch_db}", json.dumps(page), PAGE),
                ).fetchone()
            written[couch_db] += row[3]
    return written


def build_models(cfg: Config) -> None:
    """Create and refresh the models with the pipeline engine, as `chtsync run` does."""
    from chtsync import pipeline

    with db.connect(cfg) as conn:
        pipeline.apply(cfg, conn)
        results = pipeline.refresh_once(cfg, conn, force=True)
    failed = {r.name: r.error for r in results if r.status in ("error", "blocked")}
    assert not failed, failed


def _window(result: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    """The time range Superset applied, as it reports it (naive UTC)."""
    def parse(v: Any) -> dt.datetime:
        if isinstance(v, (int, float)):
            return dt.datetime.fromtimestamp(v / 1000, dt.UTC).replace(tzinfo=None)
        return dt.datetime.fromisoformat(str(v)).replace(tzinfo=None)

    return parse(result["from_dttm"]), parse(result["to_dttm"])


def _ms(value: dt.datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1000)


def _rows(pg: psycopg.Connection, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in pg.execute(sql, params).fetchall()]


def _norm(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return _ms(value)
    if hasattr(value, "is_integer") or type(value).__name__ == "Decimal":
        f = float(value)
        return int(f) if f.is_integer() else round(f, 1)
    return value


def _same(api: list[dict[str, Any]], keys: list[str], expected: list[tuple[Any, ...]]) -> None:
    got = sorted((tuple(_norm(r[k]) for k in keys) for r in api), key=repr)
    want = sorted((tuple(_norm(v) for v in row) for row in expected), key=repr)
    assert got == want


# Per chart (by file name): the SQL on the models that must give the chart's rows. Charts with
# a window get Superset's applied bounds as parameters.
LAST30 = "reported >= %s AND reported < %s"
EXPECTED: dict[str, tuple[list[str], str, bool]] = {
    "reports_last_30_days": (["reports"], f"SELECT count(*) FROM data_record WHERE {LAST30}", True),
    "active_users_30_days": (
        ["active_users"],
        "SELECT count(DISTINCT u.user_id) FROM \"user\" u JOIN data_record d"
        f" ON d.contact_uuid = u.contact_uuid WHERE {LAST30}", True),
    "users": (["users"], 'SELECT count(*) FROM "user"', False),
    "people_registered": (
        ["people"], "SELECT count(*) FROM person JOIN contact USING (uuid)", False),
    "reports_per_form_weekly": (
        ["day", "form", "reports"],
        "SELECT date_trunc('week', day), form, sum(count) FROM reports_by_form_daily"
        " WHERE day >= %s AND day < %s GROUP BY 1, 2", True),
    "people_per_place_level": (
        ["place_level", "people"],
        "SELECT coalesce(h.parent_1_type, 'no place'), count(*) FROM person p"
        " JOIN contact c ON c.uuid = p.uuid LEFT JOIN contact_hierarchy h ON h.uuid = p.uuid"
        " GROUP BY 1", False),
    "pregnancy_delivery_over_time": (
        ["reported", "form", "reports"],
        "SELECT date_trunc('month', reported), form, count(*) FROM data_record"
        " WHERE form LIKE 'pregnancy%%' OR form LIKE 'delivery%%' GROUP BY 1, 2", False),
    "reports_per_health_facility": (
        ["health_facility_name", "reports"],
        "SELECT h.health_facility_name, count(*) FROM data_record d"
        f" LEFT JOIN contact_hierarchy h ON h.uuid = d.contact_uuid WHERE {LAST30} GROUP BY 1",
        True),
    "reports_per_health_worker": (
        ["health_worker", "health_facility_name", "reports"],
        "SELECT coalesce(h.name, d.contact_uuid), h.health_facility_name, count(*)"
        " FROM data_record d LEFT JOIN contact_hierarchy h ON h.uuid = d.contact_uuid"
        f" WHERE {LAST30} GROUP BY 1, 2", True),
    "active_users_table": (
        ["username", "contact_name", "health_facility_name", "reports", "last_report"],
        "SELECT replace(u.user_id, 'org.couchdb.user:', ''), h.name, h.health_facility_name,"
        " count(*), max(d.reported) FROM \"user\" u"
        " JOIN data_record d ON d.contact_uuid = u.contact_uuid"
        " LEFT JOIN contact_hierarchy h ON h.uuid = u.contact_uuid"
        f" WHERE {LAST30} GROUP BY 1, 2, 3", True),
    "source_freshness": (
        ["source", "state", "pending", "docs_written"],
        "SELECT p.source, s.state, p.pending, s.docs_written FROM couchdb_progress p"
        " LEFT JOIN chtsync_sources s USING (source)", False),
    "model_freshness": (
        ["name", "kind", "last_status", "last_rows"],
        "SELECT name, kind, last_status, last_rows FROM chtsync_models", False),
}


def _import(config: Path, url: str, *extra: str) -> tuple[int, str, str]:
    """`chtsync superset import` as a user runs it."""
    return _cli("superset", "import", "--config", str(config), "--url", url, *extra)


@pytest.mark.slow
def test_superset_end_to_end(dbname: str, pg: psycopg.Connection, tmp_path: Path) -> None:
    from tests import superset_env

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    venv = superset_env.ensure_venv()
    timings["venv"] = time.monotonic() - t0

    # Superset's own set-up (~25 s of CLI start-ups) runs while Postgres fills.
    server = superset_env.Superset(tmp_path / "superset", venv)
    boot_error: list[BaseException] = []

    def boot() -> None:
        try:
            server.init().start()
        except BaseException as exc:
            boot_error.append(exc)

    booting = threading.Thread(target=boot)
    booting.start()
    try:
        t1 = time.monotonic()
        end_ms = int(time.time() * 1000)
        written = ingest_sample(pg, SAMPLE_N, SAMPLE_SEED, end_ms)
        assert sum(written.values()) == SAMPLE_N
        cfg = make_config(dbname)
        build_models(cfg)
        timings["data"] = time.monotonic() - t1
        booting.join()
        if boot_error:
            raise boot_error[0]
        timings["superset ready"] = time.monotonic() - t0
        _check_superset(server, pg, dbname, tmp_path)
        timings["total"] = time.monotonic() - t0
        print("superset e2e timings (s):", {k: round(v, 1) for k, v in timings.items()})
        shot = os.environ.get("CHTSYNC_SCREENSHOT")
        if shot:
            n_charts = len(list((ss.bundle_dir() / "charts").glob("*.yaml")))
            superset_env.screenshot(server, "cht-overview", Path(shot), charts=n_charts)
    finally:
        booting.join()
        server.stop()


def _check_superset(server: Any, pg: psycopg.Connection, dbname: str, tmp_path: Path) -> None:
    from tests.superset_env import ADMIN_PASSWORD, ADMIN_USER

    config = _config_file(tmp_path, dbname)
    login = ["--user", ADMIN_USER, "--password", ADMIN_PASSWORD]

    # First import: creates everything and every chart answers.
    rc, out, err = _import(config, server.url, *login)
    assert rc == 0, out + err
    assert "12/12 charts answered" in out or re.search(r"(\d+)/\1 charts answered", out), out

    api = ss.Superset(server.url)
    api.login(ADMIN_USER, ADMIN_PASSWORD)
    try:
        counts = api.counts()
        assert counts["dashboard"] == 1 and counts["database"] == 1
        files = _files()
        n_charts = sum(1 for n in files if n.startswith("charts/"))
        n_datasets = sum(1 for n in files if n.startswith("datasets/"))
        assert (counts["chart"], counts["dataset"]) == (n_charts, n_datasets)

        # Importing again changes nothing: same objects, same ids.
        dash_id = api.dashboard("cht-overview")["id"]
        chart_ids = sorted(c["id"] for c in api.dashboard_charts(dash_id))
        rc, out, err = _import(config, server.url, *login)
        assert rc == 0, out + err
        assert api.counts() == counts
        assert api.dashboard("cht-overview")["id"] == dash_id
        assert sorted(c["id"] for c in api.dashboard_charts(dash_id)) == chart_ids
        assert "(+" not in out

        _check_tables_listed(api, files)
        _check_chart_data(api, pg)

        # A read-only role works as the dashboard's connection, and re-pointing is idempotent.
        _check_read_only_role(api, pg, config, server.url, login, counts)

        # Clear one-line errors.
        rc, out, err = _import(config, server.url, "--user", ADMIN_USER, "--password", "not-the-password")
        assert rc == 1 and "wrong user name or password" in err and err.count("\n") == 1, err
        rc, out, err = _import(config, server.url + "/nothing", *login)
        assert rc == 1 and "no Superset API" in err and err.count("\n") == 1, err
        _check_refused_bundle(config, server.url, login, tmp_path)
        assert api.counts() == counts
    finally:
        api.close()


def _check_tables_listed(api: ss.Superset, files: dict[str, Any]) -> None:
    (db,) = api.get("/api/v1/database/")["result"]
    listed = api.get(f"/api/v1/database/{db['id']}/tables/",
                     params={"q": "(schema_name:v1,force:!t)"})["result"]
    names = {t["value"] for t in listed}
    datasets = api.get("/api/v1/dataset/", params={"q": "(page_size:100)"})["result"]
    assert {d["table_name"] for d in datasets} == {
        f["table_name"] for n, f in files.items() if n.startswith("datasets/")
    }
    for name, f in files.items():
        if not name.startswith("datasets/"):
            continue
        needed = {f["table_name"]} if not f.get("sql") else {
            m.strip('"') for m in re.findall(r'\bv1\.("?\w+"?)', f["sql"])
        }
        assert needed <= names, (name, needed - names)


def _check_chart_data(api: ss.Superset, pg: psycopg.Connection) -> None:
    dash = api.dashboard("cht-overview")
    charts = {c["slice_name"]: c["id"] for c in api.dashboard_charts(dash["id"])}
    names = {yaml.safe_load(p.read_text())["slice_name"]: p.stem
             for p in (ss.bundle_dir() / "charts").glob("*.yaml")}
    assert set(charts) == set(names)
    nonempty = 0
    for slice_name, chart_id in charts.items():
        key = names[slice_name]
        keys, sql, windowed = EXPECTED[key]
        body = api.chart_data(chart_id)
        (result,) = body["result"]
        assert result.get("status") == "success" and not result.get("error"), (key, result)
        params: tuple[Any, ...] = _window(result) if windowed else ()
        if windowed:
            # Timestamps are compared as UTC instants, whatever the session's time zone.
            params = tuple(v.replace(tzinfo=dt.UTC) for v in params)
        expected = _rows(pg, sql, *params)
        _same(result["data"], keys, expected)
        nonempty += bool(result["data"]) and any(v for row in expected for v in row)
    assert nonempty == len(charts), "every chart should show data for the sample"


def _check_read_only_role(api: ss.Superset, pg: psycopg.Connection, config: Path, url: str,
                          login: list[str], counts: dict[str, int]) -> None:
    role = f"chtsync_ro_{os.getpid()}"
    pg.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        pg.execute(f'GRANT USAGE ON SCHEMA v1 TO "{role}"')
        pg.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA v1 TO "{role}"')
        dbname = pg.info.dbname
        uri = f"postgresql://{role}:ro-secret@127.0.0.1:5432/{dbname}"
        rc, out, err = _import(config, url, *login, "--database-uri", uri)
        assert rc == 0, out + err
        assert "ro-secret" not in out + err
        assert api.counts() == counts
        (db,) = api.get("/api/v1/database/")["result"]
        detail = api.get(f"/api/v1/database/{db['id']}/connection")["result"]
        assert f"{role}:XXXXXXXXXX@" in detail["sqlalchemy_uri"]
        # Back to the default connection for the rest of the test.
        rc, out, err = _import(config, url, *login)
        assert rc == 0, out + err
    finally:
        pg.execute(f'DROP OWNED BY "{role}"')
        pg.execute(f'DROP ROLE "{role}"')


def _check_refused_bundle(config: Path, url: str, login: list[str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(ss.bundle_dir(), home / "superset")
    chart = home / "superset" / "charts" / "users.yaml"
    data = yaml.safe_load(chart.read_text())
    data["viz_type"] = None  # Superset's schema requires a string
    chart.write_text(yaml.safe_dump(data))
    old = os.environ.get("CHTSYNC_HOME")
    os.environ["CHTSYNC_HOME"] = str(home)
    try:
        rc, _, err = _import(config, url, *login)
    finally:
        if old is None:
            os.environ.pop("CHTSYNC_HOME", None)
        else:
            os.environ["CHTSYNC_HOME"] = old
    assert rc == 1 and "Superset refused the chart bundle" in err and err.count("\n") == 1, err
