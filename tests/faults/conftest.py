"""The fault-injection suite prints one table at the end: a row per fault, a column per server
(documents, recovery time, lost, duplicated, refused)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from tests.servers import CouchAdmin
from tests.syncutil import pg_state

SERVERS = {"couchdb": "CouchDB 3.4.3", "pouchdb": "pouchdb-server 4.2"}
# (fault, server kind) -> result, in the order the faults ran.
RESULTS: dict[tuple[str, str], FaultResult] = {}


@dataclass
class FaultResult:
    fault: str
    server: str
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
def fault_report(couch_impl: str):
    """record(fault, ...) measures Postgres against CouchDB and files the result under the test's server."""

    def record(fault: str, pg: psycopg.Connection, couch: CouchAdmin, db: str, source: str,
               recovered_s: float) -> FaultResult:
        documents, lost, duplicated, refused = measure(pg, couch, db, source)
        result = FaultResult(fault, couch_impl, documents, recovered_s, lost, duplicated, refused)
        RESULTS[(fault, couch_impl)] = result
        return result

    return record


def table() -> list[str]:
    """The fault table as text lines: one row per fault, one column group per server."""
    servers = [k for k in SERVERS if any(s == k for _, s in RESULTS)]
    faults = list(dict.fromkeys(f for f, _ in RESULTS))
    width = max(len(f) for f in faults)
    cell = "{:>6} {:>9} {:>4} {:>4} {:>4}"
    head1 = " " * width + "".join(f" | {SERVERS[s]:<32}" for s in servers)
    head2 = f"{'fault':<{width}}" + "".join(
        " | " + cell.format("docs", "recovered", "lost", "dup", "ref") for _ in servers)
    lines = [head1, head2]
    for fault in faults:
        row = f"{fault:<{width}}"
        for s in servers:
            r = RESULTS.get((fault, s))
            row += " | " + (cell.format(r.documents, f"{r.recovered_s:.1f} s", r.lost, r.duplicated, r.refused)
                            if r else f"{'-':>6}{'':<26}")
        lines.append(row)
    return lines


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    terminalreporter.section("fault injection")
    for line in table():
        terminalreporter.write_line(line)
