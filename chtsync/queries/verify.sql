-- Named queries of `chtsync verify` (loaded by chtsync.queries). {table} = the raw table.

-- name: verify_counts
-- Live documents and tombstones of one source, to set beside CouchDB's doc_count/doc_del_count.
SELECT count(*) FILTER (WHERE NOT _deleted), count(*) FILTER (WHERE _deleted)
FROM {table} WHERE source = %s

-- name: verify_seen_create
-- The (id, winning rev) pairs of this run's _all_docs pages. They are compared in one join at
-- the end of the scan: one sequential pass over the source's rows costs far less than an index
-- probe per document (about 9 s against 33 s for 1M documents, docs/benchmarks.md). _all_docs
-- sorts by ICU collation, which Postgres cannot reproduce, so no key ranges are used at all.
CREATE TEMP TABLE IF NOT EXISTS chtsync_verify_seen (id text NOT NULL, rev text)

-- name: verify_seen_reset
TRUNCATE pg_temp.chtsync_verify_seen

-- name: verify_seen_analyze
ANALYZE pg_temp.chtsync_verify_seen

-- name: verify_page
-- One _all_docs page as one jsonb parameter, [[id, rev], ...].
INSERT INTO pg_temp.chtsync_verify_seen (id, rev)
SELECT p ->> 0, p ->> 1 FROM jsonb_array_elements(%s::jsonb) AS e(p)

-- name: verify_diff
-- Ids that may differ: listed by CouchDB but absent, a tombstone or at another revision in
-- Postgres; or live in Postgres and listed by no page (deleted, purged or lost in CouchDB, or
-- created after the scan passed their key: the recheck sorts these out).
SELECT coalesce(s.id, t._id)
FROM pg_temp.chtsync_verify_seen AS s
FULL JOIN (
    SELECT _id, _deleted, coalesce(_rev, doc ->> '_rev') AS rev FROM {table} WHERE source = %s
) AS t ON t._id = s.id
WHERE (s.id IS NULL AND NOT t._deleted)
   OR t._id IS NULL
   OR (s.id IS NOT NULL AND (t._deleted OR t.rev IS DISTINCT FROM s.rev))

-- name: verify_rows
-- What Postgres holds now for some ids, and the _xid a compare-and-set repair checks.
SELECT _id, coalesce(_rev, doc ->> '_rev'), _deleted, _xid::text
FROM {table} WHERE source = %s AND _id = ANY(%s::text[])

-- name: verify_repair_page
-- An _all_docs?include_docs response written through the ingest, compare-and-set: only rows
-- whose _xid is still the one verify read ({id: xid|null}), never moving the checkpoint.
SELECT written
FROM chtsync_ingest_v2(%s::regclass, %s, chtsync_all_docs_to_changes_v1(%s::jsonb), NULL, false,
                       %s::jsonb)

-- name: verify_mark_vanished
-- [[id, xid read|null], ...]: compare-and-set as above.
SELECT chtsync_mark_vanished_v2(%s::regclass, %s, %s::jsonb)

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
