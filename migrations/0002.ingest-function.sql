-- chtsync 0002: the ingest function. One call per _changes page: unpack, keep the last change
-- per document, strip credentials, upsert, checkpoint; the caller wraps it in one transaction.
-- depends: 0001.raw-tables

-- Generation number of a CouchDB revision ("12-abc" -> 12); 0 for anything malformed.
CREATE OR REPLACE FUNCTION chtsync_rev_gen_v1(rev text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN rev ~ '^[0-9]{1,9}-' THEN split_part(rev, '-', 1)::integer ELSE 0 END $$;

CREATE OR REPLACE FUNCTION chtsync_ingest_v1(
    p_table regclass,
    p_source text,
    p_page jsonb,
    p_limit integer DEFAULT NULL,     -- the page size asked for: a short page means caught up
    p_checkpoint boolean DEFAULT true, -- false while a refused page is being split
    p_force boolean DEFAULT false      -- repair: write even if the stored revision looks newer
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
        WHEN jsonb_typeof(p_page -> 'pending') = 'number' THEN (p_page ->> 'pending')::numeric::bigint
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
                    CASE WHEN id LIKE 'org.couchdb.user:%%' THEN doc - ARRAY[
                        'password', 'password_scheme', 'derived_key', 'salt', 'iterations',
                        'pbkdf2_prf', 'password_sha']
                    ELSE doc END AS doc
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
            -- Only a newer winning revision replaces a row: a replayed or late page never
            -- moves a document backwards, and an identical replay writes nothing.
            WHERE $3 OR (chtsync_rev_gen_v1(excluded._rev), coalesce(excluded._rev, ''))
                      > (chtsync_rev_gen_v1(coalesce(t._rev, t.doc ->> '_rev')),
                         coalesce(t._rev, t.doc ->> '_rev', ''))
        $q$, p_table) USING p_page, p_source, p_force;
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
