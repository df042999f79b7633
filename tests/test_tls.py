"""https to CouchDB: certificates are verified by default; a private CA can be given."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chtsync.config import load
from chtsync.couch import CouchClient, CouchError


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server names it so
        body = json.dumps({"db_name": "medic", "update_seq": "7-g1AAAA", "doc_count": 1}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def https_server(tmp_path: Path):
    """A CouchDB-shaped https server with a certificate from a private CA."""
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.pem"
    key, csr, crt = tmp_path / "srv.key", tmp_path / "srv.csr", tmp_path / "srv.pem"
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_crt),
        "-days", "2", "-subj", "/CN=test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(crt), "-days", "2", "-extfile", str(ext))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca_crt
    server.shutdown()


def info(env: dict[str, str]) -> str:
    cfg = load(env=env, search=False)

    async def main() -> str:
        client = CouchClient(cfg.sources[0])
        try:
            return (await client.db_info("medic")).update_seq
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_certificate_verified_by_default_and_private_ca(https_server: tuple[str, Path]) -> None:
    url, ca = https_server
    with pytest.raises(CouchError, match=r"TLS certificate is not trusted.*COUCHDB_CA_FILE") as info_:
        info({"COUCHDB_URL": url})  # a certificate from an unknown CA is refused
    assert not info_.value.transient
    assert info({"COUCHDB_URL": url, "COUCHDB_CA_FILE": str(ca)}) == "7-g1AAAA"
    assert info({"COUCHDB_URL": url, "COUCHDB_VERIFY_TLS": "false"}) == "7-g1AAAA"
