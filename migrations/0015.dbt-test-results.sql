-- chtsync 0015: the data tests' last results with dbt_results' columns, as `dbt_test_results`.
-- dbt_results itself stays one row per model: CHT Sync ran `dbt run` (models only) and CHT
-- Watchdog's collector reads every row of it as a model; tests with dbt's statuses (pass, warn,
-- fail, error) there would read as failed models. `SELECT * FROM dbt_results UNION ALL SELECT *
-- FROM dbt_test_results` gives what `dbt build` would have recorded.
-- Runs with search_path = the configured schema.
-- depends: 0012.dbt-results 0014.model-tests

CREATE OR REPLACE VIEW dbt_test_results AS
SELECT
    extract(epoch FROM t.run_at)::bigint::text || '.' || t.unique_id AS result_id,
    extract(epoch FROM t.run_at)::bigint::text AS invocation_id,
    'test.chtsync.' || t.model || '.' || t.name AS unique_id,
    current_database()::text AS database_name,
    (SELECT c.relnamespace::regnamespace::text FROM pg_class AS c
     WHERE c.oid = 'chtsync_model_tests'::regclass) AS schema_name,
    t.model || '.' || t.name AS name,
    'test'::text AS resource_type,
    t.status,
    coalesce(t.execution_time, 0)::double precision AS execution_time,
    t.failures AS rows_affected
FROM chtsync_model_tests AS t;
