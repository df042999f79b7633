-- Feedback documents (errors and user feedback from the app, in medic-users-meta).
SELECT
    _id AS uuid,
    saved_timestamp,
    doc #>> '{meta,source}' AS source,
    doc #>> '{meta,url}' AS url,
    doc #>> '{meta,user,name}' AS user_name,
    doc #>> '{meta,time}' AS period_start,
    COALESCE(doc #>> '{info,cause}', doc ->> 'info') AS cause,
    doc #>> '{info,message}' AS message
FROM couchdb
WHERE NOT _deleted
  AND doc ->> 'type' = 'feedback'
