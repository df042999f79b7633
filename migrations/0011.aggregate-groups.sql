-- chtsync 0011: groups of aggregate models waiting to be recounted; progress of first builds.
-- An incremental model's refresh records, in its own transaction, the groups of every aggregate
-- model reading it that the changed documents belonged to before and after; the aggregate's own
-- refresh recounts those groups and removes them (docs/pipeline.md, "Aggregate models").
-- depends: 0010.change-probes

CREATE TABLE IF NOT EXISTS chtsync_model_pending (
    model text NOT NULL,
    -- the group's unique_key values as a JSON object; 'null' means every group (a full build)
    key jsonb NOT NULL,
    PRIMARY KEY (model, key)
);

-- A first build in progress (incremental models are filled in batches of documents, one
-- transaction each, resumable): the snapshot it started from, the last document id done, rows
-- written, documents to go through in all, and when it started. NULL when not building.
ALTER TABLE chtsync_models
    ADD COLUMN IF NOT EXISTS build_snapshot pg_snapshot,
    ADD COLUMN IF NOT EXISTS build_after text,
    ADD COLUMN IF NOT EXISTS build_docs bigint,
    ADD COLUMN IF NOT EXISTS build_rows bigint,
    ADD COLUMN IF NOT EXISTS build_total bigint,
    ADD COLUMN IF NOT EXISTS build_started_at timestamptz;
