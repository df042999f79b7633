-- chtsync 0003: what the pipeline engine created, and how far each model has been refreshed.
-- Runs with search_path = the configured schema.
-- depends: 0002.ingest-function

CREATE TABLE IF NOT EXISTS chtsync_models (
    name text PRIMARY KEY,
    kind text NOT NULL,
    -- sha256 of (kind, normalized SQL, unique_key, indexes, upstream hashes): a change rebuilds
    definition_hash text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_refresh_at timestamptz,      -- last attempt, successful or not
    last_success_at timestamptz,
    last_duration_ms double precision,
    last_rows bigint,
    last_status text,                 -- created | ok | error | blocked
    last_error text,
    -- The snapshot taken at the start of the last successful refresh, and its xmin: a raw row
    -- is new to the model when its _xid >= watermark and is not visible in that snapshot.
    watermark xid8,
    snapshot pg_snapshot,
    -- position in the global order of refreshes: a model whose upstream has a higher number
    -- has inputs newer than its own data
    refresh_seq bigint
);

CREATE SEQUENCE IF NOT EXISTS chtsync_models_refresh_seq;
