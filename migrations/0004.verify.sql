-- chtsync 0004: verify and repair (chtsync verify [--repair]).
-- Runs with search_path = the configured schema.
-- depends: 0003.pipeline-state

-- An `_all_docs?include_docs=true&keys=[...]` response as a `_changes` page, so repairs go
-- through chtsync_ingest_v1 like every other write (document bodies never pass through Python).
-- Deleted documents come as {"value": {"rev", "deleted": true}, "doc": null}: the ingest turns
-- them into tombstones. Keys CouchDB does not know ({"error": "not_found"}) are left out.
CREATE OR REPLACE FUNCTION chtsync_all_docs_to_changes_v1(p_body jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT jsonb_build_object(
        'results', coalesce(jsonb_agg(jsonb_build_object(
            'id', r ->> 'id',
            'changes', jsonb_build_array(jsonb_build_object('rev', r #>> '{value,rev}')),
            'deleted', coalesce(r #> '{value,deleted}', 'false'::jsonb),
            'doc', r -> 'doc') ORDER BY ord), '[]'::jsonb),
        'last_seq', NULL)
    FROM jsonb_array_elements(p_body -> 'rows') WITH ORDINALITY AS a(r, ord)
    WHERE jsonb_typeof(r -> 'id') = 'string' AND jsonb_typeof(r -> 'value') = 'object'
$$;

-- Rows whose documents no longer exist in CouchDB (purged, or lost with a recreated
-- database) become tombstones with their last known revision, and a new _xid so that
-- incremental models drop them. p_pairs = [[_id, rev seen by verify], ...]: a row that changed
-- since verify looked at it (the follower wrote a new revision) is left alone.
CREATE OR REPLACE FUNCTION chtsync_mark_vanished_v1(p_table regclass, p_source text, p_pairs jsonb)
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
          AND coalesce(t._rev, t.doc ->> '_rev') IS NOT DISTINCT FROM p.pair ->> 1
    $q$, p_table) USING p_source, p_pairs;
    GET DIAGNOSTICS marked = ROW_COUNT;
    IF marked > 0 THEN
        -- As every ingest: wake the model refresh.
        PERFORM pg_notify('chtsync_ingest', p_source);
    END IF;
    RETURN marked;
END
$fn$;

-- The last verify of each source, for `status`, metrics and the schedule inside `chtsync run`.
CREATE TABLE IF NOT EXISTS chtsync_verify (
    source varchar PRIMARY KEY,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    equal boolean NOT NULL,
    couch_docs bigint,
    couch_deleted bigint,
    pg_docs bigint,
    pg_deleted bigint,
    missing integer NOT NULL DEFAULT 0,
    stale integer NOT NULL DEFAULT 0,
    vanished integer NOT NULL DEFAULT 0,
    repaired integer NOT NULL DEFAULT 0,
    error text,
    owner text
);
