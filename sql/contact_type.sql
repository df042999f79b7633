-- Contact types configured in the settings document, full-outer-joined with the types contacts
-- actually use. A view: it has no document key, and it is small and rarely read.
WITH configured AS (
    -- Several settings documents (one per instance) may list the same id: one row per id.
    SELECT
        t ->> 'id' AS id,
        -- boolean-ish spellings are accepted; anything else means false rather than an error
        bool_or(lower(t ->> 'person') IN ('true', 't', 'yes', 'y', 'on', '1')) AS person
    FROM couchdb AS s
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(s.doc #> '{settings,contact_types}') = 'array'
             THEN s.doc #> '{settings,contact_types}' ELSE '[]'::jsonb END) AS t
    WHERE s._id = 'settings' AND NOT s._deleted AND t ->> 'id' IS NOT NULL
    GROUP BY 1
), used AS (
    SELECT DISTINCT contact_type AS id
    FROM contact
    WHERE contact_type IS NOT NULL
)
SELECT
    COALESCE(configured.id, used.id) AS id,
    COALESCE(configured.id, used.id) = 'person' OR COALESCE(configured.person, false) AS person,
    configured.id IS NOT NULL AS configured
FROM configured
FULL OUTER JOIN used ON used.id = configured.id
