-- chtsync 0006: small immutable helpers the shipped models share (inlined by the planner).
-- depends: 0005.resync-flag

-- CHT's reported_date: milliseconds since the epoch. '', negative or non-numeric -> NULL; a
-- value below 1e11 can only be seconds (1e11 ms is 1973), so it is read as seconds.
CREATE OR REPLACE FUNCTION chtsync_epoch_v1(value text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value ~ '^\s*[0-9]{1,15}(\.[0-9]*)?\s*$' THEN
        to_timestamp(value::numeric / CASE WHEN value::numeric < 1e11 THEN 1 ELSE 1000 END)
    END
$$;
