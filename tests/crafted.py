"""A tiny CouchDB imitation over real HTTP that serves crafted `_changes` bodies, for the hostile
pages no real CouchDB can be made to send (invalid UTF-8, a lone surrogate, garbage, a cut-off
page, odd `pending` values). Everything else is tested on the real CouchDB 3.4."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (since, limit) -> the body to send for GET /{db}/_changes
PageFn = Callable[[str, int], bytes]


@dataclass
class Asked:
    at: float  # time.monotonic() when the request arrived
    since: str
    limit: int
    longpoll: bool


@dataclass
class CraftedCouch:
    """Serves `pages(since, limit)` as the _changes of every database; `update_seq` for GET /db.
    Records every _changes request (time, since, limit)."""

    pages: PageFn
    update_seq: str = "0"
    all_docs: bytes = b"<html>502 Bad Gateway</html>"  # GET or POST /{db}/_all_docs
    asked: list[Asked] = field(default_factory=list)

    def __post_init__(self) -> None:
        crafted = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # The client may stop reading (a page over its byte budget).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                parts = [urllib.parse.unquote(p) for p in url.path.split("/") if p]
                query = dict(urllib.parse.parse_qsl(url.query))
                if not parts:
                    self._send(200, b'{"couchdb":"Welcome","version":"3.4.3"}')
                elif len(parts) == 1:
                    self._send(200, json.dumps({
                        "db_name": parts[0], "update_seq": crafted.update_seq,
                        "doc_count": 0, "doc_del_count": 0}).encode())
                elif parts[1] == "_changes":
                    since, limit = query.get("since", "0"), int(query.get("limit", "1000"))
                    crafted.asked.append(Asked(time.monotonic(), since, limit,
                                               query.get("feed") == "longpoll"))
                    self._send(200, crafted.pages(since, limit))
                elif parts[1] == "_all_docs":
                    self._send(200, crafted.all_docs)
                else:
                    self._send(404, b'{"error":"not_found","reason":"missing"}')

            def do_POST(self) -> None:
                # _all_docs takes its keys in a POST body; the body does not change the answer.
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.do_GET()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> CraftedCouch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def change(seq: str | int | None, doc_id: str, rev: str = "1-a", **fields: object) -> dict:
    return {"seq": seq, "id": doc_id, "changes": [{"rev": rev}], "doc": {"_id": doc_id, "_rev": rev, **fields}}


def body(results: list, last_seq: str, pending: object = 0, *, raw_pending: str | None = None) -> bytes:
    """A _changes body as CouchDB 3 lays it out; raw_pending puts any token after "pending":."""
    text = json.dumps({"results": results, "last_seq": last_seq})
    if raw_pending is not None:
        return (text[:-1] + f',"pending":{raw_pending}}}').encode()
    return (text[:-1] + f',"pending":{json.dumps(pending)}}}').encode()
