-- Named queries of `chtsync demo` and its local servers ({...} are quoted identifiers).

-- name: drop_database
DROP DATABASE IF EXISTS {db} WITH (FORCE)

-- name: create_database
CREATE DATABASE {db}

-- name: uuids_present
SELECT uuid FROM {relation} WHERE uuid = ANY(%s)

-- name: model_ages
SELECT name, kind, extract(epoch FROM now() - last_success_at)::int FROM {models} ORDER BY name

-- name: demo_tests
-- The data tests' last results (models.yaml `tests`).
SELECT model, name, status, message FROM {tests} ORDER BY model, name
