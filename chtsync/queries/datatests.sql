-- Named queries of the data tests declared in the models file (chtsync/pipeline/datatests.py,
-- docs/pipeline.md "Data tests"). Each test query returns one number: its failures (or, for
-- row_count and freshness, the measured value). {x} are quoted identifiers.

-- name: test_unique
-- Values held by more than one row (NULLs do not count, as in dbt).
SELECT count(*) FROM (SELECT {column} FROM {model} WHERE {column} IS NOT NULL GROUP BY 1
                      HAVING count(*) > 1) AS duplicated

-- name: failing_not_null
-- The tests that count rows failing a condition: each condition is also the predicate of a
-- partial index of the failing rows (failing_index), which the count then reads instead of the
-- table. Values are literals: Postgres matches a predicate against constants only.
{column} IS NULL

-- name: failing_accepted_values
{column} IS NOT NULL AND {column}::text <> ALL ({values}::text[])

-- name: failing_casts
_cast_failures IS NOT NULL

-- name: failing_casts_column
{field} = ANY (_cast_failures)

-- name: test_failing
SELECT count(*) FROM {model} WHERE {failing}

-- name: test_failing_casts
-- Values that did not cast to their field's type (all fields).
SELECT COALESCE(sum(cardinality(_cast_failures)), 0)::bigint FROM {model} WHERE {failing}

-- name: failing_indexes
-- The failing-row indexes a model has (its indexes named with the prefix), when it can have any.
SELECT i.relname::text
FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid
WHERE x.indrelid = to_regclass(%(model)s) AND starts_with(i.relname::text, %(prefix)s)

-- name: indexable
SELECT relkind IN ('r', 'm') FROM pg_class WHERE oid = to_regclass(%s)

-- name: failing_index
CREATE INDEX IF NOT EXISTS {index} ON {model} ({column}) WHERE {failing}

-- name: drop_failing_index
DROP INDEX IF EXISTS {index}

-- name: test_relationships
-- Rows whose value is not a key of the other model.
SELECT count(*) FROM {model} AS m
WHERE m.{column} IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM {to} AS t WHERE t.{field}::text = m.{column}::text)

-- name: test_row_count
SELECT count(*) FROM {model}

-- name: test_freshness
-- Seconds since the newest value of the column (NULL when the model has none).
SELECT extract(epoch FROM now() - max({column})::timestamptz)::float8 FROM {model}

-- name: record_test
INSERT INTO chtsync_model_tests AS t (unique_id, model, name, test, column_name, severity, status,
    failures, message, execution_time, run_at)
VALUES (%(unique_id)s, %(model)s, %(name)s, %(test)s, %(column)s, %(severity)s, %(status)s,
        %(failures)s, %(message)s, %(execution_time)s, now())
ON CONFLICT (unique_id) DO UPDATE SET
    model = excluded.model, name = excluded.name, test = excluded.test,
    column_name = excluded.column_name, severity = excluded.severity, status = excluded.status,
    failures = excluded.failures, message = excluded.message,
    execution_time = excluded.execution_time, run_at = excluded.run_at

-- name: forget_tests
-- Results of tests no longer declared for these models, and of models no longer declared.
DELETE FROM chtsync_model_tests
WHERE (model = ANY (%(models)s::text[]) AND unique_id <> ALL (%(keep)s::text[]))
   OR model <> ALL (%(all_models)s::text[])

-- name: test_statuses
SELECT unique_id, status FROM chtsync_model_tests

-- name: model_tests
SELECT unique_id, model, name, test, column_name, severity, status, failures, message,
       execution_time, run_at
FROM chtsync_model_tests
ORDER BY model, name

-- name: has_tests_table
SELECT to_regclass('chtsync_model_tests') IS NOT NULL

-- name: model_columns
SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped
