-- Named queries of the pipeline engine (loaded by chtsync.queries). {x} = a quoted identifier.

-- name: pipeline_xact_lock
-- Apply: held until commit; excludes another apply and any refresh (same key).
SELECT pg_advisory_xact_lock(%s, %s)

-- name: pipeline_lock
SELECT pg_advisory_lock(%s, %s)

-- name: refresh_commits_async
-- A round's transactions do not wait for their WAL flush (one per model, 2-20 ms each on a slow
-- disk). A model commits with the snapshot it records, and a crash loses only the last commits,
-- never one without those before it: the models are left as they were a moment earlier, and
-- the next round derives those documents again. Never on a connection that ingests.
SELECT set_config('synchronous_commit', 'off', false)

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
    refresh_seq = excluded.refresh_seq,
    build_snapshot = NULL, build_block = NULL, build_blocks = NULL, build_filenode = NULL,
    build_into = NULL, build_hash = NULL, build_docs = NULL, build_rows = NULL, build_total = NULL,
    build_started_at = NULL

-- name: record_dropped
DELETE FROM chtsync_models WHERE name = %s

-- name: model_states
-- Refresh state of every recorded model; `age` in seconds since the last attempt.
SELECT name, definition_hash, snapshot::text, refresh_seq, last_rows,
       extract(epoch FROM now() - last_refresh_at)::float8 AS age
FROM chtsync_models

-- name: raw_changed_since
-- Has a transaction the last refresh did not see written a row? Two probes on the _xid index,
-- however old the oldest transaction in the cluster is, and whatever the statistics say
-- (migrations/0010.change-probes.sql).
SELECT chtsync_raw_changed_v1((quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))::regclass, %(snapshot)s::pg_snapshot)

-- name: changed_ids_table
-- Per session; emptied at every commit, so a run never sees the previous model's ids.
CREATE TEMP TABLE IF NOT EXISTS chtsync_changed_ids (id text NOT NULL) ON COMMIT DELETE ROWS

-- name: changed_ids_fill
-- Documents written by transactions the model's snapshot did not see (as raw_changed_since).
INSERT INTO chtsync_changed_ids (id)
SELECT chtsync_changed_ids_v1((quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))::regclass, %(snapshot)s::pg_snapshot)

