"""The "CHT overview" Superset dashboard: build its import bundle and import it over the REST API.

The bundle lives in the repository as readable YAML (`superset/`, see docs/superset.md). Building
the zip fills in what depends on the deployment: the Postgres schema (the YAML says `v1`), the
database URI (password masked, sent apart), Superset's position_json from our compact `layout`,
and each chart's query_context as the JSON string Superset stores.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from chtsync import paths
from chtsync.cli import load_config
from chtsync.config import Config, ConfigError

log = logging.getLogger("chtsync.superset")

SOURCE_SCHEMA = "v1"  # the schema the YAML is written for; replaced when building the zip
PASSWORD_MASK = "XXXXXXXXXX"  # what Superset itself puts in exported URIs
DATABASE_FILE = "databases/chtsync.yaml"
ZIP_ROOT = "chtsync_superset"  # Superset strips the first folder of every path in a bundle
# Each import endpoint wants its own `type` in metadata.yaml (the model's class name).
ENDPOINTS = {
    "Database": "database",
    "SqlaTable": "dataset",
    "Slice": "chart",
    "Dashboard": "dashboard",
}


class SupersetError(Exception):
    """One line for the user: what failed and what to check."""


def bundle_dir() -> Path:
    return paths.superset_dir()


# --- the bundle --------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SupersetError(f"bundle file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SupersetError(f"bundle file {path}: expected a mapping")
    return data


def _schema_sql(schema: str) -> str:
    # A schema name with capitals only survives quoted; plain ones stay readable.
    return schema if schema == schema.lower() else f'"{schema}"'


def substitute_schema(sql: str, schema: str) -> str:
    """Point `v1.<name>` references in a virtual dataset's SQL at the configured schema."""
    if schema == SOURCE_SCHEMA:
        return sql
    pattern = re.compile(rf'(?<![\w."]){SOURCE_SCHEMA}\.(?=["\w])')
    return pattern.sub(_schema_sql(schema) + ".", sql)


@dataclass(frozen=True)
class DatabaseURI:
    """The URI Superset connects with, password masked, plus the password to send apart."""

    masked: str
    password: str | None

    @classmethod
    def parse(cls, uri: str) -> DatabaseURI:
        parts = urllib.parse.urlsplit(uri.strip())
        if not parts.scheme.startswith("postgres") or not parts.hostname:
            raise SupersetError(
                "--database-uri: expected postgresql://user:password@host:port/dbname"
            )
        password = urllib.parse.unquote(parts.password) if parts.password else None
        user = urllib.parse.unquote(parts.username or "")
        return cls.build(
            user=user, password=password, host=parts.hostname, port=parts.port,
            dbname=parts.path.lstrip("/"), query=parts.query,
        )

    @classmethod
    def from_config(cls, cfg: Config) -> DatabaseURI:
        pg = cfg.postgres
        if pg.host and pg.host.startswith("/"):
            raise SupersetError(
                "chtsync reaches Postgres over a Unix socket, which Superset cannot use:"
                " give --database-uri postgresql://user:password@host:port/dbname"
            )
        query = urllib.parse.urlencode(
            [(k, v) for k, v in pg.extra if k not in ("options", "application_name")]
        )
        return cls.build(
            user=pg.user or "postgres", password=pg.password, host=pg.host or "localhost",
            port=pg.port, dbname=pg.dbname or pg.user or "postgres", query=query,
        )

    @classmethod
    def build(
        cls, *, user: str, password: str | None, host: str, port: int | None, dbname: str,
        query: str = "",
    ) -> DatabaseURI:
        netloc = urllib.parse.quote(user, safe="")
        if password:
            netloc += f":{PASSWORD_MASK}"
        host_part = f"[{host}]" if ":" in host else host
        netloc += f"@{host_part}" + (f":{port}" if port else "")
        path = "/" + urllib.parse.quote(dbname, safe="")
        uri = urllib.parse.urlunsplit(("postgresql+psycopg2", netloc, path, query, ""))
        return cls(masked=uri, password=password or None)


