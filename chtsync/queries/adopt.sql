-- Named queries of the CHT Sync adoption (chtsync/adopt.py). {x} = a quoted identifier or literal.
-- Everything that touches a large table is either catalog-only, CONCURRENTLY, or batched.

-- name: adopt_relations
-- Every relation of the schema with its size: what is there, and how much work a step is.
-- reltuples is -1 for a table never analyzed.
SELECT c.relname, c.relkind::text, c.reltuples::bigint,
       pg_relation_size(c.oid), pg_total_relation_size(c.oid)
FROM pg_class AS c
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %s)
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')

-- name: adopt_columns
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute AS a
LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

-- name: adopt_indexes
-- Indexes of a table: name, valid, unique, primary, key columns (NULL for an expression),
-- partial, access method, and the constraint that owns it (if any).
SELECT i.relname, x.indisvalid, x.indisunique, x.indisprimary,
       ARRAY(SELECT a.attname::text
             FROM unnest(x.indkey[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
             LEFT JOIN pg_attribute AS a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
             ORDER BY k.ord),
       x.indpred IS NOT NULL OR x.indexprs IS NOT NULL, am.amname, con.conname
FROM pg_index AS x
JOIN pg_class AS i ON i.oid = x.indexrelid
JOIN pg_am AS am ON am.oid = i.relam
LEFT JOIN pg_constraint AS con ON con.conindid = x.indexrelid AND con.conrelid = x.indrelid
                                AND con.contype IN ('p', 'u')
WHERE x.indrelid = %s::regclass
ORDER BY i.relname

-- name: adopt_check_constraints
SELECT conname, convalidated FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'c'

-- name: adopt_index_owner
-- The relation an index name in the schema belongs to (names are schema-wide).
SELECT t.relname
FROM pg_class AS i
JOIN pg_index AS x ON x.indexrelid = i.oid
JOIN pg_class AS t ON t.oid = x.indrelid
WHERE i.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %s) AND i.relname = %s

-- name: adopt_has_null_source
-- Uses CHT Sync 2.x's index on source: btree indexes keep NULLs.
SELECT EXISTS (SELECT 1 FROM {table} WHERE source IS NULL)

-- name: adopt_has_rows
SELECT EXISTS (SELECT 1 FROM {table})

-- name: adopt_count_rows
SELECT count(*) FROM {table}

-- name: adopt_count_null_source
SELECT count(*) FROM {table} WHERE source IS NULL

-- name: adopt_progress_rows
SELECT source, seq FROM {progress} ORDER BY source

-- name: adopt_lock_timeout
-- Local to the swap's transaction: give up (and retry) rather than queue readers behind us.
SELECT set_config('lock_timeout', %s, true)

-- name: adopt_add_rev
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS _rev text

-- name: adopt_add_xid
-- No default here: a volatile default would rewrite every row. Old rows keep NULL.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS _xid xid8

-- name: adopt_xid_default
ALTER TABLE {table} ALTER COLUMN _xid SET DEFAULT pg_current_xact_id()

-- name: adopt_column_defaults
ALTER TABLE {table}
    ALTER COLUMN saved_timestamp SET DEFAULT now(),
    ALTER COLUMN _deleted SET DEFAULT false

-- name: adopt_rename_timestamp
ALTER TABLE {table} RENAME COLUMN "@timestamp" TO saved_timestamp

-- name: adopt_add_source
-- A constant default is stored once in the catalog (PostgreSQL 11+): no row is rewritten,
-- and NOT NULL needs no scan because every existing row reads the default.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS source varchar NOT NULL DEFAULT {value}

-- name: adopt_drop_source_default
ALTER TABLE {table} ALTER COLUMN source DROP DEFAULT

-- name: adopt_fill_source
-- One batch of rows CHT Sync stored without a source; short transactions, row locks only.
UPDATE {table} SET source = %s
WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} WHERE source IS NULL LIMIT %s))

-- name: adopt_source_check
ALTER TABLE {table} ADD CONSTRAINT {check} CHECK (source IS NOT NULL) NOT VALID

-- name: adopt_validate_check
-- Scans the table under SHARE UPDATE EXCLUSIVE: reads and writes go on.
ALTER TABLE {table} VALIDATE CONSTRAINT {check}

-- name: adopt_source_not_null
-- The validated check proves there are no NULLs, so this takes no scan.
ALTER TABLE {table} ALTER COLUMN source SET NOT NULL, DROP CONSTRAINT {check}

-- name: adopt_drop_index
DROP INDEX CONCURRENTLY IF EXISTS {index}

-- name: adopt_rename_index
ALTER INDEX {index} RENAME TO {new_name}

-- name: adopt_build_index
CREATE INDEX CONCURRENTLY IF NOT EXISTS {index_name} ON {table} ({column})

-- name: adopt_build_key
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {index_name} ON {table} (_id, source)

-- name: adopt_swap_pkey
-- One short transaction: the unique index built beforehand becomes the primary key.
ALTER TABLE {table} DROP CONSTRAINT {old}, ADD CONSTRAINT {pkey} PRIMARY KEY USING INDEX {index}

-- name: adopt_add_pkey
ALTER TABLE {table} ADD CONSTRAINT {pkey} PRIMARY KEY USING INDEX {index}

-- name: adopt_progress_add_pending
ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS pending integer

-- name: adopt_progress_add_updated_at
ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS updated_at timestamptz

-- name: adopt_progress_key
-- couchdb_progress is one row per database: small, a plain ALTER is instant.
ALTER TABLE {progress} ADD PRIMARY KEY (source)