-- name: changed_ids_referencing
-- reference_keys: rows derived from a changed document through one of these columns (a
-- contact's ancestors, say) are re-derived too. One index probe per column and changed id.
INSERT INTO chtsync_changed_ids (id)
SELECT DISTINCT r.key FROM (
    SELECT m.{key}::text AS key
    FROM {model} AS m JOIN chtsync_changed_ids AS c ON m.{column}::text = c.id
) AS r
WHERE NOT EXISTS (SELECT 1 FROM chtsync_changed_ids AS c WHERE c.id = r.key)

-- name: changed_ids_analyze
-- Without statistics the planner assumes a large table and scans the raw table.
ANALYZE chtsync_changed_ids

-- name: local_id_driven
-- A run re-derives a few documents: the changed ids must drive the join through the raw table's
-- primary key. With the planner's default guess for `doc ->> 'type' = ...` (0.5 %) a model over a
-- rare type looked cheap to read whole, by a scan or by a merge join that walks the whole primary
-- key expecting to stop early: ~0.9 s per run at 200k documents, growing with the table; 1.5 ms
-- by id (measured).
SELECT set_config('enable_seqscan', 'off', true), set_config('enable_mergejoin', 'off', true)

-- name: local_jit_off
-- A run touches few rows: compiling its plans (JIT, chosen on estimated cost, which a stale
-- estimate inflates) would cost far more than running them (~0.5 s per statement measured).
SELECT set_config('jit', 'off', true)

-- name: incremental_delete
DELETE FROM {model} WHERE {key} IN (SELECT id FROM chtsync_changed_ids)

-- name: incremental_insert
INSERT INTO {model} SELECT * FROM ({body}) AS m WHERE m.{key} IN (SELECT id FROM chtsync_changed_ids)

-- name: full_insert
INSERT INTO {model} SELECT * FROM ({body}) AS m

-- name: truncate
TRUNCATE {model}

-- name: delete_all
DELETE FROM {model}

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
-- refresh_seq tells the models reading this one that it changed (theirs is lower). A run that
-- deleted and inserted no row (touched false) only catches up with its upstream models' seqs
-- (%(seen)s, their highest): it has seen them, and its readers are not re-run for nothing.
UPDATE chtsync_models SET
    last_refresh_at = now(),
    last_success_at = now(),
    last_duration_ms = %(ms)s,
    last_rows = %(rows)s,
    last_status = 'ok',
    last_error = NULL,
    watermark = pg_snapshot_xmin(%(snapshot)s::pg_snapshot),
    snapshot = %(snapshot)s::pg_snapshot,
    refresh_seq = CASE WHEN %(touched)s THEN nextval('chtsync_models_refresh_seq')
                       ELSE GREATEST(refresh_seq, %(seen)s) END
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
CREATE {unique}INDEX {index} ON {relation} {body}

-- name: model_index_body
USING {method} ({columns})

-- name: grant_privilege
GRANT {privilege} ON {relation} TO {grantee}{grant_option}

-- name: drop_object
DROP {kind} {relation}

-- name: analyze_due
-- Relations (the raw table, the models) with more rows written since their last ANALYZE, by
-- anyone, than autovacuum's own threshold allows (threshold + scale factor x rows). chtsync
-- analyzes them itself, so plans stay right when autovacuum is off or late. Also those holding
-- rows that were never analyzed nor vacuumed (reltuples -1): the write counters are lost in a
-- crash and are not carried by a restore or a copied database, and without statistics each
-- round's plans read the whole raw table (20 s per model at 10M documents, measured).
SELECT s.relname
FROM pg_stat_user_tables AS s
JOIN pg_class AS c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.relname = ANY (%s::text[])
  AND (s.n_mod_since_analyze > current_setting('autovacuum_analyze_threshold')::float8
       + current_setting('autovacuum_analyze_scale_factor')::float8 * greatest(c.reltuples, 0)
       OR (c.reltuples < 0 AND pg_relation_size(c.oid) > 0))

-- name: analyze
ANALYZE {relation}

-- name: pending_groups_record
-- The groups of aggregate model %(model)s that the given rows of its upstream belong to: its
-- SQL run over those rows alone (the upstream renamed to chtsync_delta); the condition keeps
-- the groups to recount (all, or those with a NULL key when the counts are added). The pieces
-- that follow (group_pair to group_delta_match) are one column's part of these queries, joined
-- by the caller (label: the column's name as a string); they hold no comment, being inlined.
INSERT INTO chtsync_model_pending (model, key)
SELECT DISTINCT %(model)s, jsonb_build_object({pairs}) FROM ({body}) AS g WHERE {where}
ON CONFLICT DO NOTHING

-- name: group_deltas_record
-- The same SQL's counts over those rows, signed (-1: rows before the delete, 1: after the
-- insert), for the groups whose counts are added (the condition: no NULL key).
INSERT INTO chtsync_model_deltas (model, key, counts)
SELECT %(model)s, jsonb_build_object({pairs}), jsonb_build_object({counts}) FROM ({body}) AS g WHERE {where}

-- name: group_pair
{label}, g.{column}

-- name: every_group
true

-- name: group_null_key
NOT ({keyed})

-- name: group_key_value
g.{column} IS NOT NULL

-- name: group_count_pair
{label}, g.{column} * {sign}

-- name: group_delta_key
(key ->> {label})::{type} AS {column}

-- name: group_delta_sum
sum((counts ->> {label})::bigint)::bigint AS {column}

-- name: group_delta_nonzero
sum((counts ->> {label})::bigint) <> 0

-- name: group_delta_add
{column} = m.{column} + d.{column}

-- name: group_delta_match
m.{column} = d.{column}

-- name: group_deltas_take
-- Take the aggregate's recorded counts, summed per group and typed as its columns; groups whose
-- changes cancel out are left out.
CREATE TEMP TABLE chtsync_group_delta ON COMMIT DROP AS
WITH taken AS (DELETE FROM chtsync_model_deltas WHERE model = %(model)s RETURNING key, counts)
SELECT {keys}, {sums} FROM taken GROUP BY key HAVING {nonzero}

-- name: group_deltas_analyze
ANALYZE chtsync_group_delta

-- name: group_deltas_update
UPDATE {model} AS m SET {sets} FROM chtsync_group_delta AS d WHERE {match}

-- name: group_deltas_insert
-- Groups the table does not have yet (a count(*) above 0: the group has rows).
INSERT INTO {model} ({columns})
SELECT {columns} FROM chtsync_group_delta AS d
WHERE d.{star} > 0 AND NOT EXISTS (SELECT FROM {model} AS m WHERE {match})

-- name: group_deltas_delete
-- Groups left without rows.
DELETE FROM {model} AS m USING chtsync_group_delta AS d WHERE {match} AND m.{star} <= 0

-- name: group_deltas_drop
DROP TABLE chtsync_group_delta

-- name: pending_all
-- The upstream was rebuilt from scratch: every group of the aggregate is to be recounted.
INSERT INTO chtsync_model_pending (model, key) VALUES (%s, 'null') ON CONFLICT DO NOTHING

-- name: pending_take
-- Take the aggregate's pending groups: (true, NULL, NULL) for "every group", else one row per
-- (column, value as text) of each group.
WITH taken AS (DELETE FROM chtsync_model_pending WHERE model = %s RETURNING key)
SELECT t.key = 'null'::jsonb, e.key, e.value
FROM taken AS t
LEFT JOIN LATERAL jsonb_each_text(CASE WHEN jsonb_typeof(t.key) = 'object' THEN t.key END) AS e ON true

-- name: pending_clear
-- Groups and counts an aggregate had waiting (it is being counted in full).
WITH counts AS (DELETE FROM chtsync_model_deltas WHERE model = %(model)s)
DELETE FROM chtsync_model_pending WHERE model = %(model)s

-- name: delta_table
-- The upstream's rows of the changed documents, before the delete and after the insert.
CREATE TEMP TABLE chtsync_delta ON COMMIT DROP AS
SELECT * FROM {model} WHERE {key}::text IN (SELECT id FROM chtsync_changed_ids)

-- name: delta_add
-- (after delta_clear: the rows after the insert alone)
INSERT INTO chtsync_delta SELECT * FROM {model} WHERE {key}::text IN (SELECT id FROM chtsync_changed_ids)

-- name: delta_clear
DELETE FROM chtsync_delta

-- name: delta_drop
DROP TABLE chtsync_delta

-- name: column_types
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute AS a
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped

-- name: group_filter
-- One group column's recount condition: its value is one of the touched ones (or NULL, when a
-- touched group had NULL there).
(m.{column} = ANY (%s::text[]::{type}[]) OR (%s AND m.{column} IS NULL))

