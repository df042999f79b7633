"""Sample data for trying and testing chtsync: generator.py makes realistic CHT documents
(deterministic for a seed), couchdb.py writes them (JSON lines or _bulk_docs), trickle.py keeps
writing while the service runs. The local servers for the demo are in chtsync.localservers."""

from chtsync.demo.couchdb import (
    LoadResult,
    SampleError,
    couch_client,
    couch_target,
    db_names,
    ensure_dbs,
    load,
    write_jsonl,
)
from chtsync.demo.generator import (
    CONTACT_TYPES,
    DAY_MS,
    DBS,
    DEFAULT_END_MS,
    MEDIC,
    MIN_DOCS,
    OLD_VERSIONS,
    USERS,
    USERS_META,
    Sample,
    SampleCounts,
    dumps,
    expected_counts,
    generate,
)
from chtsync.demo.trickle import TrickleResult, trickle

__all__ = [
    "CONTACT_TYPES", "DAY_MS", "DBS", "DEFAULT_END_MS", "MEDIC", "MIN_DOCS", "OLD_VERSIONS", "USERS",
    "USERS_META", "LoadResult", "Sample", "SampleCounts", "SampleError", "TrickleResult", "couch_client",
    "couch_target", "db_names", "dumps", "ensure_dbs", "expected_counts", "generate", "load", "trickle",
    "write_jsonl",
]
