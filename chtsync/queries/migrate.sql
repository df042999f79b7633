-- Named queries of chtsync.migrate (read-only: `migrate --dry-run` changes nothing).

-- name: yoyo_table_exists
SELECT to_regclass('_yoyo_migration') IS NOT NULL

-- name: applied_migrations
SELECT migration_id FROM _yoyo_migration

-- name: create_schema
CREATE SCHEMA IF NOT EXISTS {schema}