-- name: aggregate_delete
DELETE FROM {model} AS m WHERE {condition}

-- name: aggregate_insert
-- The condition names only group columns, so Postgres pushes it below the GROUP BY.
INSERT INTO {model} SELECT * FROM ({body}) AS m WHERE {condition}

-- name: build_state
SELECT build_snapshot::text, build_block, build_blocks, build_filenode::bigint, build_into,
       coalesce(build_docs, 0), coalesce(build_rows, 0), build_total, build_hash
FROM chtsync_models WHERE name = %s

-- name: raw_documents
-- How many documents a first build goes through: the planner's estimate once the raw table
-- has been analyzed (chtsync does it before building), else a count.
SELECT CASE WHEN c.reltuples > 0 THEN c.reltuples::bigint
            ELSE (SELECT count(*) FROM {table}) END
FROM pg_class AS c WHERE c.oid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass

-- name: raw_blocks
-- The raw table's size in blocks now, and its file: a rewrite (VACUUM FULL, CLUSTER) gives it a
-- new file and moves every row, so a build by block ranges under way starts over.
SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint, pg_relation_filenode(c.oid)::bigint
FROM pg_class AS c WHERE c.oid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass

-- name: build_start
UPDATE chtsync_models SET
    build_snapshot = %(snapshot)s::pg_snapshot, build_block = 0, build_blocks = %(blocks)s,
    build_filenode = %(filenode)s::oid, build_into = %(into)s, build_hash = %(hash)s, build_docs = 0, build_rows = 0,
    build_total = %(total)s, build_started_at = now()
WHERE name = %(name)s

-- name: build_range
-- The blocks [from, to) of the raw table one batch reads (build_block_source, build_block_ids).
SELECT set_config('chtsync.build_from', %s, true), set_config('chtsync.build_to', %s, true)

-- name: build_block_ids
-- A model that cannot read a block range alone (it reads the raw table twice, or groups): the
-- ids of the documents in the range, whose rows the batch deletes and derives again.
INSERT INTO chtsync_changed_ids (id)
SELECT DISTINCT _id FROM {table}
WHERE ctid >= current_setting('chtsync.build_from')::tid AND ctid < current_setting('chtsync.build_to')::tid

-- name: aggregate_functions
-- Which of these function names are aggregates or window functions (a model calling one
-- without GROUP BY cannot be built by block ranges).
SELECT coalesce(array_agg(DISTINCT proname::text), '{}') FROM pg_proc
WHERE proname = ANY (%s::text[]) AND prokind IN ('a', 'w')

-- name: build_progress
UPDATE chtsync_models SET
    build_block = %(block)s, build_docs = %(docs)s, build_rows = %(rows)s, last_refresh_at = now()
WHERE name = %(name)s

