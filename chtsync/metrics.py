"""Prometheus metrics (prometheus-client) and health endpoints of `chtsync run`.

Source metrics come from the followers in this process; model metrics from chtsync_models,
read every few seconds by collect_loop so a scrape never waits on Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chtsync import db, state
from chtsync.couch import seq_number

if TYPE_CHECKING:
    from chtsync.service import Runtime

log = logging.getLogger("chtsync.metrics")
COLLECT_SECONDS = 5.0


class RuntimeCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        seq = GaugeMetricFamily("chtsync_source_seq_number", "Numeric prefix of the checkpoint seq",
                                labels=["source"])
        pending = GaugeMetricFamily("chtsync_source_pending", "Changes CouchDB reports as pending",
                                    labels=["source"])
        lag = GaugeMetricFamily("chtsync_source_lag_seconds",
                                "Seconds since the source was last caught up (0 while following)",
                                labels=["source"])
        up = GaugeMetricFamily("chtsync_source_up", "1 while this process follows the source",
                               labels=["source"])
        written = CounterMetricFamily("chtsync_docs_written", "Documents written to Postgres",
                                      labels=["source"])
        errors = CounterMetricFamily("chtsync_errors", "Errors by kind", labels=["kind"])
        by_kind: dict[str, int] = {}
        for s in rt.sources:
            n = seq_number(s.seq)
            if n is not None:
                seq.add_metric([s.source], n)
            if s.pending is not None:
                pending.add_metric([s.source], s.pending)
            lag.add_metric([s.source], s.lag_seconds())
            up.add_metric([s.source], 1 if s.up else 0)
            written.add_metric([s.source], s.docs_written)
            for kind, count in s.errors.items():
                by_kind[kind] = by_kind.get(kind, 0) + count
        for kind, count in rt.model_errors.items():
            by_kind[kind] = by_kind.get(kind, 0) + count
        for kind, count in sorted(by_kind.items()):
            errors.add_metric([kind], count)
        yield from (seq, pending, lag, up, written, errors)

        refresh = GaugeMetricFamily("chtsync_model_refresh_seconds", "Duration of the last refresh",
                                    labels=["model"])
        stale = GaugeMetricFamily("chtsync_model_staleness_seconds",
                                  "Seconds the model lags behind raw data (0 when current)",
                                  labels=["model"])
        rows = GaugeMetricFamily("chtsync_model_rows", "Rows after the last refresh", labels=["model"])
        success = GaugeMetricFamily("chtsync_model_last_success_timestamp",
                                    "Unix time of the last successful refresh", labels=["model"])
        build_docs = GaugeMetricFamily("chtsync_model_build_documents",
                                       "First build in progress: documents done", labels=["model"])
        build_total = GaugeMetricFamily("chtsync_model_build_documents_total",
                                        "First build in progress: documents in all", labels=["model"])
        tests = GaugeMetricFamily("chtsync_model_test_failures",
                                  "Failures of the data test's last run (-1: the test could not run)",
                                  labels=["model", "test"])
        for m in rt.models:
            if m.get("build"):
                build_docs.add_metric([m["name"]], m["build"]["docs"])
                build_total.add_metric([m["name"]], m["build"]["total"])
            for t in m.get("tests", ()):
                tests.add_metric([m["name"], t["name"]], -1 if t["failures"] is None else t["failures"])
            if m["duration_ms"] is not None:
                refresh.add_metric([m["name"]], m["duration_ms"] / 1000)
            if m["staleness_seconds"] is not None:
                stale.add_metric([m["name"]], m["staleness_seconds"])
            if m["rows"] is not None:
                rows.add_metric([m["name"]], m["rows"])
            if m["last_success_at"]:
                success.add_metric([m["name"]], dt.datetime.fromisoformat(m["last_success_at"]).timestamp())
        yield from (refresh, stale, rows, success, build_docs, build_total, tests)


def ready(runtime: Runtime) -> tuple[bool, dict[str, Any]]:
    """Ready: Postgres answered recently and every source is following or catching up
    (or is standby behind another replica)."""
    bad = {s.source: s.state for s in runtime.sources
           if s.state not in ("following", "catching up", "standby", "caught up")}
    ok = runtime.postgres_ok and not bad
    return ok, {"postgres": runtime.postgres_ok, "sources": {s.source: s.state for s in runtime.sources},
                "not_ready": bad}


def start(runtime: Runtime) -> ThreadingHTTPServer:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RuntimeCollector(runtime))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server names it so
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                # Healthy means prepared: a container that depends on chtsync (superset-import)
                # must not start before the models exist.
                if runtime.prepared:
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._send(503, b"preparing: migrations and models not applied yet\n", "text/plain")
            elif path == "/readyz":
                ok, detail = ready(runtime)
                self._send(200 if ok else 503, json.dumps(detail).encode() + b"\n", "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line
            pass

    cfg = runtime.cfg
    server = ThreadingHTTPServer((cfg.metrics_host, cfg.metrics_port or 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics listening on %s:%d (/metrics /healthz /readyz)", cfg.metrics_host, server.server_port)
    return server


def _read_models(runtime: Runtime, seen: set[tuple[str, str]]) -> None:
    with db.connect(runtime.cfg, autocommit=True) as conn:
        runtime.models = state.gather(runtime.cfg, conn, counts=False)["models"]
    for m in runtime.models:
        # Count each failed refresh once (a failure stays in the table until the next attempt).
        if m["status"] == "error" and (m["name"], m["last_refresh_at"]) not in seen:
            seen.add((m["name"], m["last_refresh_at"]))
            runtime.model_errors["model_refresh"] = runtime.model_errors.get("model_refresh", 0) + 1


async def collect_loop(runtime: Runtime, stop: asyncio.Event) -> None:
    """Refresh the model figures (and the Postgres health flag) every few seconds."""
    last_summary = time.monotonic()
    seen: set[tuple[str, str]] = set()
    while not stop.is_set():
        try:
            await asyncio.to_thread(_read_models, runtime, seen)
            runtime.postgres_ok = True
        except Exception as exc:  # health reporting must never die
            if runtime.postgres_ok:
                log.warning("status read failed: %s", db.describe_error(runtime.cfg, exc))
            runtime.postgres_ok = False
        if time.monotonic() - last_summary >= 60:
            last_summary = time.monotonic()
            for s in runtime.sources:
                log.info("summary source=%s state=%s written=%d pending=%s lag=%.0fs",
                         s.source, s.state, s.docs_written, s.pending, s.lag_seconds())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), COLLECT_SECONDS)
