"""What verify finds: the difference of one document, and the report of one source."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MISSING, STALE, VANISHED = "missing", "stale", "vanished"
KINDS = (MISSING, STALE, VANISHED)

# What one side holds for an id: (winning rev, deleted), or None when it has nothing.
State = tuple[str, bool] | None


@dataclass(frozen=True)
class Diff:
    id: str
    kind: str
    couch: State
    pg: State
    # The row's _xid when pg was read (None: no row, or never written by chtsync): repair
    # writes only over that same row version.
    xid: str | None = field(default=None, compare=False)


def classify(doc_id: str, couch: State, pg: State) -> Diff | None:
    """The difference between CouchDB's and Postgres's state of one document, if any."""
    if couch is None or couch[1]:
        # Gone or deleted in CouchDB: a tombstone (any revision) or nothing in Postgres is right.
        if pg is None or pg[1]:
            return None
        return Diff(doc_id, STALE if couch else VANISHED, couch, pg)
    if pg is None:
        return Diff(doc_id, MISSING, couch, pg)
    if pg[1] or pg[0] != couch[0]:
        return Diff(doc_id, STALE, couch, pg)
    return None


@dataclass
class SourceReport:
    source: str
    couch_docs: int | None = None
    couch_deleted: int | None = None
    pg_docs: int | None = None
    pg_deleted: int | None = None
    checked: int = 0  # _all_docs rows compared
    candidates: int = 0  # ids the scan flagged, before rechecks (the rest were in flight)
    found: dict[str, Diff] = field(default_factory=dict)  # confirmed differences
    remaining: dict[str, Diff] = field(default_factory=dict)  # after repair (= found without)
    repaired: int | None = None  # None: no repair asked
    refused: int = 0  # documents Postgres refused during repair (see chtsync_errors)
    error: str | None = None
    skipped: str | None = None
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    seconds: float = 0.0
    couch_seconds: float = 0.0  # waiting for _all_docs pages
    pg_seconds: float = 0.0  # comparing pages in Postgres
    settle_seconds: float = 0.0  # waiting for the follower before rechecks

    @property
    def equal(self) -> bool:
        return self.error is None and self.skipped is None and not self.remaining

    def ids(self, kind: str, which: str = "found") -> list[str]:
        diffs = self.found if which == "found" else self.remaining
        return sorted(d.id for d in diffs.values() if d.kind == kind)

    def count(self, kind: str, which: str = "found") -> int:
        diffs = self.found if which == "found" else self.remaining
        return sum(1 for d in diffs.values() if d.kind == kind)

    def result(self) -> str:
        if self.error:
            return "error"
        if self.skipped:
            return "skipped"
        if self.remaining:
            return "different"
        return "repaired" if self.found else "equal"

    def as_json(self, max_ids: int) -> dict[str, Any]:
        def kinds(which: str) -> dict[str, Any]:
            return {k: {"count": self.count(k, which), "ids": self.ids(k, which)[:max_ids]} for k in KINDS}

        return {
            "source": self.source,
            "result": self.result(),
            "equal": self.equal,
            "couch": {"docs": self.couch_docs, "deleted": self.couch_deleted},
            "postgres": {"docs": self.pg_docs, "deleted": self.pg_deleted},
            "checked": self.checked,
            "candidates": self.candidates,
            "found": kinds("found"),
            "remaining": kinds("remaining"),
            "repaired": self.repaired,
            "refused": self.refused,
            "error": self.error,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def exit_code(reports: Sequence[SourceReport]) -> int:
    """0 only when every source is equal; 2 when a source could not be verified; else 1."""
    if any(r.error or r.skipped for r in reports):
        return 2
    return 0 if all(r.equal for r in reports) else 1
