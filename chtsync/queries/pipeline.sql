-- Named queries of the pipeline engine (loaded by chtsync.queries). {x} = a quoted identifier.

-- name: pipeline_xact_lock
-- Apply: held until commit; excludes another apply and any refresh (same key).
SELECT pg_advisory_xact_lock(%s, %s)

-- name: pipeline_lock
SELECT pg_advisory_lock(%s, %s)

-- name: pipeline_try_lock
SELECT pg_try_advisory_lock(%s, %s)

-- name: pipeline_unlock
SELECT pg_advisory_unlock(%s, %s)

-- name: current_snapshot
-- The refresh watermark: rows written by transactions this snapshot does not see are the ones
-- the next run must read (a late commit included: it is in the snapshot's in-progress list).
SELECT pg_current_snapshot()::text

-- name: recorded_models
SELECT name, kind, definition_hash FROM chtsync_models

-- name: schema_relations
-- Every relation in the pipeline's schema (the first of search_path) and its kind.
SELECT c.relname, c.relkind::text
FROM pg_class AS c
WHERE c.relnamespace = current_schema()::regnamespace
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')

-- name: dependent_views
-- Views and materialized views that depend, directly or through each other, on the given
-- relations (by name in the current schema): one row per (view, relation it uses).
WITH RECURSIVE dep(view_oid, used_oid) AS (
    SELECT DISTINCT r.ev_class, d.refobjid
    FROM pg_depend AS d
    JOIN pg_rewrite AS r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass
      AND d.refclassid = 'pg_class'::regclass
      AND d.refobjid IN (SELECT oid FROM pg_class
                         WHERE relnamespace = current_schema()::regnamespace
                           AND relname = ANY(%s::text[]))
      AND r.ev_class <> d.refobjid
    UNION
    SELECT r.ev_class, d.refobjid
    FROM dep
    JOIN pg_depend AS d ON d.refobjid = dep.view_oid AND d.refclassid = 'pg_class'::regclass
    JOIN pg_rewrite AS r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class <> d.refobjid
)
SELECT dep.view_oid::bigint, n.nspname, c.relname, c.relkind::text,
       c.relnamespace = current_schema()::regnamespace,
       dep.used_oid::bigint, u.relname, u.relnamespace = current_schema()::regnamespace
FROM dep
JOIN pg_class AS c ON c.oid = dep.view_oid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
JOIN pg_class AS u ON u.oid = dep.used_oid

-- name: view_definition
-- What it takes to recreate a view that chtsync did not create: its query, indexes and grants.
SELECT pg_get_viewdef(%(oid)s::oid),
       ARRAY(SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %(oid)s::oid),
       ARRAY(SELECT jsonb_build_object(
                 'privilege', a.privilege_type,
                 'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE a.grantee::regrole::text END,
                 'grantable', a.is_grantable)
             FROM pg_class AS c, aclexplode(c.relacl) AS a
             WHERE c.oid = %(oid)s::oid AND a.grantee <> c.relowner)

-- name: record_created
INSERT INTO chtsync_models AS m (name, kind, definition_hash, created_at, last_refresh_at,
    last_success_at, last_duration_ms, last_rows, last_status, last_error, watermark, snapshot,
    refresh_seq)
VALUES (%(name)s, %(kind)s, %(hash)s, now(), now(), now(), %(ms)s, %(rows)s, 'created', NULL,
        pg_snapshot_xmin(%(snapshot)s::pg_snapshot), %(snapshot)s::pg_snapshot,
        nextval('chtsync_models_refresh_seq'))
ON CONFLICT (name) DO UPDATE SET
    kind = excluded.kind,
    definition_hash = excluded.definition_hash,
    created_at = excluded.created_at,
    last_refresh_at = excluded.last_refresh_at,
    last_success_at = excluded.last_success_at,
    last_duration_ms = excluded.last_duration_ms,
    last_rows = excluded.last_rows,
    last_status = excluded.last_status,
    last_error = NULL,
    watermark = excluded.watermark,
    snapshot = excluded.snapshot,
    refresh_seq = excluded.refresh_seq

-- name: record_dropped
DELETE FROM chtsync_models WHERE name = %s

-- name: model_states
-- Refresh state of every recorded model; `age` in seconds since the last attempt.
SELECT name, definition_hash, snapshot::text, refresh_seq, last_rows,
       extract(epoch FROM now() - last_refresh_at)::float8 AS age
FROM chtsync_models

-- name: raw_changed_since
-- Has a transaction the last refresh did not see written a row? Those are the transactions
-- that started after its snapshot (xid >= xmax) or were in progress then (its xip list): two
-- index probes on _xid, however old the oldest transaction running in the cluster is. The xip
-- list is passed as a value: as a subquery the planner cannot see it and may scan the table.
SELECT EXISTS (SELECT 1 FROM {table} WHERE _xid >= pg_snapshot_xmax(%(snapshot)s::pg_snapshot))
    OR EXISTS (SELECT 1 FROM {table} WHERE _xid = ANY (%(xip)s::text[]::xid8[]))

-- name: changed_ids_table
-- Per session; emptied at every commit, so a run never sees the previous model's ids.
CREATE TEMP TABLE IF NOT EXISTS chtsync_changed_ids (id text NOT NULL) ON COMMIT DELETE ROWS

-- name: changed_ids_fill
-- Documents written by transactions the model's snapshot did not see (as raw_changed_since).
INSERT INTO chtsync_changed_ids (id)
SELECT _id FROM {table} WHERE _xid >= pg_snapshot_xmax(%(snapshot)s::pg_snapshot)
UNION
SELECT _id FROM {table} WHERE _xid = ANY (%(xip)s::text[]::xid8[])

-- name: changed_ids_analyze
-- Without statistics the planner assumes a large table and scans the raw table.
ANALYZE chtsync_changed_ids

-- name: incremental_delete
DELETE FROM {model} WHERE {key} IN (SELECT id FROM chtsync_changed_ids)

-- name: incremental_insert
INSERT INTO {model} SELECT * FROM ({body}) AS m WHERE m.{key} IN (SELECT id FROM chtsync_changed_ids)

-- name: full_insert
INSERT INTO {model} SELECT * FROM ({body}) AS m

-- name: truncate
TRUNCATE {model}

-- name: refresh_matview
REFRESH MATERIALIZED VIEW {model}

-- name: refresh_matview_concurrently
REFRESH MATERIALIZED VIEW CONCURRENTLY {model}

-- name: count_rows
SELECT count(*) FROM {model}

-- name: local_lock_timeout
-- Refreshes that take an exclusive lock give up rather than queue readers behind them.
SELECT set_config('lock_timeout', %s, true)

-- name: record_refresh_ok
UPDATE chtsync_models SET
    last_refresh_at = now(),
    last_success_at = now(),
    last_duration_ms = %(ms)s,
    last_rows = %(rows)s,
    last_status = 'ok',
    last_error = NULL,
    watermark = pg_snapshot_xmin(%(snapshot)s::pg_snapshot),
    snapshot = %(snapshot)s::pg_snapshot,
    refresh_seq = nextval('chtsync_models_refresh_seq')
WHERE name = %(name)s
RETURNING refresh_seq

-- name: record_refresh_failed
-- status 'error' (this model failed) or 'blocked' (an upstream model failed in this run).
UPDATE chtsync_models SET
    last_refresh_at = now(),
    last_duration_ms = %(ms)s,
    last_status = %(status)s,
    last_error = %(error)s
WHERE name = %(name)s

-- name: create_object
-- DDL of a model or of a restored view: the body is the model's SELECT, the suffix WITH DATA or empty.
CREATE {kind} {relation} AS {body}{suffix}

-- name: create_model_index
CREATE {unique}INDEX {index} ON {relation} USING {method} ({columns})

-- name: create_key_index
CREATE INDEX {index} ON {relation} ({column})

-- name: grant_privilege
GRANT {privilege} ON {relation} TO {grantee}{grant_option}

-- name: drop_object
DROP {kind} {relation}
