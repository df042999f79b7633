-- Every contact (place or person), as CHT Pipeline 2.0 `contact`.
SELECT
    _id AS uuid,
    saved_timestamp,
    -- ms since epoch; '', non-numeric -> NULL; seconds are recognised (migrations/0006)
    chtsync_epoch_v1(doc ->> 'reported_date') AS reported,
    doc #>> '{parent,_id}' AS parent_uuid,
    doc ->> 'name' AS name,
    COALESCE(doc ->> 'contact_type', doc ->> 'type') AS contact_type,
    doc ->> 'is_active' AS active,
    doc ->> 'notes' AS notes,
    NULLIF(doc ->> 'muted', '') AS muted
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' IN ('contact', 'clinic', 'district_hospital', 'health_center', 'person')
