"""Settings: config.yaml, overridden by environment variables (CHT Sync's names accepted as-is).

Every problem becomes one ConfigError naming the key and how to fix it; nothing is touched
before the whole configuration has been read and checked.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chtsync import paths
from chtsync.errors import ConfigError

log = logging.getLogger("chtsync.config")

DEFAULT_CONFIG_NAMES = ("config.yaml",)
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


@dataclass(frozen=True)
class CouchSource:
    """One CouchDB server (a CHT instance) and the databases to follow on it."""

    instance: str
    url: str  # base URL without credentials, e.g. https://cht.example.org:5984
    dbs: tuple[str, ...]
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    verify_tls: bool = True
    ca_file: str | None = None

    def source_name(self, db: str) -> str:
        """The `source` value stored in Postgres: `<instance>/<db>`, as CHT Sync writes it."""
        return f"{self.instance}/{db}"


@dataclass(frozen=True)
class PostgresConfig:
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    dbname: str | None = None
    schema: str = "v1"
    table: str = "couchdb"
    extra: tuple[tuple[str, str], ...] = ()  # other libpq parameters from POSTGRES_URL

    def conninfo_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {k: v for k, v in self.extra}
        for key in ("host", "port", "user", "password", "dbname"):
            value = getattr(self, key)
            if value is not None:
                kw[key] = value
        kw.setdefault("application_name", "chtsync")
        return kw

    def describe(self) -> str:
        """host:port/db without the password, for logs and errors."""
        return f"{self.host or 'localhost'}:{self.port or 5432}/{self.dbname or self.user or ''}"


@dataclass(frozen=True)
class Config:
    sources: tuple[CouchSource, ...]
    postgres: PostgresConfig
    batch_size: int = 1000
    page_bytes: int = 16 * 2**20  # a _changes page stays under this (unless one document is bigger)
    heartbeat_ms: int = 10000
    # The first sync of a database with at least first_sync_min_docs documents reads it in
    # first_sync_readers parallel key ranges of _all_docs (chtsync/first_sync.py); 1 = feed only.
    first_sync_readers: int = 4
    first_sync_min_docs: int = 50_000
    models: Path = field(default_factory=paths.default_models)
    refresh_interval: float = 5.0
    hold_pending: int = 10_000  # models wait while a source catches up with more pending; 0: never
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    log_level: str = "INFO"
    log_format: str = "text"
    lease_seconds: float = 10.0
    verify_interval: float | None = None  # seconds between scheduled verifies; None = off
    path: Path | None = None

    @property
    def schema(self) -> str:
        return self.postgres.schema

    @property
    def table(self) -> str:
        return self.postgres.table

    def secrets(self) -> list[str]:
        """Every password in the configuration, so that output can be checked against them."""
        found = [s.password for s in self.sources if s.password]
        if self.postgres.password:
            found.append(self.postgres.password)
        return found


# The keys config.yaml may hold, by section; anything else is warned about with a did-you-mean.
KNOWN_KEYS: dict[str, set[str]] = {
    "": {"couchdb", "sources", "postgres", "sync", "pipeline", "metrics", "log", "ha", "verify"},
    "couchdb": {
        "host", "port", "secure", "user", "password", "password_file", "dbs", "url",
        "instance", "ca_file", "verify_tls",
    },
    "postgres": {
        "host", "port", "user", "password", "password_file", "db", "schema", "table", "url",
    },
    "sync": {"batch_size", "page_bytes", "heartbeat_ms", "first_sync_readers", "first_sync_min_docs"},
    "pipeline": {"models", "interval", "hold_pending"},
    "metrics": {"port", "host"},
    "log": {"level", "format"},
    "ha": {"lease_seconds"},
    "verify": {"interval"},
}


def _warn_unknown(section: str, data: Mapping[str, Any]) -> None:
    known = KNOWN_KEYS[section]
    for key in data:
        if key not in known:
            where = f"{section}.{key}" if section else key
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            log.warning("config: unknown key '%s' ignored%s", where, hint)


def _section(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"config key '{name}' must be a mapping of settings, got {value!r}")
    _warn_unknown(name, value)
    return dict(value)


def _scalar(key: str, value: Any) -> Any:
    """A YAML list or mapping where one value belongs is refused, not turned into its repr."""
    if isinstance(value, (list, tuple, dict)):
        raise ConfigError(f"{key}: expected a single value, got a YAML {type(value).__name__}")
    return value


def _int(key: str, value: Any, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    _scalar(key, value)
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a whole number, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(f"{key}: must be between {minimum} and {maximum}, got {number}")
    return number


def _pick(env: Mapping[str, str], name: str, section: Mapping[str, Any], path: str, default: Any) -> tuple[str, Any]:
    """(where the value comes from, the value): environment variable `name` when set, else the
    config.yaml key `path` (section.key) or its default; errors then name the place to fix."""
    if env.get(name):
        return name, env[name]
    return path, section.get(path.rsplit(".", 1)[-1], default)


def _float(key: str, value: Any, minimum: float = 0.0) -> float:
    _scalar(key, value)
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number of seconds, got {value!r}")
    if number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum}, got {number}")
    return number


def _bool(key: str, value: Any) -> bool:
    _scalar(key, value)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _ident(key: str, value: Any) -> str:
    text = str(_scalar(key, value)).strip()
    if not IDENT.match(text):
        raise ConfigError(
            f"{key}: {text!r} is not a plain SQL name (letters, digits, underscore; max 63)"
        )
    if text != text.lower():
        # Postgres folds unquoted names to lower case: model SQL and readers would not find it.
        raise ConfigError(f"{key}: {text!r} has capital letters, which SQL needs quoted everywhere:"
                          f" use {text.lower()!r}")
    return text


def _schema(value: Any) -> str:
    name = _ident("POSTGRES_SCHEMA", value)
    if name.startswith("pg_") or name == "information_schema":
        raise ConfigError(f"POSTGRES_SCHEMA: {name!r} is one of Postgres's own schemas: use a schema of"
                          " chtsync's own, e.g. v1")
    return name


def _dbs(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, dict):
        raise ConfigError(f"{key}: expected a list of CouchDB databases, got a YAML mapping")
    items = value if isinstance(value, list) else re.split(r"[\s,]+", str(value or ""))
    dbs = tuple(str(db).strip() for db in items if str(db).strip())
    if not dbs:
        raise ConfigError(f"{key}: list at least one CouchDB database, e.g. 'medic'")
    for db in dbs:
        # CouchDB's own rule for database names.
        if not re.match(r"^(_users|[a-z][a-z0-9_$()+/-]*)$", db):
            raise ConfigError(f"{key}: {db!r} is not a valid CouchDB database name")
    if len(set(dbs)) != len(dbs):
        raise ConfigError(f"{key}: a database is listed twice")
    return dbs


def _secret(key: str, direct: Any, file_key: str, file_value: Any) -> str | None:
    """A password given directly or, Docker-secrets style, as the path of a file holding it."""
    if file_value:
        try:
            secret = Path(str(_scalar(file_key, file_value))).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{file_key}: cannot read {file_value}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file_key}: {file_value} is not UTF-8 text: write the password in UTF-8"
                              ) from None
        if not secret:
            raise ConfigError(f"{file_key}: {file_value} is empty: write the password in it")
        return secret
    return None if direct is None else str(_scalar(key, direct))


def _userinfo_spills(key: str, url: str) -> None:
    """Refuse a URL with an '@' after its host part: a '/', '?' or '#' in the user name or
    password ended the host part early, so the password would be read as a host, port, path or
    database, and shown in errors and logs. The URL is not echoed: it holds the password."""
    rest = url.strip().split("//", 1)[1] if "//" in url else ""
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[end:]:
        raise ConfigError(f"{key}: the user name or password holds a '/', '?' or '#' (or the path an '@'):"
                          " percent-encode them in the URL (%2F, %3F, %23, %40), or give the password"
                          " in its own setting")


def _split_url(key: str, url: str) -> tuple[str, str | None, str | None]:
    """Return (url without credentials, user, password)."""
    _userinfo_spills(key, url)
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected http(s)://host:port, got a value that is not a URL")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.rsplit("]", 1)[-1].endswith(":")):
        raise ConfigError(f"{key}: the port must be a number between 1 and 65535")
    user = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port:
        netloc += f":{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), user, password


def _couch_source(key: str, data: Mapping[str, Any], env: Mapping[str, str] | None) -> CouchSource:
    """Build one source from a mapping (config.yaml) with, for the main one, env overrides."""
    e = env or {}

    def pick(env_key: str, yaml_key: str, default: Any = None) -> Any:
        if env_key in e and e[env_key] != "":
            return e[env_key]
        return data.get(yaml_key, default)

    url_value = _scalar(f"{key}.url", pick("COUCHDB_URL", "url"))
    user = _scalar(f"{key}.user", pick("COUCHDB_USER", "user"))
    password = _secret(
        f"{key}.password", pick("COUCHDB_PASSWORD", "password"),
        "COUCHDB_PASSWORD_FILE" if e.get("COUCHDB_PASSWORD_FILE") else f"{key}.password_file",
        pick("COUCHDB_PASSWORD_FILE", "password_file"),
    )
    if url_value:
        url_key = "COUCHDB_URL" if e.get("COUCHDB_URL") else f"{key}.url"
        url, url_user, url_password = _split_url(url_key, str(url_value))
        user = user or url_user
        password = password or url_password
        host = urllib.parse.urlsplit(url).hostname or ""
    else:
        host = _scalar("COUCHDB_HOST" if e.get("COUCHDB_HOST") else f"{key}.host", pick("COUCHDB_HOST", "host"))
        if not host:
            raise ConfigError(
                "COUCHDB_HOST is not set: set it (or COUCHDB_URL, or couchdb.host in config.yaml)"
                " to your CHT CouchDB server"
            )
        host = str(host).strip()
        port = _int("COUCHDB_PORT", pick("COUCHDB_PORT", "port", 5984), 1, 65535)
        secure = _bool("COUCHDB_SECURE", pick("COUCHDB_SECURE", "secure", False))
        if "/" in host or ":" in host.strip("[]"):
            # CHT Sync users sometimes put a full URL into COUCHDB_HOST.
            if host.startswith(("http://", "https://")):
                url, url_user, url_password = _split_url("COUCHDB_HOST", host)
                user = user or url_user
                password = password or url_password
                host = urllib.parse.urlsplit(url).hostname or host
            elif "@" in host:
                # Never echo it: what precedes the @ is a password.
                raise ConfigError("COUCHDB_HOST: holds credentials (user:password@host): give the host name"
                                  " only and the credentials in COUCHDB_USER and COUCHDB_PASSWORD")
            else:
                raise ConfigError(f"COUCHDB_HOST: give a host name only, got {host!r}")
        elif "@" in host:
            raise ConfigError("COUCHDB_HOST: holds credentials (user@host): give the host name only and the"
                              " credentials in COUCHDB_USER and COUCHDB_PASSWORD")
        else:
            url = f"{'https' if secure else 'http'}://{host}:{port}"
    dbs = _dbs("COUCHDB_DBS", pick("COUCHDB_DBS", "dbs", "medic"))
    # Host names are case-insensitive; couch2pg wrote them lowercased (URL parsing), so do we.
    host = host.lower()
    instance = str(_scalar(f"{key}.instance", pick("CHTSYNC_INSTANCE", "instance", host)) or host)
    if "/" in instance or not instance:
        raise ConfigError(f"{key}.instance: {instance!r} must be a non-empty label without '/'")
    return CouchSource(
        instance=instance,
        url=url,
        dbs=dbs,
        user=None if user is None else str(user),
        password=password,
        verify_tls=_bool(f"{key}.verify_tls", pick("COUCHDB_VERIFY_TLS", "verify_tls", True)),
        ca_file=_ca_file("COUCHDB_CA_FILE" if e.get("COUCHDB_CA_FILE") else f"{key}.ca_file",
                         pick("COUCHDB_CA_FILE", "ca_file")),
    )


def _ca_file(key: str, value: Any) -> str | None:
    """The CA bundle is loaded now, so that a missing or wrong file stops chtsync before it starts."""
    if value in (None, ""):
        return None
    path = str(_scalar(key, value))
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} not found: give the path of the CA certificate (PEM)") from None
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"{key}: {path} holds no PEM certificate: give the CA certificate file") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return path


def _postgres(data: Mapping[str, Any], env: Mapping[str, str]) -> PostgresConfig:
    def pick(env_key: str, yaml_key: str, default: Any = None) -> Any:
        if env.get(env_key):
            return env[env_key]
        return _scalar(f"postgres.{yaml_key}", data.get(yaml_key, default))

    extra: dict[str, str] = {}
    base: dict[str, Any] = {}
    url = pick("POSTGRES_URL", "url")
    if url:
        import psycopg.conninfo

        if "://" in str(url):  # a URL, not a key=value connection string
            _userinfo_spills("POSTGRES_URL", str(url))
        try:
            parsed = psycopg.conninfo.conninfo_to_dict(str(url))
        except psycopg.ProgrammingError:
            raise ConfigError(
                "POSTGRES_URL: not a valid postgresql:// URL or libpq connection string"
            ) from None
        for key in ("host", "port", "user", "password", "dbname"):
            if key in parsed:
                base[key] = parsed.pop(key)
        extra = {k: str(v) for k, v in parsed.items() if v is not None}
    password = _secret(
        "postgres.password", pick("POSTGRES_PASSWORD", "password", base.get("password")),
        "POSTGRES_PASSWORD_FILE", pick("POSTGRES_PASSWORD_FILE", "password_file"),
    )
    port = pick("POSTGRES_PORT", "port", base.get("port"))
    host = pick("POSTGRES_HOST", "host", base.get("host"))
    if host is not None and "@" in str(host):
        raise ConfigError("POSTGRES_HOST: holds credentials (user:password@host): give the host name only"
                          " and the credentials in POSTGRES_USER and POSTGRES_PASSWORD")
    return PostgresConfig(
        host=None if host is None else str(host),
        port=None if port in (None, "") else _int("POSTGRES_PORT", port, 1, 65535),
        user=pick("POSTGRES_USER", "user", base.get("user")),
        password=password,
        dbname=pick("POSTGRES_DB", "db", base.get("dbname")),
        schema=_schema(pick("POSTGRES_SCHEMA", "schema", "v1")),
        table=_ident("POSTGRES_TABLE", pick("POSTGRES_TABLE", "table", "couchdb")),
        extra=tuple(sorted(extra.items())),
    )


def yaml_file(path: Path, what: str, settings: str, error: type[ConfigError] = ConfigError) -> Any:
    """The parsed YAML of a file; each failure is one `error` naming the file, and the line."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} not found: check {settings}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path}: not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror}") from None
    except RecursionError:
        raise error(f"{what} {path}: nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise error(f"{what} {path}{where}: not valid YAML") from None


def read_yaml(path: Path) -> dict[str, Any]:
    raw = yaml_file(path, "config file", "--config / CHTSYNC_CONFIG") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    return raw


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("CHTSYNC_CONFIG"):
        return Path(env["CHTSYNC_CONFIG"])
    for name in DEFAULT_CONFIG_NAMES:
        if Path(name).is_file():
            return Path(name)
    return None


def load(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, search: bool = True
) -> Config:
    """Read config.yaml (if any) and the environment; raise ConfigError on the first problem.

    With search=False only an explicit path is read (tests use it to ignore ./config.yaml).
    """
    env = dict(os.environ if env is None else env)
    file = find_config_file(str(path) if path else None, env) if search or path else None
    raw = read_yaml(file) if file else {}
    _warn_unknown("", raw)
    couch = _section(raw, "couchdb")
    sync = _section(raw, "sync")
    pipeline = _section(raw, "pipeline")
    metrics = _section(raw, "metrics")
    logs = _section(raw, "log")
    ha = _section(raw, "ha")
    verify = _section(raw, "verify")

    sources: list[CouchSource] = []
    if raw.get("sources"):
        if not isinstance(raw["sources"], list):
            raise ConfigError("config key 'sources' must be a list of CouchDB servers")
        for i, item in enumerate(raw["sources"]):
            if not isinstance(item, Mapping):
                raise ConfigError(f"sources[{i}]: expected a mapping with url/host, dbs, ...")
            _warn_unknown("couchdb", item)
            sources.append(_couch_source(f"sources[{i}]", item, None))
        if any(env.get(k) for k in ("COUCHDB_HOST", "COUCHDB_URL")):
            log.warning("config: COUCHDB_HOST/COUCHDB_URL ignored because config.yaml lists sources")
    else:
        sources.append(_couch_source("couchdb", couch, env))
    names = [s.source_name(db) for s in sources for db in s.dbs]
    if len(set(names)) != len(names):
        raise ConfigError("sources: two sources share an instance label; set 'instance' on each")

    models_value = env.get("CHTSYNC_MODELS") or _scalar("pipeline.models", pipeline.get("models"))
    if models_value:
        models = Path(str(models_value))
        if not models.is_absolute() and file and not env.get("CHTSYNC_MODELS"):
            models = (file.parent / models).resolve()
    else:
        models = paths.default_models()
    interval_key = next((k for k in ("CHTSYNC_INTERVAL", "DATAEMON_INTERVAL") if env.get(k)), "pipeline.interval")
    interval = env.get(interval_key) or pipeline.get("interval", 5)
    metrics_port = env.get("METRICS_PORT") or metrics.get("port")
    verify_interval = env.get("VERIFY_INTERVAL") or verify.get("interval")
    level = str(env.get("LOG_LEVEL") or _scalar("log.level", logs.get("level", "INFO"))).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {level!r}")
    fmt = str(env.get("LOG_FORMAT") or _scalar("log.format", logs.get("format", "text"))).lower()
    if fmt not in {"text", "json"}:
        raise ConfigError(f"LOG_FORMAT: expected text or json, got {fmt!r}")
    return Config(
        sources=tuple(sources),
        postgres=_postgres(_section(raw, "postgres"), env),
        batch_size=_int(*_pick(env, "BATCH_SIZE", sync, "sync.batch_size", 1000), 1, 10000),
        page_bytes=_int(*_pick(env, "PAGE_BYTES", sync, "sync.page_bytes", 16 * 2**20), 4096, 2**31 - 1),
        heartbeat_ms=_int("sync.heartbeat_ms", sync.get("heartbeat_ms", 10000), 1000, 60000),
        first_sync_readers=_int(*_pick(env, "FIRST_SYNC_READERS", sync, "sync.first_sync_readers", 4), 1, 16),
        first_sync_min_docs=_int(*_pick(env, "FIRST_SYNC_MIN_DOCS", sync, "sync.first_sync_min_docs", 50_000), 0),
        models=models,
        refresh_interval=_float(interval_key, interval, 0.1),
        hold_pending=_int(*_pick(env, "CHTSYNC_HOLD_PENDING", pipeline, "pipeline.hold_pending", 10_000)),
        metrics_port=None if metrics_port in (None, "") else _int("METRICS_PORT", metrics_port, 1, 65535),
        metrics_host=str(env.get("METRICS_HOST") or _scalar("metrics.host", metrics.get("host", "0.0.0.0"))),
        log_level=level,
        log_format=fmt,
        lease_seconds=_float("LEASE_SECONDS" if env.get("LEASE_SECONDS") else "ha.lease_seconds",
                             env.get("LEASE_SECONDS") or ha.get("lease_seconds", 10), 1),
        verify_interval=None if not verify_interval else _float("VERIFY_INTERVAL", verify_interval, 60),
        path=file,
    )
