-- Templates of the models declared in a few lines of YAML (chtsync/pipeline/forms.py renders
-- them with psycopg.sql; docs/models.md, "Form and contact-type models"). {x} is a quoted
-- identifier, literal or fragment; `chtsync models sql NAME` prints a rendered one.
-- JSON paths are written with -> so that the only braces here are placeholders.

-- name: form_model
-- A report form (or several): data_record's columns, one typed column per field, and the
-- names of the fields whose value did not cast to their type (NULL when all did).
SELECT
    _id AS uuid,
    saved_timestamp,
    chtsync_epoch_v1(doc ->> 'reported_date') AS reported,
    doc ->> 'form' AS form,
    doc ->> 'from' AS from_phone,
    COALESCE(
        doc ->> 'patient_id',
        doc -> 'fields' ->> 'patient_id',
        doc -> 'fields' ->> 'patient_uuid'
    ) AS patient_id,
    COALESCE(doc ->> 'place_id', doc -> 'fields' ->> 'place_id') AS place_id,
    doc -> 'contact' ->> '_id' AS contact_uuid,
    doc -> 'contact' -> 'parent' ->> '_id' AS parent_uuid,
    doc -> 'contact' -> 'parent' -> 'parent' ->> '_id' AS grandparent_uuid,
    doc -> 'fields' -> 'inputs' ->> 'source' AS source{columns},
    {failures} AS _cast_failures
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' = 'data_record'
  AND doc ->> 'form' IN ({names})

-- name: contact_type_model
-- The contacts of one contact type (or several): contact's columns, one typed column per
-- field, and the fields whose value did not cast.
SELECT
    _id AS uuid,
    saved_timestamp,
    chtsync_epoch_v1(doc ->> 'reported_date') AS reported,
    doc -> 'parent' ->> '_id' AS parent_uuid,
    doc ->> 'name' AS name,
    COALESCE(doc ->> 'contact_type', doc ->> 'type') AS contact_type,
    doc ->> 'is_active' AS active,
    doc ->> 'notes' AS notes,
    NULLIF(doc ->> 'muted', '') AS muted{columns},
    {failures} AS _cast_failures
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' IN ('contact', 'clinic', 'district_hospital', 'health_center', 'person')
  AND COALESCE(doc ->> 'contact_type', doc ->> 'type') IN ({names})

-- name: field_value_text
-- A text field: the value as written (a number as its text, an object as JSON text).
doc #>> {path}

-- name: field_value_cast
-- A typed field: a cast of migrations/0013 (NULL when the value is not of the type).
{cast}(doc #>> {path})

-- name: field_value_array
-- A select_multiple field: a JSON array, or CHT's space-separated string.
chtsync_try_array_v1(doc #> {path})

-- name: field_column
{value} AS {column}

-- name: cast_failed
-- The field's name when it holds a value (not null, not blank) that did not cast.
CASE WHEN {value} IS NULL AND NULLIF(btrim(doc #>> {path}), '') IS NOT NULL THEN {field} END

-- name: cast_failures
NULLIF(array_remove(ARRAY[{failed}]::text[], NULL), ARRAY[]::text[])

-- name: raw_size
-- The raw table's rows as the planner estimates them; before its first ANALYZE (reltuples -1),
-- its size over 2 kB, about a CHT document's.
SELECT COALESCE((SELECT CASE WHEN reltuples >= 0 THEN reltuples ELSE pg_relation_size(oid) / 2048.0 END
                 FROM pg_class WHERE oid = to_regclass(%s)), 0)::float8

-- name: form_fields
-- `chtsync models fields FORM`: every path under the reports' `fields` that holds a value (not
-- an object), its JSON types and how many reports have it; {sample} is empty or a TABLESAMPLE.
WITH RECURSIVE reports AS (
    SELECT doc -> 'fields' AS fields
    FROM {table} {sample}
    WHERE NOT _deleted
      AND doc ->> 'type' = 'data_record'
      AND doc ->> 'form' = %(form)s
      AND jsonb_typeof(doc -> 'fields') = 'object'
),
walk (path, value) AS (
    SELECT ARRAY['fields', e.key], e.value
    FROM reports, jsonb_each(reports.fields) AS e
    UNION ALL
    SELECT w.path || e.key, e.value
    FROM walk AS w,
         jsonb_each(CASE WHEN jsonb_typeof(w.value) = 'object' THEN w.value ELSE jsonb_build_object() END) AS e
)
SELECT array_to_string(path, '.') AS path,
       string_agg(DISTINCT jsonb_typeof(value), ', ') AS types,
       count(*) AS reports,
       (SELECT count(*) FROM reports) AS total
FROM walk
WHERE jsonb_typeof(value) <> 'object'
GROUP BY path
ORDER BY path
