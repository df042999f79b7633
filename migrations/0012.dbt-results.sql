-- chtsync 0012: `dbt_results`, as CHT Sync's dbt on-run-end hook leaves it, for CHT Watchdog.
-- Watchdog's cht-sync collector reads `SELECT status, execution_time, name AS table_name FROM
-- <schema>.dbt_results`; here it is a view over chtsync's own refresh records, one row per model.
-- Runs with search_path = the configured schema.
-- depends: 0006.model-helpers

-- A CHT Sync database has dbt's real table (or anything else) under that name: it is kept, with
-- its rows, as dbt_results_cht_sync (a catalog-only rename), and the view takes the name.
DO $$
DECLARE
    kind "char";
BEGIN
    SELECT c.relkind INTO kind FROM pg_class AS c
    WHERE c.relname = 'dbt_results' AND c.relnamespace = current_schema()::regnamespace;
    IF kind IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class AS c WHERE c.relname = 'dbt_results_cht_sync'
               AND c.relnamespace = current_schema()::regnamespace) THEN
        RAISE EXCEPTION 'both dbt_results and dbt_results_cht_sync exist in schema %: drop or rename'
            ' one of them, then run chtsync migrate again', current_schema();
    END IF;
    EXECUTE format('ALTER %s dbt_results RENAME TO dbt_results_cht_sync',
                   CASE kind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END);
END
$$;

-- The columns of CHT Sync's table, in its order. status is dbt's word: success, error, or skipped
-- (a model blocked by a failed upstream); execution_time is in seconds, as dbt writes it.
-- Data tests (resource_type 'test', unique_id 'test.chtsync.<model>.<test>') join later through
-- CREATE OR REPLACE VIEW ... UNION ALL with these same columns.
CREATE VIEW dbt_results AS
SELECT
    coalesce(m.refresh_seq, 0)::text || '.model.chtsync.' || m.name AS result_id,
    coalesce(m.refresh_seq, 0)::text AS invocation_id,
    'model.chtsync.' || m.name AS unique_id,
    current_database()::text AS database_name,
    (SELECT c.relnamespace::regnamespace::text FROM pg_class AS c
     WHERE c.oid = 'chtsync_models'::regclass) AS schema_name,
    m.name,
    'model'::text AS resource_type,
    CASE m.last_status WHEN 'error' THEN 'error' WHEN 'blocked' THEN 'skipped' ELSE 'success' END
        AS status,
    coalesce(m.last_duration_ms, 0) / 1000.0::double precision AS execution_time,
    m.last_rows AS rows_affected
FROM chtsync_models AS m;
