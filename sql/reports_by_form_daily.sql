-- Reports per form and UTC day. Messages without a form and reports without a usable
-- reported date are left out, so (form, day) is never NULL and stays a unique key.
SELECT
    form,
    (reported AT TIME ZONE 'UTC')::date AS day,
    count(*) AS count
FROM data_record
WHERE form IS NOT NULL
  AND reported IS NOT NULL
GROUP BY form, (reported AT TIME ZONE 'UTC')::date
