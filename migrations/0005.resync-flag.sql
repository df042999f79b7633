-- chtsync 0005: a source being resynced from 0 (its database was deleted and recreated).
-- While the flag is set its pages are written without the revision guard: the recreated
-- database restarted revision histories, so an id may come back at a "lower" revision that is
-- nevertheless the current truth. Cleared when the follower catches up; kept across restarts.
-- depends: 0004.verify

ALTER TABLE chtsync_sources ADD COLUMN IF NOT EXISTS resync boolean NOT NULL DEFAULT false;