def _position(layout: list[dict[str, Any]], charts: dict[str, dict[str, Any]],
              chart_ids: dict[str, int], title: str) -> dict[str, Any]:
    """Superset's position_json from `layout`: rows of {chart name: width} or a markdown row."""
    position: dict[str, Any] = {
        "DASHBOARD_VERSION_KEY": "v2",
        "ROOT_ID": {"type": "ROOT", "id": "ROOT_ID", "children": ["GRID_ID"]},
        "GRID_ID": {"type": "GRID", "id": "GRID_ID", "children": [], "parents": ["ROOT_ID"]},
        "HEADER_ID": {"type": "HEADER", "id": "HEADER_ID", "meta": {"text": title}},
    }
    for i, item in enumerate(layout, 1):
        row_id = f"ROW-{i}"
        height = int(item.get("height", 50))
        position["GRID_ID"]["children"].append(row_id)
        row: dict[str, Any] = {
            "type": "ROW", "id": row_id, "children": [], "parents": ["ROOT_ID", "GRID_ID"],
            "meta": {"background": "BACKGROUND_TRANSPARENT"},
        }
        position[row_id] = row
        parents = ["ROOT_ID", "GRID_ID", row_id]
        if "markdown" in item:
            md_id = f"MARKDOWN-{i}"
            row["children"].append(md_id)
            position[md_id] = {
                "type": "MARKDOWN", "id": md_id, "children": [], "parents": parents,
                "meta": {"code": str(item["markdown"]), "width": 12, "height": height},
            }
            continue
        widths = item.get("row") or {}
        if sum(int(w) for w in widths.values()) > 12:
            raise SupersetError(f"dashboard layout row {i}: widths add up to more than 12")
        for name, width in widths.items():
            if name not in charts:
                raise SupersetError(f"dashboard layout row {i}: no chart named {name!r} in charts/")
            chart_id = f"CHART-{name}"
            row["children"].append(chart_id)
            position[chart_id] = {
                "type": "CHART", "id": chart_id, "children": [], "parents": parents,
                "meta": {
                    # chartId is a placeholder that Superset maps to the real id via uuid.
                    "chartId": chart_ids[name], "uuid": charts[name]["uuid"],
                    "sliceName": charts[name]["slice_name"], "width": int(width),
                    "height": height,
                },
            }
    return position


