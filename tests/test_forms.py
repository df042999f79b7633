"""Form and contact-type models declared in YAML only, on the real CouchDB test bed: the sample
generator's reports are loaded into CouchDB, synced by chtsync's followers, and every form model
is compared with a hand-written SQL model of the same columns; edits, an uncastable value, a
deleted report and a report moved to another form keep each incremental table equal to a
rebuild. Also `chtsync models fields` against the generator's own fields, `models sql`, and the
safe cast functions (migrations/0013)."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from chtsync import cli, db
from chtsync import demo as sample
from chtsync import pipeline as engine
from chtsync.config import Config, ConfigError
from chtsync.demo import generator
from chtsync.pipeline import forms, graph
from chtsync.pipeline.models import load_file
from tests.syncutil import sync_once

N, SEED = 700, 3

# Per form: column -> (path under fields.<form>, type). Every type but timestamp (the sample has
# no ISO times in reports; test_safe_casts covers it).
FORM_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "assessment": {"temperature": ("group_fever.patient_temperature", "numeric"),
                   "fever_days": ("group_fever.fever_duration", "integer"),
                   "fever": ("group_fever.patient_fever", "boolean"),
                   "mrdt": ("group_fever.mrdt_result", "text"),
                   "referral": ("treatment.referral_follow_up", "boolean")},
    "pregnancy_home_visit": {"weeks": ("pregnancy_summary.weeks_since_lmp", "integer"),
                             "edd": ("pregnancy_summary.edd_8601", "date"),
                             "current_edd": ("pregnancy_summary.current_edd", "date"),
                             "bleeding": ("danger_signs.vaginal_bleeding", "boolean")},
    "delivery": {"delivery_date": ("delivery_outcome.delivery_date", "date"),
                 "babies_alive": ("delivery_outcome.babies_alive", "integer"),
                 "babies": ("babys_condition.baby_repeat", "text")},
    "pnc_visit": {"visit_day": ("visit_day", "integer"), "visit_number": ("pnc_visit_number", "integer")},
    "immunization_visit": {"vaccines": ("vaccines", "array"),
                           "received": ("group_immunization.received_vaccines", "array"),
                           "given": ("vaccines_given_count", "integer"),
                           "next_visit": ("group_immunization.next_visit_date", "date"),
                           "weight": ("group_growth.weight", "numeric")},
    "death_report": {"died_on": ("death_details.date_of_death", "date"),
                     "place_of_death": ("death_details.place_of_death", "text")},
    "household_survey": {"members": ("household.members", "integer"),
                         "has_latrine": ("household.has_latrine", "boolean")},
}

# What a hand-written model would write: plain casts (the sample's values are all clean).
HAND = {
    "text": "doc #>> {p}",
    "integer": "NULLIF(doc #>> {p}, '')::bigint",
    "numeric": "NULLIF(doc #>> {p}, '')::numeric",
    "boolean": "NULLIF(doc #>> {p}, '')::boolean",
    "date": "NULLIF(doc #>> {p}, '')::date",
    "array": "CASE jsonb_typeof(doc #> {p}) WHEN 'array' THEN ARRAY(SELECT jsonb_array_elements_text(doc #> {p}))"
             " ELSE string_to_array(doc #>> {p}, ' ') END",
}
COMMON = ("uuid", "reported", "form", "from_phone", "patient_id", "place_id", "contact_uuid", "parent_uuid",
          "grandparent_uuid", "source")


def _path(form: str, path: str) -> str:
    return "'{" + ",".join(["fields", form, *path.split(".")]) + "}'"


def models_yaml(path: Path, tests: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """A form model per generator form (YAML only), its hand-written twin (a view), a
    contact-type model for persons and the base data_record model."""
    models: list[dict[str, Any]] = []
    for form, fields in FORM_FIELDS.items():
        models.append({"name": f"f_{form}", "form": form,
                       "fields": {c: {"path": f"fields.{form}.{p}", "type": t} for c, (p, t) in fields.items()},
                       **({"tests": tests[form]} if tests and form in tests else {})})
        columns = ",\n  ".join(f"{HAND[t].format(p=_path(form, p))} AS {c}" for c, (p, t) in fields.items())
        (path.parent / f"hand_{form}.sql").write_text(
            f"SELECT _id AS uuid,\n  {columns}\nFROM couchdb\n"
            f"WHERE NOT _deleted AND doc ->> 'type' = 'data_record' AND doc ->> 'form' = '{form}'\n")
        models.append({"name": f"hand_{form}", "sql": f"hand_{form}.sql", "kind": "view"})
    models.append({"name": "persons", "contact_type": ["person"],
                   "fields": {"dob": {"path": "date_of_birth", "type": "date"}, "sex": {"path": "sex"},
                              "dob_iso": {"path": "ephemeral_dob.dob_iso", "type": "date"}}})
    (path.parent / "data_record.sql").write_text((Path(__file__).parent.parent / "sql" / "data_record.sql").read_text())
    models.append({"name": "data_record", "sql": "data_record.sql", "kind": "incremental", "unique_key": ["uuid"]})
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))


@pytest.fixture
def bed(couch, couch_server, cfg_factory, tmp_path: Path) -> tuple[Config, sample.Sample, dict[str, str]]:
    """The sample in the real CouchDB, synced into Postgres; the models file written."""
    names = sample.db_names("formtest")
    data = sample.Sample(N, SEED, bad=False)  # CouchDB 3.4 refuses the lone-surrogate document
    with sample.couch_client(couch_server.url, couch_server.auth) as client:
        loaded = sample.load(client, data.texts(), dbs=names)
    assert loaded.failed == 0
    models_path = tmp_path / "models.yaml"
    models_yaml(models_path, tests={"pregnancy_home_visit": [{"test": "casts"}],
                                    "death_report": [{"test": "casts", "column": "died_on"}]})
    cfg = cfg_factory(",".join(names.values()), CHTSYNC_MODELS=str(models_path))
    sync_once(cfg)
    return cfg, data, names


def _count(conn: psycopg.Connection, query: str, *idents: str) -> int:
    return conn.execute(sql.SQL(query).format(*map(sql.Identifier, idents))).fetchone()[0]


def _differ(conn: psycopg.Connection, a: str, b: str, columns: list[str]) -> int:
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    return conn.execute(sql.SQL(
        "SELECT count(*) FROM ((SELECT {c} FROM {a} EXCEPT ALL SELECT {c} FROM {b})"
        " UNION ALL (SELECT {c} FROM {b} EXCEPT ALL SELECT {c} FROM {a})) AS d"
    ).format(c=cols, a=sql.Identifier(a), b=sql.Identifier(b))).fetchone()[0]


def _diff_with_rebuild(conn: psycopg.Connection, model: graph.Model) -> int:
    name, body = sql.Identifier(model.name), sql.SQL(model.sql)
    return conn.execute(sql.SQL(
        "SELECT count(*) FROM ((TABLE {} EXCEPT ALL ({})) UNION ALL (({}) EXCEPT ALL TABLE {})) AS d"
    ).format(name, body, body, name)).fetchone()[0]


def _assert_forms_equal_hand_written(conn: psycopg.Connection) -> None:
    for form, fields in FORM_FIELDS.items():
        model = f"f_{form}"
        assert _differ(conn, model, f"hand_{form}", ["uuid", *fields]) == 0, form
        # data_record's columns are data_record's
        conn.execute(sql.SQL("CREATE TEMP VIEW dr_form AS SELECT * FROM data_record WHERE form = {}")
                     .format(sql.Literal(form)))
        assert _differ(conn, model, "dr_form", list(COMMON)) == 0, form
        conn.execute("DROP VIEW dr_form")


def test_form_models_from_yaml_equal_hand_written_sql_and_stay_incremental(bed, couch) -> None:
    cfg, data, names = bed
    with db.connect(cfg, autocommit=True) as conn:
        engine.apply(cfg, conn)
        results = {r.name: r for r in engine.refresh_once(cfg, conn)}
        assert all(r.status in ("ok", "skipped") for r in results.values()), results
        for form in FORM_FIELDS:
            assert _count(conn, "SELECT count(*) FROM {}", f"f_{form}") == data.counts.forms[form] > 0, form
        types = dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'f_immunization_visit'::regclass AND attnum > 0").fetchall())
        assert {c: types[c] for c in ("vaccines", "given", "next_visit", "weight", "_cast_failures")} == {
            "vaccines": "text[]", "given": "bigint", "next_visit": "date", "weight": "numeric",
            "_cast_failures": "text[]"}
        _assert_forms_equal_hand_written(conn)
        assert _count(conn, "SELECT count(*) FROM {} WHERE cardinality(received) > 0", "f_immunization_visit") == \
            data.counts.forms["immunization_visit"]
        # nothing failed to cast in clean data; '' is NULL, not a failure
        for form in FORM_FIELDS:
            assert _count(conn, "SELECT count(*) FROM {} WHERE _cast_failures IS NOT NULL", f"f_{form}") == 0
        assert _count(conn, "SELECT count(*) FROM {} WHERE current_edd IS NOT NULL", "f_pregnancy_home_visit") == 0

        # Edits through CouchDB: an uncastable value, a changed date, a deletion, a report moved
        # to another form, a new report.
        medic = names["medic"]
        ids = {form: [r[0] for r in conn.execute(
            sql.SQL("SELECT uuid FROM {} ORDER BY uuid LIMIT 3").format(sql.Identifier(f"f_{form}")))]
            for form in ("pregnancy_home_visit", "assessment")}
        bad, changed, gone = ids["pregnancy_home_visit"]
        doc = couch.get(medic, bad)
        doc["fields"]["pregnancy_home_visit"]["pregnancy_summary"]["weeks_since_lmp"] = "twelve"
        couch.put(medic, doc)
        doc = couch.get(medic, changed)
        doc["fields"]["pregnancy_home_visit"]["pregnancy_summary"]["edd_8601"] = "2031-01-31"
        couch.put(medic, doc)
        couch.delete(medic, gone)
        moved = couch.get(medic, ids["assessment"][0])
        moved["form"] = "death_report"
        moved["fields"]["death_report"] = {"death_details": {"date_of_death": "2025-02-30", "place_of_death": "home"}}
        couch.put(medic, moved)
        new = data.report(int(dt.datetime(2025, 3, 1, tzinfo=dt.UTC).timestamp() * 1000))
        couch.put(medic, new)
        sync_once(cfg)
        engine.refresh_once(cfg, conn)

        built = graph.load(cfg)
        for form in FORM_FIELDS:
            assert _diff_with_rebuild(conn, built.models[f"f_{form}"]) == 0, form
        row = conn.execute("SELECT weeks, _cast_failures FROM f_pregnancy_home_visit WHERE uuid = %s",
                           (bad,)).fetchone()
        assert row == (None, ["weeks"]), "the uncastable report keeps its row, with NULL"
        assert conn.execute("SELECT edd FROM f_pregnancy_home_visit WHERE uuid = %s",
                            (changed,)).fetchone() == (dt.date(2031, 1, 31),)
        assert _count(conn, f"SELECT count(*) FROM {{}} WHERE uuid = '{gone}'", "f_pregnancy_home_visit") == 0
        assert _count(conn, f"SELECT count(*) FROM {{}} WHERE uuid = '{moved['_id']}'", "f_assessment") == 0
        assert conn.execute("SELECT died_on, _cast_failures FROM f_death_report WHERE uuid = %s",
                            (moved["_id"],)).fetchone() == (None, ["died_on"]), "30 February is no date"
        assert _count(conn, f"SELECT count(*) FROM {{}} WHERE uuid = '{new['_id']}'", f"f_{new['form']}") == 1
        # ... and the casts tests, run after the refresh that changed their models, count them
        assert conn.execute("SELECT unique_id, status, failures FROM chtsync_model_tests ORDER BY 1").fetchall() == [
            ("test.f_death_report.casts_died_on", "warn", 1), ("test.f_pregnancy_home_visit.casts", "warn", 1)]


def test_contact_type_model_and_models_sql(bed, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg, data, _names = bed
    with db.connect(cfg, autocommit=True) as conn:
        engine.apply(cfg, conn)
        engine.refresh_once(cfg, conn)
        # documents of type person, and of type contact with contact_type person (not the CHWs,
        # of contact type chw)
        assert _count(conn, "SELECT count(*) FROM {}", "persons") == conn.execute(
            "SELECT count(*) FROM couchdb WHERE NOT _deleted AND (doc ->> 'type' = 'person'"
            " OR (doc ->> 'type' = 'contact' AND doc ->> 'contact_type' = 'person'))"
        ).fetchone()[0] >= len(data.patients)
        assert conn.execute("SELECT count(*) FROM persons p JOIN couchdb c ON c._id = p.uuid"
                            " WHERE c.doc ->> 'type' = 'contact'").fetchone()[0] > 0
        assert conn.execute(
            "SELECT count(*) FROM persons p JOIN couchdb c ON c._id = p.uuid"
            " WHERE p.dob IS DISTINCT FROM NULLIF(c.doc ->> 'date_of_birth', '')::date"
            " OR p.dob_iso IS DISTINCT FROM (c.doc #>> '{ephemeral_dob,dob_iso}')::date"
            " OR p.sex IS DISTINCT FROM c.doc ->> 'sex'").fetchone() == (0,)
        dobs = dict(conn.execute("SELECT uuid, dob FROM persons").fetchall())
        assert {p.uuid: dobs[p.uuid] for p in data.patients} == {
            p.uuid: dt.date.fromisoformat(p.dob) for p in data.patients}
    _cli_env(monkeypatch, cfg)
    assert cli.main(["models", "sql", "persons"]) == 0
    out = capsys.readouterr().out
    assert '"chtsync_try_date_v1"(doc #>> \'{date_of_birth}\') AS "dob"' in out
    assert "IN ('person')" in out and out.lstrip().startswith("--")
    assert cli.main(["models", "sql", "ghost"]) == 2
    assert "model 'ghost' is not an enabled model" in capsys.readouterr().err


def _cli_env(monkeypatch: pytest.MonkeyPatch, cfg: Config) -> None:
    pg = cfg.postgres
    env = {"POSTGRES_HOST": pg.host, "POSTGRES_PORT": str(pg.port), "POSTGRES_USER": pg.user,
           "POSTGRES_DB": pg.dbname, "COUCHDB_URL": "http://127.0.0.1:9", "COUCHDB_DBS": ",".join(
               db for s in cfg.sources for db in s.dbs), "CHTSYNC_MODELS": str(cfg.models)}
    for key, value in env.items():
        monkeypatch.setenv(key, value or "")


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= _flatten(f"{prefix}.{k}", v)
        return out
    return {prefix: {str: "string", list: "array", int: "number", float: "number", bool: "boolean"}[type(value)]}


def test_models_fields_lists_the_generators_fields(bed, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg, data, _names = bed
    form = "pregnancy_home_visit"
    known = _flatten(f"fields.{form}", generator._form_fields(form, random.Random(0)))
    _cli_env(monkeypatch, cfg)
    assert cli.main(["models", "fields", form]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{data.counts.forms[form]} report(s) of form '{form}'"
    seen = {line.split()[0]: line.split() for line in lines[1:]}
    form_paths = {p: cols for p, cols in seen.items() if p.startswith(f"fields.{form}.")}
    assert set(form_paths) == set(known)
    for path, cols in form_paths.items():
        assert cols[1] == known[path] and int(cols[2]) == data.counts.forms[form], path
    # the fields every report has, from the generator's template
    assert {"fields.patient_uuid", "fields.inputs.source", "fields.meta.instanceID"} <= set(seen)
    # a sample when the raw table is "large"
    with db.connect(cfg, autocommit=True) as conn:
        conn.execute("ANALYZE couchdb")
        fields, total, percent = forms.discover(conn, db.table_ident(cfg), f"{cfg.schema}.{cfg.table}", form,
                                                max_rows=N // 2)
    assert percent is not None and 0 < percent < 100 and total <= data.counts.forms[form]
    assert all(f.path in seen for f in fields)
    assert cli.main(["models", "fields", "no_such_form"]) == 1
    assert "no report of form 'no_such_form'" in capsys.readouterr().out


@pytest.mark.parametrize(("fn", "value", "expected"), [
    ("integer", " 42 ", 42), ("integer", "-7", -7), ("integer", "4.0", None), ("integer", "1" * 19, None),
    ("numeric", "1.5e3", 1500), ("numeric", ".5", 0.5), ("numeric", "NaN", None), ("numeric", "1,5", None),
    ("boolean", "Yes", True), ("boolean", "0", False), ("boolean", "maybe", None),
    ("date", "2024-02-29", dt.date(2024, 2, 29)), ("date", "2023-02-29", None), ("date", "0000-01-01", None),
    ("date", "2024-13-01", None), ("date", "17/05/2024", None),
    ("timestamp", "2024-05-17T08:30:00.123Z", dt.datetime(2024, 5, 17, 8, 30, 0, 123000, tzinfo=dt.UTC)),
    ("timestamp", "2024-05-17 08:30+03:00", dt.datetime(2024, 5, 17, 5, 30, tzinfo=dt.UTC)),
    ("timestamp", "2024-05-17T08:30", dt.datetime(2024, 5, 17, 8, 30, tzinfo=dt.UTC)),
    ("timestamp", "1700000000000", dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)),
    ("timestamp", "2024-02-30T08:30", None), ("timestamp", "2024-05-17T24:00", None), ("timestamp", "soon", None),
])
def test_safe_casts(pg: psycopg.Connection, fn: str, value: str, expected: Any) -> None:
    pg.execute("SET TimeZone = 'America/Lima'")  # no-offset times are UTC whatever the session says
    got = pg.execute(sql.SQL("SELECT {}(%s)").format(sql.Identifier(f"chtsync_try_{fn}_v1")), (value,)).fetchone()[0]
    assert got == expected
    flags = pg.execute("SELECT provolatile, proparallel FROM pg_proc WHERE proname = %s",
                       (f"chtsync_try_{fn}_v1",)).fetchone()
    assert flags == ("i", "s")


def test_safe_array(pg: psycopg.Connection) -> None:
    got = pg.execute("SELECT chtsync_try_array_v1('[\"a\", 1]'), chtsync_try_array_v1('\" a  b \"'),"
                     " chtsync_try_array_v1('\"\"'), chtsync_try_array_v1('3'), chtsync_try_array_v1(NULL)").fetchone()
    assert got == (["a", "1"], ["a", "b"], None, None, None)


@pytest.mark.parametrize(("entry", "message"), [
    ({"form": "f", "sql": "x.sql"}, "has no 'sql' file"),
    ({"form": "f", "contact_type": "c"}, "give one of 'form', 'forms' or 'contact_type'"),
    ({"forms": []}, "'forms' must be a name or a list"),
    ({"form": "f", "fields": {"x": {"type": "int"}}}, "field 'x': 'type' must be one of text, integer"),
    ({"form": "f", "fields": {"x": {"path": "fields..x"}}}, "field 'x': 'path' must be a dotted path"),
    ({"form": "f", "fields": {"reported": "date"}}, "field 'reported': the model already has a column"),
    ({"form": "f", "fields": {"x": {"paht": "a"}}}, "unknown key 'paht'"),
    ({"fields": {"x": "text"}, "sql": "m.sql", "kind": "view"}, "'fields' needs 'form'"),
])
def test_form_model_errors(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    (tmp_path / "m.sql").write_text("SELECT 1 AS x")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", **entry}]}))
    with pytest.raises(ConfigError, match=f"model 'm'.*{message}"):
        load_file(path)
