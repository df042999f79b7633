-- The person- and place-specific fields of every contact, keyed by document like `contact`.
-- It is deliberately blind to the settings document: whether a contact is a person or a place
-- is decided at read time by the `person` and `place` views, so a settings change reclassifies
-- contacts at once, while their fields stay in an indexed incremental table.
SELECT
    _id AS uuid,
    saved_timestamp,
    COALESCE(doc ->> 'contact_type', doc ->> 'type') AS contact_type,
    doc ->> 'sex' AS sex,
    doc ->> 'phone' AS phone,
    doc ->> 'alternative_phone' AS phone2,
    doc ->> 'patient_id' AS patient_id,
    doc ->> 'contact_id' AS contact_id,
    doc ->> 'place_id' AS place_id
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' IN ('contact', 'clinic', 'district_hospital', 'health_center', 'person')