-- name: build_done
UPDATE chtsync_models SET
    build_snapshot = NULL, build_block = NULL, build_blocks = NULL, build_filenode = NULL,
    build_into = NULL, build_hash = NULL, build_docs = NULL, build_rows = NULL, build_total = NULL,
    build_started_at = NULL
WHERE name = %s

-- name: relation_exists
SELECT to_regclass(quote_ident(current_schema()) || '.' || quote_ident(%s)) IS NOT NULL

-- name: lock_exclusive
-- The swap: readers of the old object wait for this short transaction (lock_timeout bounds it).
LOCK TABLE {relation} IN ACCESS EXCLUSIVE MODE

-- name: relation_extras
-- What the swap carries from the old object to the new one: grants (as view_definition's) and
-- the comment.
SELECT ARRAY(SELECT jsonb_build_object(
                 'privilege', a.privilege_type,
                 'grantee', CASE WHEN a.grantee = 0 THEN NULL ELSE a.grantee::regrole::text END,
                 'grantable', a.is_grantable)
             FROM aclexplode(c.relacl) AS a
             WHERE a.grantee <> c.relowner),
       obj_description(c.oid, 'pg_class')
FROM pg_class AS c
WHERE c.oid = (quote_ident(current_schema()) || '.' || quote_ident(%s))::regclass

-- name: comment_on
COMMENT ON {kind} {relation} IS {comment}

-- name: rename_relation
ALTER {kind} {relation} RENAME TO {new}

-- name: relation_indexes
SELECT i.relname::text
FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid
WHERE x.indrelid = to_regclass(quote_ident(%s))

-- name: drop_index
DROP INDEX IF EXISTS {index}

-- name: rename_index
ALTER INDEX IF EXISTS {index} RENAME TO {new}

-- name: drop_if_exists
DROP {kind} IF EXISTS {relation}

-- name: build_block_source
-- What a model built by block ranges reads in place of the raw table (graph._block_sql): the
-- blocks of one range, a TID range scan. Settings rather than parameters: the model's own SQL
-- around it may hold % and braces. doc #> '{}' is doc itself, decompressed once: Postgres
-- decompresses a compressed value at every reference (a report model has a dozen), and OFFSET 0
-- keeps the subquery from being pulled up into them. The columns are migration 0001's, in order.
SELECT saved_timestamp, _id, _deleted, source, doc #> '{}' AS doc, _rev, _xid FROM couchdb
WHERE ctid >= current_setting('chtsync.build_from')::tid AND ctid < current_setting('chtsync.build_to')::tid
OFFSET 0

-- name: build_block_model_source
-- The same for a model built by the block ranges of an incremental model it reads (the name is
-- replaced by graph._block_sql).
SELECT * FROM model
WHERE ctid >= current_setting('chtsync.build_from')::tid AND ctid < current_setting('chtsync.build_to')::tid

-- name: build_shared
-- First builds of several models that read the raw table by block ranges, sharing one read of a
-- range (refresh._build_shared): the range's documents, each decompressed once, are kept in a
-- materialized CTE that every model's shared SQL reads in place of the raw table, each model
-- inserting its rows; the rows each inserted, in the models' order. Columns as build_block_source.
WITH {source} AS MATERIALIZED (
    SELECT saved_timestamp, _id, _deleted, source, doc #> '{{}}' AS doc, _rev, _xid FROM {table}
    WHERE ctid >= current_setting('chtsync.build_from')::tid AND ctid < current_setting('chtsync.build_to')::tid
), {inserts}
SELECT {counts}

-- name: build_shared_insert
{cte} AS (INSERT INTO {model} SELECT * FROM ({body}) AS m RETURNING 1)

-- name: build_shared_count
(SELECT count(*) FROM {cte})

-- name: local_shared_work_mem
-- The CTE of a shared build holds one range's decompressed documents (SHARED_BUILD_ROWS, about
-- 10 MB): at least 16MB for this transaction keeps it out of temporary files.
SELECT set_config('work_mem', '16MB', true)
WHERE pg_size_bytes(current_setting('work_mem')) < pg_size_bytes('16MB')

-- name: build_sample
-- A model's cost over one block range, to share the builds out evenly (refresh._groups): its
-- rows derived and inserted, in a transaction rolled back.
INSERT INTO {model} SELECT * FROM ({body}) AS m

-- name: build_progress_shared
-- build_progress for every model of a shared build at once (they share the range done).
UPDATE chtsync_models AS m SET
    build_block = %(block)s, build_docs = %(docs)s, build_rows = p.rows, last_refresh_at = now()
FROM unnest(%(names)s::text[], %(rows)s::bigint[]) AS p (name, rows)
WHERE m.name = p.name
