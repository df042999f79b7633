-- chtsync 0011: groups of aggregate models waiting to be recounted.
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
