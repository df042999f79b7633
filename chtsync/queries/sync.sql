-- Named queries of the sync engine (loaded by chtsync.queries).

-- name: ingest_page
-- One _changes page: (table, source, page body, page size asked, checkpoint?).
SELECT last_seq, pending, changes, written
FROM chtsync_ingest_v2(%s::regclass, %s, %s::jsonb, %s, %s)

-- name: record_error
INSERT INTO chtsync_errors (source, _id, seq, reason, raw) VALUES (%s, %s, %s, %s, %s)

-- name: get_checkpoint
-- (seq, database instance, purge_seq applied, why a verify is owed, first sync seq and key
-- reached) of one source.
SELECT p.seq, s.couch_instance, s.purge_seq, s.verify_due, s.first_sync_seq, s.first_sync_after
FROM (SELECT %(source)s AS source) AS q
LEFT JOIN couchdb_progress p USING (source)
LEFT JOIN chtsync_sources s USING (source)

-- name: reset_checkpoint
-- Read the source from 0 again; a first sync under way is abandoned with it.
WITH first_sync AS (
    UPDATE chtsync_sources SET first_sync_seq = NULL, first_sync_after = NULL
    WHERE source = %(source)s
)
UPDATE couchdb_progress SET seq = '0', pending = NULL, updated_at = now() WHERE source = %(source)s

-- name: set_source_marks
-- Which database the checkpoint belongs to and which purges are applied (see migrations/0008).
INSERT INTO chtsync_sources AS s (source, state, couch_instance, purge_seq, verify_due)
VALUES (%(source)s, 'catching up', %(instance)s, %(purge_seq)s, %(verify_due)s)
ON CONFLICT (source) DO UPDATE SET
    couch_instance = excluded.couch_instance,
    purge_seq = excluded.purge_seq,
    verify_due = excluded.verify_due

-- name: touch_progress
-- The follower is caught up at this seq and waiting: say so (CHT Watchdog's liveness reads
-- updated_at). No raw row is written; a checkpoint that moved meanwhile is left as it is.
UPDATE couchdb_progress SET updated_at = now(), pending = 0
WHERE source = %(source)s AND seq = %(seq)s

-- name: try_source_lock
-- Held for as long as this session follows the source: the lock is the lease.
SELECT pg_try_advisory_lock(%s, %s)

-- name: set_source_state
INSERT INTO chtsync_sources AS s (source, state, reason, owner, updated_at, caught_up_at)
VALUES (%(source)s, %(state)s, %(reason)s, %(owner)s, now(),
        CASE WHEN %(state)s = 'following' THEN now() END)
ON CONFLICT (source) DO UPDATE SET
    state = excluded.state,
    reason = excluded.reason,
    owner = excluded.owner,
    updated_at = excluded.updated_at,
    caught_up_at = coalesce(excluded.caught_up_at, s.caught_up_at)

-- name: session_keepalives
-- A follower whose network dies must lose its lease quickly, so the server probes the client.
SELECT set_config('tcp_keepalives_idle', '5', false),
       set_config('tcp_keepalives_interval', '2', false),
       set_config('tcp_keepalives_count', '3', false),
       set_config('tcp_user_timeout', '10000', false)

-- name: first_sync_begin
-- A first sync in key ranges starts: the feed will resume at %(seq)s once they are all written.
-- The checkpoint says 0 meanwhile (a release without first syncs would read the feed from 0).
WITH source AS (
    UPDATE chtsync_sources SET first_sync_seq = %(seq)s, first_sync_after = NULL
    WHERE source = %(source)s
)
INSERT INTO couchdb_progress AS p (seq, pending, updated_at, source)
VALUES ('0', %(pending)s, now(), %(source)s)
ON CONFLICT (source) DO UPDATE
    SET seq = excluded.seq, pending = excluded.pending, updated_at = excluded.updated_at

-- name: first_sync_page
-- One _all_docs?include_docs page of a first sync, without moving the checkpoint: (rows,
-- rows written, the page's last id: where the next page of its range starts).
-- OFFSET 0 keeps Postgres from pulling the subquery up (it did so with a CTE too): pulled up,
-- the page's text was parsed into jsonb once per use, twice, about 30 us more per document.
SELECT i.changes, i.written, page.body -> 'rows' -> -1 ->> 'id'
FROM (SELECT %(page)s::jsonb AS body OFFSET 0) AS page,
     chtsync_ingest_v2(%(table)s::regclass, %(source)s,
                       jsonb_build_object('results', page.body -> 'rows'), NULL, false) AS i

-- name: first_sync_progress
-- Every key range before %(after)s is written (in this transaction with the rows that complete
-- it); how many documents are left, roughly, for CHT Watchdog and status.
WITH source AS (
    UPDATE chtsync_sources SET first_sync_after = %(after)s
    WHERE source = %(source)s AND first_sync_seq IS NOT NULL
)
UPDATE couchdb_progress SET pending = %(pending)s, updated_at = now() WHERE source = %(source)s

-- name: first_sync_finish
-- Every key range is written: the feed takes over at the seq taken before the first range.
WITH source AS (
    UPDATE chtsync_sources SET first_sync_seq = NULL, first_sync_after = NULL
    WHERE source = %(source)s
)
UPDATE couchdb_progress SET seq = %(seq)s, pending = NULL, updated_at = now()
WHERE source = %(source)s
