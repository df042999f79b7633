-- chtsync 0014: results of the data tests declared in the models file (docs/pipeline.md,
-- "Data tests"), one row per test, replaced at each run. The columns follow dbt's run results
-- so they can be UNIONed into the dbt_results records: unique_id 'test.<model>.<name>', name,
-- status pass | fail | warn | error, execution_time in seconds, failures, message.
-- depends: 0013.safe-casts

CREATE TABLE IF NOT EXISTS chtsync_model_tests (
    unique_id text PRIMARY KEY,
    model text NOT NULL,
    name text NOT NULL,
    test text NOT NULL,               -- unique | not_null | accepted_values | relationships | row_count | freshness | casts
    column_name text,
    severity text NOT NULL,           -- warn | error (error: the model's dependants wait)
    status text NOT NULL,             -- pass | warn (failed, severity warn) | fail (severity error) | error
    failures bigint,
    message text,
    execution_time double precision,  -- seconds
    run_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS chtsync_model_tests_model ON chtsync_model_tests (model);
