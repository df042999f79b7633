"""The Superset REST client: log in, import the bundle kind by kind, check every chart's data."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from chtsync.superset.bundle import DATABASE_FILE, ENDPOINTS, DatabaseURI, SupersetError, build_files, to_zip


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
