-- Contacts whose contact type is not a person type: the complement of `person`, decided at read
-- time for the same reason (see person.sql).
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
    d.contact_id,
    d.place_id
FROM contact_detail AS d
WHERE NOT EXISTS (SELECT 1 FROM person_type AS p WHERE p.id = d.contact_type)