def _native_filters(filters: list[dict[str, Any]], datasets: dict[str, dict[str, Any]],
                    chart_ids: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for f in filters:
        f = json.loads(json.dumps(f))  # deep copy
        for target in f.get("targets", []):
            name = target.pop("dataset", None)
            if name is not None:
                if name not in datasets:
                    raise SupersetError(f"native filter {f.get('name')!r}: no dataset {name!r}")
                target["datasetUuid"] = datasets[name]["uuid"]
        scope = f.setdefault("scope", {"rootPath": ["ROOT_ID"], "excluded": []})
        excluded = []
        for name in scope.get("excluded", []):
            if name not in chart_ids:
                raise SupersetError(f"native filter {f.get('name')!r}: no chart {name!r}")
            excluded.append(chart_ids[name])
        scope["excluded"] = excluded
        out.append(f)
    return out


def build_files(schema: str, uri: DatabaseURI, source: Path | None = None) -> dict[str, Any]:
    """Every file of the bundle as Superset's import format wants it, keyed by path in the zip."""
    src = source or bundle_dir()
    if not (src / "metadata.yaml").is_file():
        raise SupersetError(f"no Superset bundle at {src} (metadata.yaml missing)")
    files: dict[str, Any] = {"metadata.yaml": _read(src / "metadata.yaml")}

    database = _read(src / DATABASE_FILE)
    database["sqlalchemy_uri"] = uri.masked
    files[DATABASE_FILE] = database

    datasets: dict[str, dict[str, Any]] = {}
    for path in sorted((src / "datasets").rglob("*.yaml")):
        ds = _read(path)
        if ds.get("schema") != SOURCE_SCHEMA:
            raise SupersetError(f"{path}: datasets must say `schema: {SOURCE_SCHEMA}`")
        ds["schema"] = schema
        if ds.get("sql"):
            ds["sql"] = substitute_schema(ds["sql"], schema)
        if ds.get("database_uuid") != database["uuid"]:
            raise SupersetError(f"{path}: database_uuid is not the chtsync database's uuid")
        datasets[ds["table_name"]] = ds
        files[str(path.relative_to(src))] = ds

    charts: dict[str, dict[str, Any]] = {}
    for path in sorted((src / "charts").glob("*.yaml")):
        chart = _read(path)
        name = chart.pop("dataset", None)
        if name not in datasets:
            raise SupersetError(f"{path}: `dataset: {name}` is not a dataset of the bundle")
        chart["dataset_uuid"] = datasets[name]["uuid"]
        params = chart.setdefault("params", {})
        params.setdefault("viz_type", chart["viz_type"])
        if isinstance(chart.get("query_context"), dict):
            # Superset stores the query context as a JSON string; import fixes the datasource id.
            qc = dict(chart["query_context"])
            qc.setdefault("datasource", {"id": 0, "type": "table"})
            qc.setdefault("force", False)
            qc.setdefault("form_data", params)
            qc.setdefault("result_format", "json")
            qc.setdefault("result_type", "full")
            chart["query_context"] = json.dumps(qc)
        charts[path.stem] = chart
        files[str(path.relative_to(src))] = chart
    chart_ids = {name: i for i, name in enumerate(sorted(charts), 1)}

    for path in sorted((src / "dashboards").glob("*.yaml")):
        dash = _read(path)
        layout = dash.pop("layout", None)
        if layout is not None:
            dash["position"] = _position(layout, charts, chart_ids, dash["dashboard_title"])
        metadata = dash.setdefault("metadata", {})
        metadata["native_filter_configuration"] = _native_filters(
            metadata.get("native_filter_configuration", []), datasets, chart_ids
        )
        files[str(path.relative_to(src))] = dash

    uuids = [f["uuid"] for f in files.values() if "uuid" in f]
    if len(uuids) != len(set(uuids)):
        raise SupersetError("bundle: two files share a uuid")
    return files


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (dataset SQL, markdown) as readable `|` blocks in the zip too."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not value.endswith((" ", "\n")) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(content: Any) -> str:
    return yaml.dump(content, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def to_zip(files: dict[str, Any], kind: str = "Dashboard") -> bytes:
    """A zip Superset's import endpoints accept; `kind` is the metadata type of the endpoint."""
    prefixes = {
        "Database": ("databases/",),
        "SqlaTable": ("databases/", "datasets/"),
        "Slice": ("databases/", "datasets/", "charts/"),
        "Dashboard": ("databases/", "datasets/", "charts/", "dashboards/"),
    }[kind]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{ZIP_ROOT}/metadata.yaml", _dump({**files["metadata.yaml"], "type": kind}))
        for name, content in files.items():
            if name.startswith(prefixes):
                zf.writestr(f"{ZIP_ROOT}/{name}", _dump(content))
    return buf.getvalue()


# --- the REST client ---------------------------------------------------------------------------


def _message(response: httpx.Response) -> str:
    """The error Superset gave, on one line."""
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:200] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        for key in ("message", "msg", "errors", "error"):
            if body.get(key):
                value = body[key]
                if isinstance(value, list):
                    value = "; ".join(
                        str(v.get("message", v)) if isinstance(v, dict) else str(v) for v in value
                    )
                elif isinstance(value, dict):
                    value = json.dumps(value)
                return " ".join(str(value).split())[:500]
    return " ".join(json.dumps(body).split())[:500]


class Superset:
    """A logged-in session on Superset's REST API (JWT + session cookie + CSRF token)."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SupersetError(f"--url: expected http(s)://host:port of Superset, got {url!r}")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise SupersetError(f"Superset at {self.url} did not answer {path} in time") from None
        except httpx.HTTPError as exc:
            raise SupersetError(f"cannot reach Superset at {self.url}: {exc}") from None

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code >= 400:
            raise SupersetError(f"{what}: HTTP {response.status_code}: {_message(response)}")
        try:
            return response.json()
        except ValueError:
            # Superset answers a request it did not authenticate with its login page, as 200.
            raise SupersetError(
                f"{what}: Superset answered with a web page, not JSON (session or CSRF refused)"
            ) from None

    def login(self, user: str, password: str) -> None:
        r = self._request("POST", "/api/v1/security/login", json={
            "username": user, "password": password, "provider": "db", "refresh": False,
        })
        if r.status_code == 401:
            raise SupersetError(
                f"Superset at {self.url} refused the login of {user!r}: wrong user name or password"
            )
        if r.status_code == 404 or "json" not in r.headers.get("content-type", ""):
            raise SupersetError(
                f"no Superset API at {self.url} (HTTP {r.status_code} on /api/v1/security/login):"
                " check --url"
            )
        token = self._json(r, "login").get("access_token")
        if not token:
            raise SupersetError(f"Superset at {self.url} gave no access token for {user!r}")
        self.http.headers["Authorization"] = f"Bearer {token}"
        # The CSRF token is bound to the session cookie this client keeps; without it the import
        # endpoint answers 200 with the login page and imports nothing.
        r = self._request("GET", "/api/v1/security/csrf_token/")
        csrf = self._json(r, "CSRF token").get("result")
        if not csrf:
            raise SupersetError(f"Superset at {self.url} gave no CSRF token")
        self.http.headers["X-CSRFToken"] = csrf
        self.http.headers["Referer"] = self.url + "/"

    def get(self, path: str, **kw: Any) -> Any:
        return self._json(self._request("GET", path, **kw), f"GET {path}")

    def count(self, resource: str) -> int:
        return int(self.get(f"/api/v1/{resource}/", params={"q": "(page:0,page_size:1)"})["count"])

    def counts(self) -> dict[str, int]:
        return {r: self.count(r) for r in ("dashboard", "chart", "dataset", "database")}

    def import_zip(self, kind: str, data: bytes, passwords: dict[str, str]) -> None:
        endpoint = ENDPOINTS[kind]
        form = {"overwrite": "true"}
        if passwords:
            form["passwords"] = json.dumps(passwords)
        r = self._request(
            "POST", f"/api/v1/{endpoint}/import/",
            files={"formData": ("chtsync_superset.zip", data, "application/zip")}, data=form,
        )
        if r.status_code >= 400:
            raise SupersetError(
                f"Superset refused the {endpoint} bundle (HTTP {r.status_code}): {_message(r)}"
            )
        body = self._json(r, f"{endpoint} import")
        if not isinstance(body, dict) or body.get("message") != "OK":
            raise SupersetError(f"{endpoint} import: unexpected answer {_message(r)}")

    def dashboard(self, slug: str) -> dict[str, Any]:
        return self.get(f"/api/v1/dashboard/{slug}")["result"]

    def dashboard_charts(self, dashboard_id: int) -> list[dict[str, Any]]:
        return list(self.get(f"/api/v1/dashboard/{dashboard_id}/charts")["result"])

    def chart_data(self, chart_id: int) -> dict[str, Any]:
        r = self._request("GET", f"/api/v1/chart/{chart_id}/data/")
        if r.status_code >= 400:
            raise SupersetError(_message(r))
        return self._json(r, f"chart {chart_id} data")


@dataclass
class ImportResult:
    before: dict[str, int]
    after: dict[str, int]
    dashboard_id: int
    charts: dict[str, int]  # slice_name -> id
    failures: dict[str, str]  # slice_name -> error


def _passwords(uri: DatabaseURI) -> dict[str, str]:
    return {DATABASE_FILE: uri.password} if uri.password else {}


def import_bundle(
    url: str, user: str, password: str, schema: str, uri: DatabaseURI, verify: bool = True,
    source: Path | None = None,
) -> ImportResult:
    files = build_files(schema, uri, source)
    dashboards = [f for name, f in files.items() if name.startswith("dashboards/")]
    client = Superset(url)
    try:
        client.login(user, password)
        before = client.counts()
        # Dashboard import alone never overwrites the database, datasets or charts it carries
        # (only the dashboard): import each kind with overwrite so a changed URI, password or
        # bundle version takes effect. Same uuids every time: a second import changes nothing.
        for kind in ("Database", "SqlaTable", "Slice", "Dashboard"):
            client.import_zip(kind, to_zip(files, kind), _passwords(uri))
        after = client.counts()
        dash = client.dashboard(dashboards[0]["slug"])
        charts = {c["slice_name"]: int(c["id"]) for c in client.dashboard_charts(int(dash["id"]))}
        failures: dict[str, str] = {}
        if verify:
            for name, chart_id in sorted(charts.items()):
                try:
                    body = client.chart_data(chart_id)
                    errors = [q.get("error") for q in body.get("result", []) if q.get("error")]
                    if errors:
                        failures[name] = str(errors[0])
                except SupersetError as exc:
                    failures[name] = str(exc)
        return ImportResult(before, after, int(dash["id"]), charts, failures)
    finally:
        client.close()


# --- commands ----------------------------------------------------------------------------------


def _uri(cfg: Config, args: argparse.Namespace) -> DatabaseURI:
    override = args.database_uri or os.environ.get("CHTSYNC_SUPERSET_DATABASE_URI")
    return DatabaseURI.parse(override) if override else DatabaseURI.from_config(cfg)


def cmd_bundle(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    try:
        uri = _uri(cfg, args)
        data = to_zip(build_files(cfg.schema, uri))
        Path(args.out).write_bytes(data)
    except (SupersetError, OSError) as exc:
        print(f"chtsync superset bundle: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(data)} bytes; schema {cfg.schema}; database {uri.masked})")
    return 0


def _changes(before: dict[str, int], after: dict[str, int]) -> Iterator[str]:
    for key in before:
        delta = after[key] - before[key]
        yield f"{key}s {after[key]}" + (f" ({delta:+d})" if delta else "")


def cmd_import(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    url = args.url or os.environ.get("SUPERSET_URL")
    user = args.user or os.environ.get("SUPERSET_USER")
    password = args.password or os.environ.get("SUPERSET_PASSWORD")
    try:
        password_file = args.password_file or os.environ.get("SUPERSET_PASSWORD_FILE")
        if not password and password_file:
            try:
                password = Path(password_file).read_text().rstrip("\r\n")
            except OSError as exc:
                raise SupersetError(f"cannot read {password_file}: {exc.strerror}") from None
        if not (url and user and password):
            raise SupersetError(
                "give --url, --user and --password (or SUPERSET_URL, SUPERSET_USER,"
                " SUPERSET_PASSWORD / SUPERSET_PASSWORD_FILE)"
            )
        uri = _uri(cfg, args)
        result = import_bundle(url, user, password, cfg.schema, uri, verify=not args.no_verify)
    except (SupersetError, ConfigError) as exc:
        text = str(exc)
        for secret in [*cfg.secrets(), password or ""]:
            if secret and len(secret) >= 3:
                text = text.replace(secret, "***")
        print(f"chtsync superset import: {text}", file=sys.stderr)
        return 1
    print(f"imported the CHT overview dashboard into {url} (database {uri.masked})")
    print("in Superset now: " + ", ".join(_changes(result.before, result.after)))
    if args.no_verify:
        return 0
    for name, error in sorted(result.failures.items()):
        print(f"chart {name!r}: data request failed: {error}", file=sys.stderr)
    ok = len(result.charts) - len(result.failures)
    print(f"{ok}/{len(result.charts)} charts answered their data request"
          f" ({url}/superset/dashboard/{result.dashboard_id}/)")
    return 1 if result.failures else 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("superset", help="the CHT overview dashboard for Apache Superset")
    cmds = p.add_subparsers(dest="superset_command", metavar="COMMAND")
    cmds.required = True
    uri_help = ("Postgres URI Superset should connect with, e.g. a read-only role"
                " (default: chtsync's own connection; env CHTSYNC_SUPERSET_DATABASE_URI)")

    b = cmds.add_parser("bundle", parents=[common], help="write the dashboard bundle (zip)")
    b.add_argument("--out", required=True, metavar="ZIP", help="file to write, e.g. cht.zip")
    b.add_argument("--database-uri", metavar="URI", help=uri_help)
    b.set_defaults(func=cmd_bundle)

    i = cmds.add_parser("import", parents=[common],
                        help="import the dashboard into a running Superset and check its charts")
    i.add_argument("--url", help="Superset's base URL, e.g. http://localhost:8088 (SUPERSET_URL)")
    i.add_argument("--user", help="Superset admin user (SUPERSET_USER)")
    i.add_argument("--password", help="its password (SUPERSET_PASSWORD)")
    i.add_argument("--password-file", metavar="PATH",
                   help="read the password from a file (SUPERSET_PASSWORD_FILE)")
    i.add_argument("--database-uri", metavar="URI", help=uri_help)
    i.add_argument("--no-verify", action="store_true",
                   help="skip asking every chart for its data after the import")
    i.set_defaults(func=cmd_import)
