-- Named queries of `chtsync verify` (loaded by chtsync.queries). {table} = the raw table.

-- name: verify_counts
-- Live documents and tombstones of one source, to set beside CouchDB's doc_count/doc_del_count.
SELECT count(*) FILTER (WHERE NOT _deleted), count(*) FILTER (WHERE _deleted)
FROM {table} WHERE source = %s

-- name: verify_seen_create
-- Ids of this run's _all_docs pages. _all_docs sorts by ICU collation, not by Postgres's
-- order, so key ranges cannot be compared; the ids seen are kept instead.
CREATE TEMP TABLE IF NOT EXISTS chtsync_verify_seen (id text NOT NULL)

-- name: verify_seen_reset
TRUNCATE pg_temp.chtsync_verify_seen

-- name: verify_seen_analyze
ANALYZE pg_temp.chtsync_verify_seen

-- name: verify_page
-- One _all_docs page as [[id, rev], ...]: note its ids as seen and return the rows that differ
-- (absent, tombstone, or another winning revision), with what Postgres holds.
WITH page AS (
    SELECT p ->> 0 AS id, p ->> 1 AS rev
    FROM jsonb_array_elements(%(pairs)s::jsonb) AS e(p)
), seen AS (
    INSERT INTO pg_temp.chtsync_verify_seen (id) SELECT id FROM page
)
SELECT page.id, page.rev, coalesce(t._rev, t.doc ->> '_rev'), t._deleted
FROM page
LEFT JOIN {table} AS t ON t._id = page.id AND t.source = %(source)s
WHERE t._id IS NULL OR t._deleted OR coalesce(t._rev, t.doc ->> '_rev') IS DISTINCT FROM page.rev

-- name: verify_unseen
-- Live rows whose ids no _all_docs page listed: deleted, purged or lost in CouchDB (or created
-- after the scan passed their key; the recheck sorts these out).
SELECT t._id, coalesce(t._rev, t.doc ->> '_rev')
FROM {table} AS t
WHERE t.source = %s AND NOT t._deleted
  AND NOT EXISTS (SELECT 1 FROM pg_temp.chtsync_verify_seen AS s WHERE s.id = t._id)

-- name: verify_rows
-- What Postgres holds now for some ids.
SELECT _id, coalesce(_rev, doc ->> '_rev'), _deleted
FROM {table} WHERE source = %s AND _id = ANY(%s::text[])

-- name: verify_repair_page
-- An _all_docs?include_docs response written through the ingest: never over a newer revision
-- (p_force = false), never moving the checkpoint (p_checkpoint = false).
SELECT written
FROM chtsync_ingest_v1(%s::regclass, %s, chtsync_all_docs_to_changes_v1(%s::jsonb), NULL, false, false)

-- name: verify_mark_vanished
SELECT chtsync_mark_vanished_v1(%s::regclass, %s, %s::jsonb)

-- name: verify_try_lock
-- Only one replica verifies at a time.
SELECT pg_try_advisory_lock(%s, %s)

-- name: verify_unlock
SELECT pg_advisory_unlock(%s, %s)

-- name: verify_last_finished
SELECT max(finished_at) FROM chtsync_verify

-- name: verify_pending
SELECT pending FROM couchdb_progress WHERE source = %s

-- name: verify_record
INSERT INTO chtsync_verify AS v (source, started_at, finished_at, equal, couch_docs, couch_deleted,
                                 pg_docs, pg_deleted, missing, stale, vanished, repaired, error, owner)
VALUES (%(source)s, %(started_at)s, now(), %(equal)s, %(couch_docs)s, %(couch_deleted)s,
        %(pg_docs)s, %(pg_deleted)s, %(missing)s, %(stale)s, %(vanished)s, %(repaired)s, %(error)s,
        %(owner)s)
ON CONFLICT (source) DO UPDATE SET
    started_at = excluded.started_at, finished_at = excluded.finished_at, equal = excluded.equal,
    couch_docs = excluded.couch_docs, couch_deleted = excluded.couch_deleted,
    pg_docs = excluded.pg_docs, pg_deleted = excluded.pg_deleted, missing = excluded.missing,
    stale = excluded.stale, vanished = excluded.vanished, repaired = excluded.repaired,
    error = excluded.error, owner = excluded.owner
