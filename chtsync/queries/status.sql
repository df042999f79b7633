-- Named queries for `chtsync status` and the metrics endpoint (read-only).

-- name: source_status
-- One row per source a follower has written about. `leased` is true while some session holds
-- the source's advisory lock, i.e. a live process follows it (a crashed one cannot).
SELECT s.source,
       p.seq,
       p.pending,
       p.updated_at AS checkpoint_at,
       s.state,
       s.reason,
       s.owner,
       s.docs_written,
       s.last_change_at,
       s.caught_up_at,
       s.updated_at,
       s.purge_seq,
       s.verify_due,
       (SELECT count(*) FROM chtsync_errors e WHERE e.source = s.source) AS errors,
       EXISTS (
           SELECT 1 FROM pg_locks l
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid::bigint = %(lock_class)s
             AND l.objid::bigint = (%(keys)s::jsonb ->> s.source)::bigint
       ) AS leased
FROM chtsync_sources s
LEFT JOIN couchdb_progress p USING (source)
ORDER BY s.source

-- name: docs_per_source
SELECT source, count(*) FILTER (WHERE NOT _deleted) AS docs, count(*) FILTER (WHERE _deleted) AS deleted
FROM {table}
GROUP BY source

-- name: model_status
-- Staleness: seconds since the last successful refresh when raw data changed after it, else 0
-- (a view is always current).
SELECT m.name, m.kind, m.last_refresh_at, m.last_success_at, m.last_duration_ms, m.last_rows,
       m.last_status, m.last_error, m.build_docs, m.build_total, m.build_rows, m.build_into,
       extract(epoch FROM now() - m.build_started_at)::float8 AS build_seconds,
       CASE
           WHEN m.kind = 'view' THEN 0
           WHEN m.last_success_at IS NULL THEN NULL
           WHEN (SELECT max(last_change_at) FROM chtsync_sources) > m.last_success_at
               THEN extract(epoch FROM now() - m.last_success_at)
           ELSE 0
       END::float8 AS staleness_seconds
FROM chtsync_models m
ORDER BY m.name

-- name: verify_status
SELECT source, finished_at, equal, missing, stale, vanished, repaired, error FROM chtsync_verify
