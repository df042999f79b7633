-- chtsync 0008: CouchDB's winner, whatever its revision. chtsync_ingest_v2 writes every change
-- the follower reads (feed order + the follower's lease, not revision strings, keep rows right);
-- repairs compare-and-set against the row they read; per-source database identity and purge
-- checkpoint. See docs/design.md "Which write wins".
-- Runs with search_path = the configured schema.
-- depends: 0007.hostile-pages

-- Where each source's database stands beyond its _changes checkpoint. Written by the source's
-- follower only, in the transaction that moves or resets its checkpoint.
--   couch_instance: GET /db instance_start_time on CouchDB 3 (the database's creation time):
--                   another value means the database was deleted and recreated
--   purge_seq:      GET /db purge_seq whose purges are already applied to the raw table
--   verify_due:     why a full verify --repair of this source is owed (a recreated database
--                   left rows behind, or more purges happened than CouchDB keeps), or NULL
ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS couch_instance text;
ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS purge_seq text;
ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS verify_due text;
-- The revision guard it lifted is gone (chtsync_ingest_v2 has none), so the flag has no job.
ALTER TABLE chtsync_sources DROP COLUMN IF EXISTS resync;

-- One _changes page (or an _all_docs response turned into one) into the raw table.
-- Without p_expect (the follower): every change is written, except an identical replay (same
-- _rev and _deleted as the row), which writes nothing, so models see no churn. The follower is
-- the only writer of its source (its advisory lock lives in the session it writes with) and
-- reads pages in feed order with the winner of each document as of reading, so the last write
-- is the newest truth, including a winner that moved to a lower revision.
-- With p_expect = {"<_id>": "<_xid as read>" | null, ...} (verify --repair, purges): a row is
-- written only if its _xid is still the one read (null: no row, or a row no chtsync wrote), so a
-- write that happened in between is never overwritten; ids absent from p_expect are skipped.
CREATE OR REPLACE FUNCTION chtsync_ingest_v2(
    p_table regclass,
    p_source text,
    p_page jsonb,
    p_limit integer DEFAULT NULL,      -- the page size asked for: a short page means caught up
    p_checkpoint boolean DEFAULT true, -- false while a refused page is being split, and repairs
    p_expect jsonb DEFAULT NULL        -- compare-and-set: {_id: _xid read}, see above
)
RETURNS TABLE (last_seq text, pending bigint, changes integer, written integer)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF jsonb_typeof(p_page -> 'results') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'not a _changes page: no "results" array' USING ERRCODE = '22023';
    END IF;
    IF p_checkpoint AND (p_page -> 'last_seq' IS NULL OR p_page -> 'last_seq' = 'null'::jsonb) THEN
        RAISE EXCEPTION 'not a _changes page: no "last_seq"' USING ERRCODE = '22023';
    END IF;
    changes := jsonb_array_length(p_page -> 'results');
    written := 0;
    -- seqs are opaque: a CouchDB 3 string or another server's number, stored as text.
    last_seq := p_page ->> 'last_seq';
    pending := CASE
        WHEN p_page ? 'pending' AND p_page -> 'pending' <> 'null'::jsonb
            -- couchdb_progress.pending is an integer: a larger count is as unknown as 1e30.
            THEN nullif(least(chtsync_json_bigint_v1(p_page -> 'pending'), 2147483648), 2147483648)
        WHEN p_limit IS NOT NULL AND changes < p_limit THEN 0
    END;

    IF changes > 0 THEN
        -- A change whose document is missing (and is no deletion) cannot be stored honestly.
        INSERT INTO chtsync_errors (source, _id, seq, reason, raw)
        SELECT p_source, c ->> 'id', c ->> 'seq',
               CASE WHEN jsonb_typeof(c -> 'id') IS DISTINCT FROM 'string' THEN 'change without an id'
                    ELSE 'change without a document (was include_docs lost?)' END,
               left(c::text, 1000000)
        FROM jsonb_array_elements(p_page -> 'results') AS r(c)
        WHERE jsonb_typeof(c -> 'id') IS DISTINCT FROM 'string'
           OR (jsonb_typeof(c -> 'doc') IS DISTINCT FROM 'object'
               AND c -> 'deleted' IS DISTINCT FROM 'true'::jsonb);

        EXECUTE format($q$
            WITH change AS (
                SELECT c, ord
                FROM jsonb_array_elements($1 -> 'results') WITH ORDINALITY AS r(c, ord)
                WHERE jsonb_typeof(c -> 'id') = 'string'
                  AND ($3 IS NULL OR $3 ? (c ->> 'id'))
            ), latest AS (
                -- Postgres refuses to upsert one key twice in a statement: last change wins.
                SELECT DISTINCT ON (c ->> 'id')
                    c ->> 'id' AS id,
                    c -> 'deleted' IS NOT DISTINCT FROM 'true'::jsonb AS deleted,
                    CASE WHEN jsonb_typeof(c -> 'doc') = 'object' THEN c -> 'doc'
                         WHEN c -> 'deleted' = 'true'::jsonb THEN jsonb_build_object(
                             '_id', c ->> 'id', '_rev', c #>> '{changes,0,rev}', '_deleted', true)
                    END AS doc
                FROM change
                ORDER BY c ->> 'id', ord DESC
            ), cleaned AS (
                SELECT id, deleted,
                    chtsync_strip_credentials_v1(id, doc) AS doc
                FROM latest
                WHERE doc IS NOT NULL
            )
            INSERT INTO %s AS t (saved_timestamp, _id, _deleted, source, doc, _rev)
            SELECT now(), id, deleted, $2, doc, doc ->> '_rev' FROM cleaned
            ON CONFLICT (_id, source) DO UPDATE SET
                saved_timestamp = excluded.saved_timestamp,
                _deleted = excluded._deleted,
                doc = excluded.doc,
                _rev = excluded._rev,
                _xid = pg_current_xact_id()
            WHERE (coalesce(t._rev, t.doc ->> '_rev'), t._deleted)
                      IS DISTINCT FROM (excluded._rev, excluded._deleted)
              AND ($3 IS NULL OR t._xid IS NOT DISTINCT FROM ($3 ->> t._id)::xid8)
        $q$, p_table) USING p_page, p_source, p_expect;
        GET DIAGNOSTICS written = ROW_COUNT;
    END IF;

    IF written > 0 THEN
        INSERT INTO chtsync_sources AS s (source, state, docs_written, last_change_at)
        VALUES (p_source, 'catching up', written, now())
        ON CONFLICT (source) DO UPDATE
            SET docs_written = s.docs_written + excluded.docs_written,
                last_change_at = excluded.last_change_at;
        -- Delivered at commit: wakes the model refresh soon after new data lands.
        PERFORM pg_notify('chtsync_ingest', p_source);
    END IF;

    IF p_checkpoint AND last_seq IS NOT NULL THEN
        INSERT INTO couchdb_progress AS p (seq, pending, updated_at, source)
        VALUES (last_seq, pending, now(), p_source)
        ON CONFLICT (source) DO UPDATE
            SET seq = excluded.seq, pending = excluded.pending, updated_at = excluded.updated_at;
    END IF;
    RETURN NEXT;
END
$fn$;

-- Rows whose documents CouchDB no longer knows (purged, or lost with a recreated database)
-- become tombstones with their last known revision and a new _xid, so that incremental models
-- drop them. p_pairs = [[_id, _xid as read or null], ...]: compare-and-set, a row written since
-- it was read is left alone.
CREATE OR REPLACE FUNCTION chtsync_mark_vanished_v2(p_table regclass, p_source text, p_pairs jsonb)
RETURNS integer
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    marked integer;
BEGIN
    EXECUTE format($q$
        UPDATE %s AS t SET
            _deleted = true,
            doc = jsonb_build_object('_id', t._id, '_rev', coalesce(t._rev, t.doc ->> '_rev'),
                                     '_deleted', true),
            _rev = coalesce(t._rev, t.doc ->> '_rev'),
            saved_timestamp = now(),
            _xid = pg_current_xact_id()
        FROM jsonb_array_elements($2) AS p(pair)
        WHERE t.source = $1 AND t._id = p.pair ->> 0 AND NOT t._deleted
          AND t._xid IS NOT DISTINCT FROM (p.pair ->> 1)::xid8
    $q$, p_table) USING p_source, p_pairs;
    GET DIAGNOSTICS marked = ROW_COUNT;
    IF marked > 0 THEN
        -- As every ingest: wake the model refresh.
        PERFORM pg_notify('chtsync_ingest', p_source);
    END IF;
    RETURN marked;
END
$fn$;

-- v1 had the revision-string guard that kept a wrong winner (issue 12): nothing may call it.
DROP FUNCTION IF EXISTS chtsync_ingest_v1(regclass, text, jsonb, integer, boolean, boolean);
DROP FUNCTION IF EXISTS chtsync_mark_vanished_v1;
DROP FUNCTION IF EXISTS chtsync_rev_gen_v1(text);
