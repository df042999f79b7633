-- Persons that carry a patient_id (the short id reports refer to).
SELECT
    uuid,
    saved_timestamp,
    patient_id
FROM person
WHERE patient_id IS NOT NULL
