-- chtsync 0007: the one definition of the credential fields of CouchDB user documents, and a
-- tolerant reader for counts CouchDB sends (`pending`). Helpers only: the ingest function and
-- the error rows call them (see docs/design.md, "Hostile pages").
-- depends: 0006.model-helpers

-- Fields of `org.couchdb.user:*` documents that never reach Postgres (CouchDB's own list of
-- password fields, both the pbkdf2 and the legacy password_sha schemes).
CREATE OR REPLACE FUNCTION chtsync_credential_fields_v1() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY['password', 'password_scheme', 'derived_key', 'salt', 'iterations',
                 'pbkdf2_prf', 'password_sha']
$$;

-- A document as it may be stored: a user document without its credential fields.
CREATE OR REPLACE FUNCTION chtsync_strip_credentials_v1(id text, doc jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN id LIKE 'org.couchdb.user:%' THEN doc - chtsync_credential_fields_v1()
                ELSE doc END
$$;

-- Raw text kept in chtsync_errors (a refused document, a page cut short): it cannot be parsed,
-- so the value of every credential field is replaced wherever it appears, also a value cut off
-- at the end of the text. Keys written with JSON escapes are not recognised; CouchDB never
-- writes them that way.
CREATE OR REPLACE FUNCTION chtsync_redact_credentials_v1(raw text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT regexp_replace(raw,
        '("(' || array_to_string(chtsync_credential_fields_v1(), '|') || ')"\s*:\s*)'
            || '("(\\.|[^"\\])*("|$)|[^,}\]]*)',
        '\1"(removed)"', 'g')
$$;

-- A count from CouchDB (`pending`): NULL, meaning unknown, unless it is a plain non-negative
-- integer within bigint. `1e30`, `-1`, `1.5` or `"abc"` must not stall or spin a feed.
CREATE OR REPLACE FUNCTION chtsync_json_bigint_v1(v jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'number' AND v::text ~ '^[0-9]{1,19}$'
                     AND v::text::numeric <= 9223372036854775807
                THEN v::text::bigint END
$$;

-- Every row that enters chtsync_errors, whoever writes it (the follower, verify, the ingest
-- function's own "change without a document" rows), is redacted on the way in.
CREATE OR REPLACE FUNCTION chtsync_errors_redact_v1() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
BEGIN
    NEW.raw := chtsync_redact_credentials_v1(NEW.raw);
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS chtsync_errors_redact ON chtsync_errors;
CREATE TRIGGER chtsync_errors_redact BEFORE INSERT OR UPDATE OF raw ON chtsync_errors
FOR EACH ROW EXECUTE FUNCTION chtsync_errors_redact_v1();
