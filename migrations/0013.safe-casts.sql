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

-- Days in a month of the proleptic Gregorian calendar (month 1-12).
CREATE OR REPLACE FUNCTION chtsync_days_in_month_v1(y int, m int) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN m = 2 THEN CASE WHEN (y % 4 = 0 AND y % 100 <> 0) OR y % 400 = 0 THEN 29 ELSE 28 END
                WHEN m IN (4, 6, 9, 11) THEN 30
                ELSE 31 END
$$;

-- YYYY-MM-DD (what CHT's date widgets store), a date that exists (no 30 February). Built with
-- make_date, not a text cast: date input is only STABLE (DateStyle), which would stop the
-- planner from inlining this function, and a call that is not inlined costs ten times more.
CREATE OR REPLACE FUNCTION chtsync_try_date_v1(value text) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN value ~ '^\s*[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])\s*$' THEN
        CASE WHEN substr(btrim(value), 1, 4)::int >= 1
              AND substr(btrim(value), 9, 2)::int
                  <= chtsync_days_in_month_v1(substr(btrim(value), 1, 4)::int, substr(btrim(value), 6, 2)::int)
        THEN make_date(substr(btrim(value), 1, 4)::int, substr(btrim(value), 6, 2)::int,
                       substr(btrim(value), 9, 2)::int) END
    END
$$;

-- ISO 8601 date and time ('2024-05-17T08:30:00.123Z', '2024-05-17 08:30+03:00'); without an
-- offset it is UTC, so the result never depends on the session's time zone. A number is
-- milliseconds since the epoch (seconds below 1e11), as chtsync_epoch_v1. PL/pgSQL, no exception
-- block: the shape is checked by one match without captures (those are slow in Postgres), the
-- date by chtsync_try_date_v1, and what passes cannot fail the cast (year-first ISO input reads
-- the same under every DateStyle, and the offset, or UTC, is explicit).
CREATE OR REPLACE FUNCTION chtsync_try_timestamp_v1(value text) RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE STRICT
AS $$
DECLARE
    v text := btrim(value);
BEGIN
    IF v !~ ('^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?'
             '(Z|[+-]([01][0-9]|2[0-3])(:?[0-5][0-9])?)?$') THEN
        RETURN chtsync_epoch_v1(value);  -- a number, else NULL
    END IF;
    IF chtsync_try_date_v1(substr(v, 1, 10)) IS NULL THEN
        RETURN NULL;
    END IF;
    IF right(v, 1) = 'Z' OR substr(v, 17) ~ '[+-]' THEN
        RETURN v::timestamptz;
    END IF;
    RETURN v::timestamp AT TIME ZONE 'UTC';
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
