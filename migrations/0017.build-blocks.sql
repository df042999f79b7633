-- chtsync 0017: first builds and rebuilds by raw-table block ranges (docs/pipeline.md, "First
-- builds and rebuilds"). A build walks the raw table's blocks in ranges, one transaction each;
-- it records the block reached, how many blocks it walks (the table's size when it started), the
-- raw table's file (a rewrite such as VACUUM FULL or CLUSTER moves every row: the build starts
-- over) and, for a rebuild, the shadow table it fills beside the model and the definition hash
-- it builds (a shadow of another definition is built again). build_after (the last
-- document id of the batches by id this replaces) is dropped: a build it recorded starts over.
-- depends: 0015.dbt-test-results

ALTER TABLE chtsync_models
    DROP COLUMN IF EXISTS build_after,
    ADD COLUMN IF NOT EXISTS build_block bigint,
    ADD COLUMN IF NOT EXISTS build_blocks bigint,
    ADD COLUMN IF NOT EXISTS build_filenode oid,
    ADD COLUMN IF NOT EXISTS build_into text,
    ADD COLUMN IF NOT EXISTS build_hash text;
