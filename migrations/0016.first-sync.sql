-- chtsync 0016: the first sync of a big database in parallel key ranges (chtsync/first_sync.py).
-- Runs with search_path = the configured schema.
-- depends: 0015.dbt-test-results

-- While a source's first sync reads _all_docs in key ranges:
--   first_sync_seq:   the database's update_seq taken before the first range was read; the feed
--                     starts there once every range is written (NULL: no first sync under way)
--   first_sync_after: every key range before this key is written (NULL: none yet). Written in
--                     the transaction of the page that completes the range, so it moves only
--                     with the rows it covers.
ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS first_sync_seq text;
ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS first_sync_after text;
