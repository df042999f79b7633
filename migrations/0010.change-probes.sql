-- chtsync 0010: the pipeline's change probes, independent of the raw table's statistics.
-- Without statistics (a bulk load, autovacuum off or late) the planner guesses that a third of
-- the table matches `_xid >= x` and scans it all; with sequential scans off inside these
-- functions every plan goes through the _xid index, whatever the statistics say (and JIT, which
-- the disabled scan's cost would trigger, is off). The queries run through EXECUTE, so each call
-- is planned with the snapshot's actual values.
-- depends: 0006.model-helpers

-- Has a transaction the snapshot did not see written a row? (xid >= its xmax, or in its xip list)
CREATE OR REPLACE FUNCTION chtsync_raw_changed_v1(p_table regclass, p_since pg_snapshot)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET jit = off
AS $fn$
DECLARE
    found boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE _xid >= $1)'
                   ' OR EXISTS (SELECT 1 FROM %s WHERE _xid = ANY ($2))', p_table, p_table)
        INTO found
        USING pg_snapshot_xmax(p_since), ARRAY(SELECT pg_snapshot_xip(p_since));
    RETURN found;
END
$fn$;

-- The ids of the documents those transactions wrote (each once).
CREATE OR REPLACE FUNCTION chtsync_changed_ids_v1(p_table regclass, p_since pg_snapshot)
RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET jit = off
AS $fn$
BEGIN
    RETURN QUERY EXECUTE format('SELECT _id::text FROM %s WHERE _xid >= $1'
                                ' UNION SELECT _id::text FROM %s WHERE _xid = ANY ($2)', p_table, p_table)
        USING pg_snapshot_xmax(p_since), ARRAY(SELECT pg_snapshot_xip(p_since));
END
$fn$;
