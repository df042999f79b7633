-- Named queries of `chtsync grant-reader` ({schema}, {role}, {table} are quoted identifiers).

-- name: role_exists
SELECT 1 FROM pg_roles WHERE rolname = %s

-- name: role_writes_chtsync
-- The reader must not be chtsync's own user or an owner of its objects: the revokes below would
-- take that role's access to its own tables (and Superset would get write access).
SELECT %(role)s = current_user
    OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s AND pg_get_userbyid(nspowner) = %(role)s)
    OR EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = %(schema)s AND pg_get_userbyid(c.relowner) = %(role)s)

-- name: create_role
CREATE ROLE {role} NOLOGIN

-- name: set_login_password
-- Utility statements take no bind parameters: the password is a quoted literal.
ALTER ROLE {role} LOGIN PASSWORD {password}

-- name: grant_schema
GRANT USAGE ON SCHEMA {schema} TO {role}

-- name: grant_tables
GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}

-- name: grant_future_tables
-- Models are dropped and recreated when their SQL changes: new objects must be readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO {role}

-- name: revoke_table
REVOKE ALL ON {table} FROM {role}
