-- Named queries that check a model is read-only before it is built (chtsync/pipeline/apply.py).

-- name: model_check_view
-- Postgres resolves the model's functions and operators without running the query.
CREATE TEMP VIEW chtsync_model_check AS {body}

-- name: model_check_functions
-- Functions the query calls (directly or through an operator) that may write: VOLATILE ones,
-- except the built-ins given, which only produce values. STABLE and IMMUTABLE functions cannot
-- write (Postgres refuses a write inside them).
SELECT DISTINCT p.oid::regprocedure::text
FROM pg_depend AS d
JOIN pg_rewrite AS r ON r.oid = d.objid
LEFT JOIN pg_operator AS o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
JOIN pg_proc AS p ON p.oid = CASE WHEN d.refclassid = 'pg_proc'::regclass THEN d.refobjid ELSE o.oprcode END
WHERE d.classid = 'pg_rewrite'::regclass
  AND d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass)
  AND r.ev_class = 'pg_temp.chtsync_model_check'::regclass
  AND p.provolatile = 'v'
  AND NOT (p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY (%s::text[]))
ORDER BY 1

-- name: model_check_drop
DROP VIEW pg_temp.chtsync_model_check
