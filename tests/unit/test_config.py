"""Configuration: CHT Sync's variables, config.yaml, precedence, and one clear line per mistake."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from chtsync.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]

CHT_SYNC_ENV = {  # an .env as CHT Sync's documentation writes it
    "COUCHDB_USER": "medic", "COUCHDB_PASSWORD": "pass-word!", "COUCHDB_DBS": "medic medic-sentinel",
    "COUCHDB_HOST": "cht.example.org", "COUCHDB_PORT": "443", "COUCHDB_SECURE": "true",
    "POSTGRES_USER": "cht_sync", "POSTGRES_PASSWORD": "pg-pass", "POSTGRES_DB": "data",
    "POSTGRES_TABLE": "couchdb", "POSTGRES_SCHEMA": "v1", "POSTGRES_HOST": "db", "POSTGRES_PORT": "5432",
    "BATCH_SIZE": "100", "DATAEMON_INTERVAL": "5",
}


def test_cht_sync_env_works_unchanged() -> None:
    cfg = load(env=CHT_SYNC_ENV, search=False)
    (src,) = cfg.sources
    assert src.url == "https://cht.example.org:443"
    assert (src.user, src.password, src.dbs) == ("medic", "pass-word!", ("medic", "medic-sentinel"))
    assert src.source_name("medic") == "cht.example.org/medic"  # what couch2pg wrote
    assert cfg.postgres.conninfo_kwargs()["host"] == "db"
    assert (cfg.schema, cfg.table, cfg.batch_size, cfg.refresh_interval) == ("v1", "couchdb", 100, 5.0)
    assert "pass-word!" not in repr(cfg)
    assert set(cfg.secrets()) == {"pass-word!", "pg-pass"}


def test_defaults_and_the_shipped_config_file() -> None:
    cfg = load(ROOT / "config.yaml", env={"COUCHDB_HOST": "couch"})
    assert cfg.sources[0].url == "http://couch:5984" and cfg.sources[0].dbs == ("medic",)
    assert (cfg.schema, cfg.table, cfg.batch_size, cfg.refresh_interval) == ("v1", "couchdb", 1000, 5.0)
    assert cfg.metrics_port is None and cfg.log_format == "text"
    assert (cfg.first_sync_readers, cfg.first_sync_min_docs) == (4, 50_000)
    tuned = load(ROOT / "config.yaml", env={"COUCHDB_HOST": "couch", "FIRST_SYNC_READERS": "1",
                                            "FIRST_SYNC_MIN_DOCS": "0"})
    assert (tuned.first_sync_readers, tuned.first_sync_min_docs) == (1, 0)


def test_env_wins_over_file_and_urls_carry_credentials(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("couchdb: {host: from-file, dbs: [medic]}\npostgres: {schema: fromfile}\n")
    cfg = load(file, env={"COUCHDB_URL": "https://u%40x:p%3Aw@couch.example:6984/", "POSTGRES_SCHEMA": "env"})
    src = cfg.sources[0]
    assert (src.url, src.user, src.password) == ("https://couch.example:6984", "u@x", "p:w")
    assert cfg.schema == "env"
    cfg = load(env={"COUCHDB_HOST": "h", "POSTGRES_URL": "postgresql://a:b@pg.example:6543/cht?sslmode=require"},
               search=False)
    kw = cfg.postgres.conninfo_kwargs()
    assert (kw["host"], kw["port"], kw["user"], kw["password"], kw["dbname"], kw["sslmode"]) == (
        "pg.example", 6543, "a", "b", "cht", "require")


def test_password_files(tmp_path: Path) -> None:
    secret = tmp_path / "couch_pw"
    secret.write_text("from-a-file\n")
    cfg = load(env={"COUCHDB_HOST": "h", "COUCHDB_PASSWORD_FILE": str(secret)}, search=False)
    assert cfg.sources[0].password == "from-a-file"
    with pytest.raises(ConfigError, match="COUCHDB_PASSWORD_FILE: cannot read"):
        load(env={"COUCHDB_HOST": "h", "COUCHDB_PASSWORD_FILE": str(tmp_path / "nope")}, search=False)
    (tmp_path / "empty").write_text("\n")  # an empty file is a mistake, not the empty password
    with pytest.raises(ConfigError, match=r"COUCHDB_PASSWORD_FILE: .* is empty"):
        load(env={"COUCHDB_HOST": "h", "COUCHDB_PASSWORD_FILE": str(tmp_path / "empty")}, search=False)
    # percent-encoded, a '/' in a password is fine
    cfg = load(env={"COUCHDB_URL": "http://u:a%2Fb@h:5984", "POSTGRES_URL": "postgresql://p:c%2Fd@db/cht"},
               search=False)
    assert cfg.sources[0].password == "a/b" and cfg.postgres.password == "c/d"


@pytest.mark.parametrize(("env", "message"), [
    ({}, "COUCHDB_HOST is not set"),
    ({"COUCHDB_HOST": "h", "COUCHDB_PORT": "abc"}, "COUCHDB_PORT: expected a whole number, got 'abc'"),
    ({"COUCHDB_HOST": "h", "COUCHDB_SECURE": "maybe"}, "COUCHDB_SECURE: expected true or false"),
    ({"COUCHDB_HOST": "h", "COUCHDB_DBS": " , "}, "COUCHDB_DBS: list at least one"),
    ({"COUCHDB_HOST": "h", "COUCHDB_DBS": "Medic"}, "'Medic' is not a valid CouchDB database name"),
    ({"COUCHDB_HOST": "h", "POSTGRES_SCHEMA": "v1; drop"}, "POSTGRES_SCHEMA: 'v1; drop' is not a plain SQL name"),
    ({"COUCHDB_HOST": "h", "BATCH_SIZE": "0"}, "BATCH_SIZE: must be between 1 and 10000"),
    ({"COUCHDB_HOST": "h", "FIRST_SYNC_READERS": "0"}, "FIRST_SYNC_READERS: must be between 1 and 16"),
    ({"COUCHDB_HOST": "h", "FIRST_SYNC_READERS": "64"}, "FIRST_SYNC_READERS: must be between 1 and 16"),
    ({"COUCHDB_HOST": "h", "FIRST_SYNC_MIN_DOCS": "-1"}, "FIRST_SYNC_MIN_DOCS: must be between 0 and"),
    ({"COUCHDB_HOST": "h", "FIRST_SYNC_MIN_DOCS": "lots"}, "FIRST_SYNC_MIN_DOCS: expected a whole number"),
    ({"COUCHDB_URL": "ftp://x"}, "COUCHDB_URL: expected http(s)://host:port"),
    ({"COUCHDB_HOST": "h", "LOG_LEVEL": "loud"}, "LOG_LEVEL: expected DEBUG"),
    ({"COUCHDB_URL": "http://h:99999"}, "COUCHDB_URL: the port must be a number between 1 and 65535"),
    ({"COUCHDB_URL": "http://h:0"}, "COUCHDB_URL: the port must be a number between 1 and 65535"),
    ({"COUCHDB_HOST": "h", "LEASE_SECONDS": "inf"}, "LEASE_SECONDS: expected a finite number"),
    ({"COUCHDB_HOST": "h", "DATAEMON_INTERVAL": "nan"}, "DATAEMON_INTERVAL: expected a finite number"),
    ({"COUCHDB_HOST": "h", "VERIFY_INTERVAL": "-inf"}, "VERIFY_INTERVAL: expected a finite number"),
    ({"COUCHDB_HOST": "h", "POSTGRES_SCHEMA": "V1"}, "POSTGRES_SCHEMA: 'V1' has capital letters"),
    ({"COUCHDB_HOST": "h", "POSTGRES_TABLE": "CouchDB"}, "POSTGRES_TABLE: 'CouchDB' has capital letters"),
    ({"COUCHDB_HOST": "u:secret@h"}, "COUCHDB_HOST: holds credentials"),
    ({"COUCHDB_HOST": "u@h"}, "COUCHDB_HOST: holds credentials"),
    ({"COUCHDB_HOST": "h", "POSTGRES_HOST": "u:secret@db"}, "POSTGRES_HOST: holds credentials"),
    ({"COUCHDB_HOST": "h", "COUCHDB_CA_FILE": "/nonexistent/ca.pem"}, "COUCHDB_CA_FILE: /nonexistent/ca.pem not found"),
    # A '/', '?' or '#' in a password ends the URL's host part early: the password would be read
    # as a path or a port and shown in errors. Refused without echoing the URL.
    ({"COUCHDB_URL": "http://admin:12345/secret@127.0.0.1:5984"}, "COUCHDB_URL: the user name or password holds"),
    ({"COUCHDB_URL": "http://admin:pa?secret@127.0.0.1:5984"}, "COUCHDB_URL: the user name or password holds"),
    ({"COUCHDB_HOST": "h", "POSTGRES_URL": "postgresql://postgres:12345/secret@127.0.0.1/cht"},
     "POSTGRES_URL: the user name or password holds"),
    ({"COUCHDB_HOST": "h", "POSTGRES_URL": "postgresql://postgres:s3cr/secret@db/cht"},
     "POSTGRES_URL: the user name or password holds"),
    ({"COUCHDB_HOST": "h", "POSTGRES_SCHEMA": "pg_catalog"}, "POSTGRES_SCHEMA: 'pg_catalog' is one of Postgres's own"),
    ({"COUCHDB_HOST": "h", "POSTGRES_SCHEMA": "information_schema"}, "'information_schema' is one of Postgres's own"),
    ({"COUCHDB_HOST": "h", "CHTSYNC_INTERVAL": "abc"}, "CHTSYNC_INTERVAL: expected a number of seconds"),
])
def test_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env=env, search=False)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("couchdb: {host: [a, b]}\n", "couchdb.host: expected a single value, got a YAML list"),
    ("couchdb: {host: h}\npipeline: {models: [a]}\n", "pipeline.models: expected a single value"),
    ("couchdb: {host: h, port: [1]}\n", "COUCHDB_PORT: expected a single value"),
    ("couchdb: {host: h, dbs: {a: 1}}\n", "COUCHDB_DBS: expected a list of CouchDB databases"),
    ("couchdb: {host: h}\npostgres: {schema: {a: 1}}\n", "postgres.schema: expected a single value"),
    ("couchdb: {host: h}\nha: {lease_seconds: .inf}\n", "ha.lease_seconds: expected a finite number"),
    ("couchdb: {host: h}\nmetrics: {host: [a]}\n", "metrics.host: expected a single value"),
    ("couchdb: {host: h}\nsync: {first_sync_readers: 32}\n", "sync.first_sync_readers: must be between 1 and 16"),
    ("couchdb: {host: h}\nsync: {first_sync_min_docs: many}\n", "sync.first_sync_min_docs: expected a whole number"),
    ("couchdb: {host: h}\nsync: {batch_size: 0}\n", "sync.batch_size: must be between 1 and 10000"),
    ("couchdb: {host: h}\npipeline: {interval: .nan}\n", "pipeline.interval: expected a finite number"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "c.yaml: nested too deeply to read"),
])
def test_yaml_types(tmp_path: Path, yaml_text: str, message: str) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(file, env={})


def test_files_that_are_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "pw").write_bytes("pässwörd".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"COUCHDB_PASSWORD_FILE: .* is not UTF-8"):
        load(env={"COUCHDB_HOST": "h", "COUCHDB_PASSWORD_FILE": str(tmp_path / "pw")}, search=False)
    (tmp_path / "c.yaml").write_bytes(b"couchdb: {host: h\xe4}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(tmp_path / "c.yaml", env={})


def test_yaml_mistakes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("couchdb: [oops\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load(bad, env={})
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml", env={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("couchdb: {host: h, pasword: x}\nsync: {batch_sise: 5}\n")
    with caplog.at_level(logging.WARNING):
        load(typo, env={})
    assert "unknown key 'couchdb.pasword' ignored (did you mean 'password'?)" in caplog.text
    assert "unknown key 'sync.batch_sise' ignored (did you mean 'batch_size'?)" in caplog.text


def test_connections_notice_a_vanished_postgres() -> None:
    """libpq keepalives by default (Linux's own start after two hours); the URL's own win."""
    from psycopg.conninfo import conninfo_to_dict

    from chtsync import db

    info = conninfo_to_dict(db.conninfo(load(env={"COUCHDB_HOST": "h"}, search=False)))
    assert (info["keepalives_idle"], info["keepalives_interval"], info["keepalives_count"]) == ("30", "10", "3")
    cfg = load(env={"COUCHDB_HOST": "h", "POSTGRES_URL": "postgresql://db/cht?keepalives_idle=300"}, search=False)
    assert conninfo_to_dict(db.conninfo(cfg))["keepalives_idle"] == "300"
