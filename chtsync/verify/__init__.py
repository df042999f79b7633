"""Is Postgres equal to CouchDB? verify and repair, compared without stopping the sync.

diff.py holds what is found (Diff, SourceReport, exit_code), verifier.py compares and repairs one
database (SourceVerifier, verify, repair_source), loop.py is the verify scheduled inside `run`.
"""

from chtsync.errors import Stopped
from chtsync.verify.diff import KINDS, MISSING, STALE, VANISHED, Diff, SourceReport, State, classify, exit_code
from chtsync.verify.loop import RETRY_SKIPPED_SECONDS, verify_locked, verify_loop
from chtsync.verify.verifier import (
    MAX_ROUNDS,
    PAGE_SIZE,
    RECHECK_BATCH,
    REPAIR_BATCH,
    VANISH_BATCH,
    SourceVerifier,
    repair_source,
    verify,
)

__all__ = [
    "KINDS", "MAX_ROUNDS", "MISSING", "PAGE_SIZE", "RECHECK_BATCH", "REPAIR_BATCH", "RETRY_SKIPPED_SECONDS",
    "STALE", "VANISHED", "VANISH_BATCH", "Diff", "SourceReport", "SourceVerifier", "State", "Stopped",
    "classify", "exit_code", "repair_source", "verify", "verify_locked", "verify_loop",
]
