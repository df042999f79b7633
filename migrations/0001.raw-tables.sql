-- chtsync 0001: the raw table (CHT Sync's layout plus _rev and _xid), progress and errors.
-- Runs with search_path = the configured schema; the raw table's name comes from the
-- connection setting chtsync.table (POSTGRES_TABLE), so one file serves every deployment.
-- depends:

DO $$
DECLARE
    t text := current_setting('chtsync.table');
BEGIN
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %1$I (
            saved_timestamp timestamp NOT NULL DEFAULT now(),
            _id varchar NOT NULL,
            _deleted boolean NOT NULL DEFAULT false,
            source varchar NOT NULL,
            doc jsonb,
            -- winning revision, kept beside doc so verify never reads bodies
            _rev text,
            -- writing transaction: the incremental models' watermark (see docs/design.md)
            _xid xid8 DEFAULT pg_current_xact_id(),
            CONSTRAINT %2$I PRIMARY KEY (_id, source)
        )$ddl$, t, t || '_pkey');
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (saved_timestamp)', t || '_saved_timestamp', t);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (_deleted)', t || '_deleted', t);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (source)', t || '_source', t);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (_xid)', t || '_xid', t);
END
$$;

-- CHT Sync's checkpoint table, same names and meanings (CHT Watchdog reads it).
CREATE TABLE IF NOT EXISTS couchdb_progress (
    seq varchar,
    pending integer,
    updated_at timestamptz,
    source varchar PRIMARY KEY
);

-- Documents (or pages) Postgres refused: kept with the reason, never blocking the feed.
CREATE TABLE IF NOT EXISTS chtsync_errors (
    id bigserial PRIMARY KEY,
    source varchar NOT NULL,
    _id varchar,
    seq text,
    reason text NOT NULL,
    raw text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS chtsync_errors_source ON chtsync_errors (source, created_at);

-- What each follower is doing, written by the process that follows it (read by `status`).
CREATE TABLE IF NOT EXISTS chtsync_sources (
    source varchar PRIMARY KEY,
    state text NOT NULL,
    reason text,
    owner text,
    docs_written bigint NOT NULL DEFAULT 0,
    last_change_at timestamptz,
    caught_up_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
