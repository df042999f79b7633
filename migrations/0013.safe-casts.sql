-- chtsync 0013: casts that never fail, for form and contact-type models declared in YAML
-- (docs/models.md, "Form and contact-type models"). Each returns NULL when the text is not a
-- value of its type, so one bad report never stops a model. They are plain SQL expressions,
-- inlined by the planner: the shape is checked by a regular expression and the ranges by
-- nested CASEs (a CASE branch is only evaluated when its condition holds), so no exception
-- block, no subtransaction per row.
-- depends: 0006.model-helpers

-- Whole numbers up to 18 digits (bigint never overflows), optional sign and blanks.
CREATE OR REPLACE FUNCTION chtsync_try_integer_v1(value text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?[0-9]{1,18}\s*$' THEN value::bigint END
$$;

-- Decimal numbers, with an optional exponent of at most 3 digits; not NaN or Infinity.
CREATE OR REPLACE FUNCTION chtsync_try_numeric_v1(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value ~ '^\s*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?\s*$'
                THEN value::numeric END
$$;

-- The words CHT forms and people write for yes and no.
CREATE OR REPLACE FUNCTION chtsync_try_boolean_v1(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN lower(btrim(value)) IN ('true', 't', 'yes', 'y', 'on', '1') THEN true
        WHEN lower(btrim(value)) IN ('false', 'f', 'no', 'n', 'off', '0') THEN false
    END
$$;

-- YYYY-MM-DD (what CHT's date widgets store), a date that exists (no 30 February).
CREATE OR REPLACE FUNCTION chtsync_try_date_v1(value text) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value ~ '^\s*[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])\s*$' THEN
        CASE WHEN substr(btrim(value), 1, 4)::int >= 1
              AND substr(btrim(value), 9, 2)::int <= extract(day FROM
                  make_date(substr(btrim(value), 1, 4)::int, substr(btrim(value), 6, 2)::int, 1)
                  + interval '1 month - 1 day')
        THEN btrim(value)::date END
    END
$$;

-- ISO 8601 date and time ('2024-05-17T08:30:00.123Z', '2024-05-17 08:30+03:00'); without an
-- offset it is UTC, so the result never depends on the session's time zone. A number is
-- milliseconds since the epoch (seconds below 1e11), as chtsync_epoch_v1.
CREATE OR REPLACE FUNCTION chtsync_try_timestamp_v1(value text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN value ~ '^\s*[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?(Z|[+-]([01][0-9]|2[0-3])(:?[0-5][0-9])?)?\s*$'
        THEN CASE WHEN chtsync_try_date_v1(substr(btrim(value), 1, 10)) IS NOT NULL THEN
            CASE WHEN btrim(value) ~ '(Z|[+-][0-9]{2}(:?[0-9]{2})?)$' THEN btrim(value)::timestamptz
                 ELSE (btrim(value) || '+00')::timestamptz END
        END
        WHEN value ~ '^\s*[0-9]{1,15}(\.[0-9]*)?\s*$' THEN chtsync_epoch_v1(value)
    END
$$;

-- A select_multiple answer: a JSON array of values, or CHT's space-separated string.
CREATE OR REPLACE FUNCTION chtsync_try_array_v1(value jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE jsonb_typeof(value)
        WHEN 'array' THEN ARRAY(SELECT jsonb_array_elements_text(value))
        WHEN 'string' THEN regexp_split_to_array(nullif(btrim(value #>> '{}'), ''), '\s+')
    END
$$;
