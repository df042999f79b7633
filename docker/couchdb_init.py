"""One-shot set-up of the throwaway CouchDB of the `local` compose profile.

A fresh `couchdb:3` container has an admin but no databases: create the system databases
(`_users`, `_replicator`) and every database chtsync is told to follow (COUCHDB_DBS), so that
`chtsync run` starts following at once. Reads the same settings as chtsync (chtsync.config), waits
for CouchDB to answer, and changes nothing that exists: safe to run at every start.

Run in the chtsync image: `python /app/docker/couchdb_init.py`. Exit 0 when every database exists.
"""

from __future__ import annotations

import sys
import time
import urllib.parse

import httpx

from chtsync.config import ConfigError, load

SYSTEM_DBS = ("_users", "_replicator")


def main(wait_seconds: float = 120.0) -> int:
    try:
        cfg = load()
    except ConfigError as exc:
        print(f"couchdb-init: {exc}", file=sys.stderr)
        return 2
    status = 0
    for source in cfg.sources:
        auth = (source.user, source.password) if source.user else None
        with httpx.Client(base_url=source.url, auth=auth, timeout=10.0) as client:
            deadline = time.monotonic() + wait_seconds
            while True:
                try:
                    if client.get("/").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    print(f"couchdb-init: {source.url} did not answer in {wait_seconds:.0f} s", file=sys.stderr)
                    return 1
                time.sleep(1.0)
            for db in dict.fromkeys((*SYSTEM_DBS, *source.dbs)):
                r = client.put("/" + urllib.parse.quote(db, safe=""))
                if r.status_code in (201, 202):
                    print(f"couchdb-init: created {db}")
                elif r.status_code == 412:
                    print(f"couchdb-init: {db} exists")
                else:
                    print(f"couchdb-init: cannot create {db}: HTTP {r.status_code} {r.text.strip()[:200]}",
                          file=sys.stderr)
                    status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
