-- Telemetry documents (one per user, device and period, in medic-users-meta).
SELECT
    uuid,
    saved_timestamp,
    -- Midnight UTC of the period; NULL (row kept) when the parts do not make a real date.
    -- Nested CASEs: make_date must only see values already known to be in range.
    CASE WHEN whole_day IS NOT NULL THEN whole_day::timestamp AT TIME ZONE 'UTC'
         WHEN y BETWEEN 1 AND 9999 AND m BETWEEN 1 AND 12 AND d BETWEEN 1 AND 31 THEN
        CASE WHEN d <= extract(day FROM make_date(y, m, 1) + interval '1 month - 1 day') THEN
            make_timestamptz(y, m, d, 0, 0, 0, 'UTC')
        END
    END AS period_start,
    user_name,
    app_version,
    boot_time_min,
    boot_time_max,
    boot_time_count,
    doc_count_on_local_db
FROM (
    SELECT
        _id AS uuid,
        saved_timestamp,
        CASE WHEN doc #>> '{metadata,year}' ~ '^[0-9]{1,4}$'
             THEN (doc #>> '{metadata,year}')::int END AS y,
        CASE WHEN doc #>> '{metadata,month}' ~ '^[0-9]{1,2}$' THEN
            (doc #>> '{metadata,month}')::int
            -- apps before 3.8.0 wrote JavaScript's zero-based month; compare versions as
            -- numbers ('3.10.0' is newer than '3.8.0'); an unknown version is taken as modern
            + CASE WHEN (regexp_match(doc #>> '{metadata,versions,app}',
                                      '([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})'))::int[]
                        < '{3,8,0}'::int[]
                   THEN 1 ELSE 0 END
        END AS m,
        -- No year and no month, and a whole date in day: that date (CHT Pipeline's CONCAT_WS
        -- skips the missing parts and reads the day alone as the date).
        CASE WHEN doc #>> '{metadata,year}' IS NULL AND doc #>> '{metadata,month}' IS NULL
             THEN chtsync_try_date_v1(doc #>> '{metadata,day}') END AS whole_day,
        CASE WHEN doc #>> '{metadata,day}' IS NULL THEN 1
             WHEN doc #>> '{metadata,day}' ~ '^[0-9]{1,2}$' THEN (doc #>> '{metadata,day}')::int
        END AS d,
        doc #>> '{metadata,user}' AS user_name,
        doc #>> '{metadata,versions,app}' AS app_version,
        doc #>> '{metrics,boot_time,min}' AS boot_time_min,
        doc #>> '{metrics,boot_time,max}' AS boot_time_max,
        doc #>> '{metrics,boot_time,count}' AS boot_time_count,
        doc #>> '{dbInfo,doc_count}' AS doc_count_on_local_db
    FROM couchdb
    WHERE NOT _deleted
      AND doc ->> 'type' = 'telemetry'
) AS t
