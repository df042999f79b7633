"""The "CHT overview" Superset dashboard: build its import bundle and import it over the REST API.

The bundle lives in the repository as readable YAML (`superset/`, see docs/superset.md). Building
the zip fills in what depends on the deployment: the Postgres schema (the YAML says `v1`), the
database URI (password masked, sent apart), Superset's position_json from our compact `layout`,
and each chart's query_context as the JSON string Superset stores.
"""

from __future__ import annotations

import io
import json
import logging
import re
import urllib.parse
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chtsync import paths
from chtsync.config import Config

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
