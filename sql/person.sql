-- Contacts whose contact type is a person type. A view over `contact_detail`: the rule reads
-- the settings document, and a settings change must reclassify contacts whose own document
-- did not change (an incremental table would keep them where they were).
WITH person_type AS (
    -- Same rule as contact_type.person: 'person' itself, or a settings entry flagged person.
    SELECT 'person'::text AS id
    UNION
    SELECT t ->> 'id'
    FROM couchdb AS s
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(s.doc #> '{settings,contact_types}') = 'array'
             THEN s.doc #> '{settings,contact_types}' ELSE '[]'::jsonb END) AS t
    WHERE s._id = 'settings' AND NOT s._deleted AND t ->> 'id' IS NOT NULL
      AND lower(t ->> 'person') IN ('true', 't', 'yes', 'y', 'on', '1')
)
SELECT
    d.uuid,
    d.saved_timestamp,
    d.sex,
    d.phone,
    d.phone2,
    d.patient_id
FROM contact_detail AS d
WHERE EXISTS (SELECT 1 FROM person_type AS p WHERE p.id = d.contact_type)
