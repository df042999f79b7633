"""The fault-injection suite prints one table at the end: fault, documents, recovery, lost, duplicated."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from tests.servers import CouchAdmin
from tests.syncutil import pg_state

RESULTS: list[FaultResult] = []


@dataclass
class FaultResult:
    fault: str
    documents: int
    recovered_s: float
    lost: int
    duplicated: int
    refused: int


def measure(pg: psycopg.Connection, couch: CouchAdmin, db: str, source: str) -> tuple[int, int, int, int]:
    """(documents in CouchDB, lost = missing or stale in Postgres and not recorded as refused,
    duplicated rows, refused = deliberately bad documents recorded in chtsync_errors)."""
    want = couch.state(db)
    got = pg_state(pg, source)
    refused = {r[0] for r in pg.execute("SELECT _id FROM chtsync_errors WHERE source = %s AND _id IS NOT NULL",
                                        (source,))}
    vanished_tombstones = {k for k in set(got) - set(want) if got[k][1]}  # purged/recreated: kept deleted
    lost = (sum(1 for k, v in want.items() if got.get(k) != v and k not in refused)
            + len(set(got) - set(want) - vanished_tombstones))
    rows, distinct = pg.execute(
        "SELECT count(*), count(DISTINCT (_id, source)) FROM couchdb WHERE source = %s", (source,)
    ).fetchone()
    return len(want), lost, rows - distinct, len(refused)


@pytest.fixture
def fault_report():
    def record(fault: str, pg: psycopg.Connection, couch: CouchAdmin, db: str, source: str,
               recovered_s: float) -> FaultResult:
        documents, lost, duplicated, refused = measure(pg, couch, db, source)
        result = FaultResult(fault, documents, recovered_s, lost, duplicated, refused)
        RESULTS.append(result)
        return result

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault injection")
    tr.write_line(f"{'fault':<58} {'documents':>9} {'recovered in':>12} {'lost':>5} {'duplicated':>10}"
                  f" {'refused':>8}")
    for r in RESULTS:
        tr.write_line(f"{r.fault:<58} {r.documents:>9} {r.recovered_s:>10.1f} s {r.lost:>5} {r.duplicated:>10}"
                      f" {r.refused:>8}")
