-- Reports (and incoming SMS messages, which have no form).
SELECT
    _id AS uuid,
    saved_timestamp,
    -- reported_date is ms since epoch. '', negative or non-numeric -> NULL; below 1e11 it
    -- can only be seconds (1e11 ms is 1973), so it is read as seconds.
    CASE WHEN doc ->> 'reported_date' ~ '^\s*[0-9]{1,15}(\.[0-9]*)?\s*$' THEN
        to_timestamp((doc ->> 'reported_date')::numeric
            / CASE WHEN (doc ->> 'reported_date')::numeric < 1e11 THEN 1 ELSE 1000 END)
    END AS reported,
    doc ->> 'form' AS form,
    doc ->> 'from' AS from_phone,
    COALESCE(
        doc ->> 'patient_id',
        doc #>> '{fields,patient_id}',
        doc #>> '{fields,patient_uuid}'
    ) AS patient_id,
    COALESCE(doc ->> 'place_id', doc #>> '{fields,place_id}') AS place_id,
    doc #>> '{contact,_id}' AS contact_uuid,
    doc #>> '{contact,parent,_id}' AS parent_uuid,
    doc #>> '{contact,parent,parent,_id}' AS grandparent_uuid
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' = 'data_record'
