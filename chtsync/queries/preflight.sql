-- Named queries of the preflight checks (chtsync/preflight.py): read-only, run before any write.

-- name: preflight_schema_privileges
-- May the role create chtsync's schema (when missing) or tables in it (when present)?
SELECT n.oid IS NOT NULL,
       CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database(), 'CREATE')
            ELSE has_schema_privilege(n.oid, 'CREATE') AND has_schema_privilege(n.oid, 'USAGE') END,
       current_user::text, current_database()::text
FROM (SELECT 1) AS one
LEFT JOIN pg_namespace AS n ON n.nspname = %s

-- name: preflight_migrated
-- chtsync's state table and the raw table exist in the schema (the first migrations ran).
SELECT to_regclass(quote_ident(%(schema)s) || '.chtsync_models') IS NOT NULL
   AND to_regclass(quote_ident(%(schema)s) || '.' || quote_ident(%(table)s)) IS NOT NULL

-- name: preflight_can_create_role
-- grant-reader creates the role when it does not exist: that needs CREATEROLE.
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %(role)s)
    OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = current_user AND (rolcreaterole OR rolsuper))
