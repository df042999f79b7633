-- CHT users, from their user-settings documents in medic (the _users copies hold credentials
-- and are not read here).
SELECT
    _id AS user_id,
    saved_timestamp,
    COALESCE(doc ->> 'contact_id', doc ->> 'facility_id') AS contact_uuid,
    doc ->> 'language' AS language,
    doc ->> 'roles' AS roles
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' = 'user-settings'
