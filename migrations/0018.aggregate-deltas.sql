-- chtsync 0018: count changes of aggregate models made of group columns and count(...) only.
-- An incremental model's refresh records, in its own transaction, each such aggregate's counts
-- over the changed documents' old rows (negated) and new rows, one row per group and side; the
-- aggregate's refresh sums them per group and adds them to its rows, so that its cost follows
-- the change, not the size of the groups (docs/pipeline.md, "Aggregate models").
-- depends: 0017.build-blocks

CREATE TABLE IF NOT EXISTS chtsync_model_deltas (
    model text NOT NULL,
    -- the group's unique_key values as a JSON object (never NULL ones: those groups are recounted)
    key jsonb NOT NULL,
    -- {count column: signed change}
    counts jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS chtsync_model_deltas_model ON chtsync_model_deltas (model);
