-- Every live document of every followed database. The same _id can live in two databases
-- (org.couchdb.user:x is in _users and in medic), so the key is (uuid, instance, dbname).
SELECT
    _id AS uuid,
    saved_timestamp,
    _deleted,
    doc ->> 'type' AS doc_type,
    -- source is '<instance>/<db>'; an instance label never contains '/', a db name may
    CASE WHEN strpos(source, '/') > 0 THEN split_part(source, '/', 1) ELSE '' END AS instance,
    substr(source, strpos(source, '/') + 1) AS dbname
FROM couchdb
WHERE NOT _deleted
