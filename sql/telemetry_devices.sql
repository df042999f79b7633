-- The device part of each telemetry document, with the telemetry row's period.
SELECT
    t.uuid,
    t.saved_timestamp,
    t.period_start,
    c.doc #>> '{device,deviceInfo,hardware,manufacturer}' AS device_manufacturer,
    c.doc #>> '{device,deviceInfo,hardware,model}' AS device_model,
    c.doc #>> '{device,userAgent}' AS user_agent,
    c.doc #>> '{device,deviceInfo,app,version}' AS cht_android_version,
    c.doc #>> '{device,deviceInfo,software,androidVersion}' AS android_version,
    c.doc #>> '{device,deviceInfo,storage,free}' AS storage_free,
    c.doc #>> '{device,deviceInfo,storage,total}' AS storage_total,
    c.doc #>> '{device,deviceInfo,network,upSpeed}' AS network_up_speed,
    c.doc #>> '{device,deviceInfo,network,downSpeed}' AS network_down_speed
FROM telemetry AS t
JOIN couchdb AS c ON c._id = t.uuid
WHERE NOT c._deleted
  AND c.doc ->> 'type' = 'telemetry'
