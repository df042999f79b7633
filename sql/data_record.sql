-- Reports (and incoming SMS messages, which have no form).
SELECT
    _id AS uuid,
    saved_timestamp,
    -- ms since epoch; '', non-numeric -> NULL; seconds are recognised (migrations/0006)
    chtsync_epoch_v1(doc ->> 'reported_date') AS reported,
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
    doc #>> '{contact,parent,parent,_id}' AS grandparent_uuid,
    -- how the form was opened: 'task', 'contact', 'action'... (CHT Pipeline's open change)
    doc #>> '{fields,inputs,source}' AS source
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' = 'data_record'
