-- Every contact (place or person), as CHT Pipeline 2.0 `contact`.
SELECT
    _id AS uuid,
    saved_timestamp,
    -- reported_date is ms since epoch. '', negative or non-numeric -> NULL; below 1e11 it
    -- can only be seconds (1e11 ms is 1973), so it is read as seconds.
    CASE WHEN doc ->> 'reported_date' ~ '^\s*[0-9]{1,15}(\.[0-9]*)?\s*$' THEN
        to_timestamp((doc ->> 'reported_date')::numeric
            / CASE WHEN (doc ->> 'reported_date')::numeric < 1e11 THEN 1 ELSE 1000 END)
    END AS reported,
    doc #>> '{parent,_id}' AS parent_uuid,
    doc ->> 'name' AS name,
    COALESCE(doc ->> 'contact_type', doc ->> 'type') AS contact_type,
    doc ->> 'is_active' AS active,
    doc ->> 'notes' AS notes,
    NULLIF(doc ->> 'muted', '') AS muted
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' IN ('contact', 'clinic', 'district_hospital', 'health_center', 'person')
