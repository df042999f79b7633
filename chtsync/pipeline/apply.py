"""plan / apply: bring the schema's objects in line with models.yaml, in one transaction.

Only objects recorded in chtsync_models are ever dropped or replaced; an existing object of a
model's name that chtsync did not create is a conflict, replaced only with adopt=True. Views
that other people built on a replaced object are saved and recreated in the same transaction.
"""

from __future__ import annotations

import contextlib
import graphlib
import logging
import re
import time
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from chtsync import db
from chtsync.config import Config
from chtsync.errors import ModelBuildError, PlanConflict
from chtsync.pipeline import graph, indexes
from chtsync.pipeline.graph import Model, Pipeline
from chtsync.pipeline.kinds import STRATEGIES, of
from chtsync.pipeline.refresh import Built, _build, analyze
from chtsync.pipeline.session import autocommit, first_line, q, value

log = logging.getLogger("chtsync.pipeline")

RELKIND = {name: s.relkind for name, s in STRATEGIES.items()}  # what each kind's object is
DROP = {"v": "VIEW", "m": "MATERIALIZED VIEW", "r": "TABLE", "p": "TABLE", "f": "FOREIGN TABLE"}


@dataclass(frozen=True)
class Step:
    name: str
    action: str  # create | replace | drop | unchanged
    kind: str
    reason: str = ""
    drops: bool = False  # an existing object is dropped (replace, or drop of chtsync's own)


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # existing objects chtsync did not create

    def count(self, action: str) -> int:
        return sum(1 for s in self.steps if s.action == action)

    @property
    def changed(self) -> bool:
        return any(s.action != "unchanged" for s in self.steps)

    def summary(self) -> str:
        return ", ".join(f"{self.count(a)} to {a}" if a != "unchanged" else f"{self.count(a)} unchanged"
                         for a in ("create", "replace", "drop", "unchanged"))


@dataclass(frozen=True)
class _Recorded:
    kind: str
    hash: str


def _compute(conn: psycopg.Connection, pipeline: Pipeline) -> Plan:
    recorded = {r[0]: (r[1], r[2]) for r in conn.execute(q("recorded_models"))}
    actual: dict[str, str] = dict(conn.execute(q("schema_relations")).fetchall())
    return compute_plan(pipeline, recorded, actual)


def compute_plan(pipeline: Pipeline, recorded_models: dict[str, tuple[str, str]], actual: dict[str, str]) -> Plan:
    """The plan from what chtsync_models records (name -> (kind, hash)) and the relations in the
    schema (name -> relkind). Pure: reads nothing."""
    recorded = {name: _Recorded(kind, h) for name, (kind, h) in recorded_models.items()}
    plan = Plan()
    steps: dict[str, Step] = {}
    for m in pipeline.models.values():
        rec, rel = recorded.get(m.name), actual.get(m.name)
        if rel is not None and (rec is None or rel != RELKIND[rec.kind]):
            plan.conflicts.append(m.name)
            steps[m.name] = Step(m.name, "replace", m.kind,
                                 f"existing {DROP[rel].lower()} not created by chtsync", drops=True)
        elif rec is None:
            steps[m.name] = Step(m.name, "create", m.kind, "new")
        elif rel is None:
            steps[m.name] = Step(m.name, "create", m.kind, "recorded but missing from the database")
        elif rec.kind != m.kind:
            steps[m.name] = Step(m.name, "replace", m.kind, f"kind {rec.kind} -> {m.kind}", drops=True)
        elif rec.hash != m.hash:
            upstream = [d for d in m.deps if steps[d].action != "unchanged"]
            reason = f"upstream {', '.join(upstream)} changed" if upstream else "definition changed"
            steps[m.name] = Step(m.name, "replace", m.kind, reason, drops=True)
        else:
            # Same definition, but rebuilt anyway if something it reads is being (re)created.
            upstream = [d for d in m.deps if steps[d].action != "unchanged"]
            steps[m.name] = (Step(m.name, "replace", m.kind, f"upstream {', '.join(upstream)} rebuilt", True)
                             if upstream else Step(m.name, "unchanged", m.kind))
    plan.steps = list(steps.values())
    for name, rec in sorted(recorded.items()):
        if name in pipeline.models:
            continue
        rel = actual.get(name)
        if rel is None:
            plan.steps.append(Step(name, "drop", rec.kind, "removed from models; already gone"))
        elif rel != RELKIND[rec.kind]:
            plan.steps.append(Step(name, "drop", rec.kind, "removed from models; the object there now"
                                   " is not chtsync's, only the record is dropped"))
        else:
            plan.steps.append(Step(name, "drop", rec.kind, "removed from models", drops=True))
    return plan


def plan(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline | None = None) -> Plan:
    """What apply would do, changing nothing."""
    pipeline = pipeline or graph.load(cfg)
    with autocommit(conn), conn.transaction():
        return _compute(conn, pipeline)


@dataclass
class _SavedView:
    schema: str
    name: str
    relkind: str
    definition: str
    indexes: list[str]
    grants: list[dict]

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


def _dependents(conn: psycopg.Connection, targets: set[str]) -> tuple[list[str], list[_SavedView]]:
    """The targets in a safe drop order (views first), and the views other people built on them,
    saved in the order they must be recreated."""
    rows = conn.execute(q("dependent_views"), (sorted(targets),)).fetchall()
    drop_graph: dict[str, set[str]] = {t: set() for t in targets}
    foreign: dict[int, tuple[str, str, str]] = {}
    create_graph: dict[int, set[int]] = {}
    for view_oid, nsp, relname, relkind, view_here, used_oid, used_name, used_here in rows:
        if view_here and relname in targets:
            if used_here and used_name in targets:
                drop_graph[used_name].add(relname)  # the view goes first
            continue
        foreign[view_oid] = (nsp, relname, relkind)
        create_graph.setdefault(view_oid, set()).add(used_oid)
    saved = []
    for oid in graphlib.TopologicalSorter(create_graph).static_order():
        if oid not in foreign:
            continue  # a relation the views read, not one of them
        nsp, relname, relkind = foreign[oid]
        definition, indexes, grants = conn.execute(q("view_definition"), {"oid": oid}).fetchone()
        saved.append(_SavedView(nsp, relname, relkind, definition.strip().rstrip(";"), indexes, grants))
    return list(graphlib.TopologicalSorter(drop_graph).static_order()), saved


PRIVILEGE = re.compile(r"^[A-Z ]+$")


def _restore(conn: psycopg.Connection, view: _SavedView) -> None:
    kind = sql.SQL("MATERIALIZED VIEW" if view.relkind == "m" else "VIEW")
    conn.execute(q("create_object", kind=kind, relation=view.ident, body=sql.SQL(view.definition), suffix=sql.SQL("")))
    for statement in view.indexes:
        conn.execute(sql.SQL(statement))  # pg_get_indexdef: a complete, qualified CREATE INDEX
    grant(conn, view.ident, view.grants)


def grant(conn: psycopg.Connection, relation: sql.Identifier, grants: list[dict]) -> None:
    """Grant again what aclexplode listed on an object being replaced (view_definition)."""
    for g in grants:
        if not PRIVILEGE.match(g["privilege"]):
            raise ValueError(f"unexpected privilege {g['privilege']!r}")
        conn.execute(q(
            "grant_privilege", privilege=sql.SQL(g["privilege"]), relation=relation,
            grantee=sql.SQL("PUBLIC") if g["grantee"] is None else sql.Identifier(g["grantee"]),
            grant_option=sql.SQL(" WITH GRANT OPTION" if g["grantable"] else "")))


# VOLATILE built-ins that only produce a value; any other VOLATILE function may write.
HARMLESS_VOLATILE = ("random", "random_normal", "clock_timestamp", "timeofday", "gen_random_uuid",
                     "txid_current", "pg_current_xact_id")


def check_read_only(conn: psycopg.Connection, model: Model) -> None:
    """Refuse a model whose query calls a function that may write (graph.py refused the
    statements and clauses that write): even a model cannot change what it reads."""
    conn.execute(q("model_check_view", body=sql.SQL(model.sql)))
    found = [row[0] for row in conn.execute(q("model_check_functions"), (list(HARMLESS_VOLATILE),))]
    conn.execute(q("model_check_drop"))
    if found:
        raise ModelBuildError(
            f"model '{model.name}': calls {', '.join(found)}, which may write (VOLATILE): a model only"
            " reads; call a STABLE or IMMUTABLE function instead")


def shadow_name(model: str) -> str:
    """The table a rebuild fills beside the model before swapping them (pipeline/shadow.py)."""
    return f"{model[:47]}__chtsync_new"


def create_model(conn: psycopg.Connection, model: Model, empty: bool = False,
                 relation: str | None = None) -> int | None:
    """Create the model's object and indexes (as `relation`: a rebuild's shadow); return its row
    count (None for a view). With empty=True an incremental model is created without rows, for
    the refresh to build it in batches (refresh._build)."""
    check_read_only(conn, model)
    relation = relation or model.name
    name, strategy = sql.Identifier(relation), of(model.kind)
    cur = conn.execute(q("create_object", kind=sql.SQL(strategy.ddl), relation=name,
                         body=sql.SQL(model.sql), suffix=sql.SQL(strategy.create_suffix(empty))))
    rows = cur.rowcount if strategy.has_rows else None
    indexes.create(conn, model, relation)
    return rows


def _conflict_error(plan: Plan) -> PlanConflict:
    return PlanConflict(
        "models apply: these objects exist but were not created by chtsync, so they are left"
        f" alone: {', '.join(plan.conflicts)}. Rename the models, drop the objects, or run"
        " `chtsync models apply --adopt` to replace them (in one transaction)"
    )


def apply(cfg: Config, conn: psycopg.Connection, adopt: bool = False,
          pipeline: Pipeline | None = None) -> Plan:
    """Create, replace and drop models so the schema matches models.yaml, all in one transaction
    under the pipeline lock (a changed incremental model is built beside the old one before it,
    see _prebuild); return the plan carried out. Unchanged models are not touched."""
    pipeline = pipeline or graph.load(cfg)
    key = (db.LOCK_CLASS, db.lock_key(cfg, "pipeline"))
    with autocommit(conn):
        conn.execute(q("pipeline_lock"), key)
        try:
            prebuilt = _prebuild(cfg, conn, pipeline, adopt)
            plan = _apply(cfg, conn, pipeline, adopt, prebuilt)
        finally:
            with contextlib.suppress(psycopg.OperationalError):  # a lost session has lost the lock
                conn.execute(q("pipeline_unlock"), key)
    # Built in one statement each: give the planner their statistics before the first refresh
    # (incremental models are created empty, and analyzed once the refresh has built them).
    with autocommit(conn):
        for step in plan.steps:
            built_here = step.action == "replace" or (step.action == "create" and not of(step.kind).by_document)
            if built_here and of(step.kind).has_rows:
                analyze(conn, step.name)
    for step in plan.steps:
        if step.action != "unchanged":
            log.info("model %s name=%s kind=%s reason=%s", step.action, step.name, step.kind, step.reason)
    return plan


def _prebuild(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline, adopt: bool) -> dict[str, Built]:
    """Build the new version of each replaced incremental model that reads no other replaced
    model into its shadow table, in batches, before the apply transaction (readers keep the old
    object meanwhile; a stopped apply resumes it). Models downstream of a replaced one read its
    new version, which exists only inside that transaction: they are built there."""
    plan = _compute(conn, pipeline)
    if plan.conflicts and not adopt:
        raise _conflict_error(plan)
    steps = {s.name: s for s in plan.steps}
    out: dict[str, Built] = {}
    for step in plan.steps:
        model = pipeline.models.get(step.name)
        if (step.action != "replace" or model is None or not of(model.kind).by_document
                or any(steps[d].action != "unchanged" for d in model.deps)):
            continue
        shadow = shadow_name(model.name)
        started = conn.execute(q("build_state"), (model.name,)).fetchone()
        if started is None:  # not chtsync's yet (--adopt): no record to keep the progress in
            continue
        if not (started[4] == shadow and started[8] == model.hash and value(conn, "relation_exists", (shadow,))):
            with conn.transaction():
                conn.execute(q("drop_if_exists", kind=sql.SQL("TABLE"), relation=sql.Identifier(shadow)))
                try:
                    create_model(conn, model, empty=True, relation=shadow)
                except psycopg.Error as exc:
                    raise ModelBuildError(f"model '{model.name}': {first_line(exc)}") from None
        built = _build(conn, cfg, model, shadow, value(conn, "current_snapshot"), [], lambda: False)
        assert built is not None  # never asked to stop
        out[model.name] = built
    return out


def rename_shadow(conn: psycopg.Connection, model: Model) -> None:
    """Give the shadow table and its indexes the model's names (the old object is gone)."""
    shadow, name = shadow_name(model.name), sql.Identifier(model.name)
    conn.execute(q("rename_relation", kind=sql.SQL(DROP[of(model.kind).relkind]),
                   relation=sql.Identifier(shadow), new=name))
    for ix in indexes.model_indexes(model):
        conn.execute(q("rename_index", index=sql.Identifier(indexes.index_name(shadow, ix.suffix)),
                       new=sql.Identifier(indexes.index_name(model.name, ix.suffix))))


def _apply(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline, adopt: bool,
           prebuilt: dict[str, Built]) -> Plan:
    with conn.transaction():
        conn.execute(q("pipeline_xact_lock"), (db.LOCK_CLASS, db.lock_key(cfg, "pipeline")))
        plan = _compute(conn, pipeline)
        if plan.conflicts and not adopt:
            raise _conflict_error(plan)
        if not plan.changed:
            return plan
        snapshot = value(conn, "current_snapshot")
        existing = dict(conn.execute(q("schema_relations")).fetchall())
        targets = {s.name for s in plan.steps if s.drops}
        drop_order, saved = _dependents(conn, targets) if targets else ([], [])
        for view in reversed(saved):
            conn.execute(q("drop_object", kind=sql.SQL(DROP[view.relkind]), relation=view.ident))
        for name in drop_order:
            _run(conn, name, q("drop_object", kind=sql.SQL(DROP[existing[name]]), relation=sql.Identifier(name)))
        for step in plan.steps:  # a rebuild left unfinished belongs to the old definition
            shadow = shadow_name(step.name)
            if step.action != "unchanged" and shadow in existing and step.name not in prebuilt:
                conn.execute(q("drop_object", kind=sql.SQL(DROP[existing[shadow]]), relation=sql.Identifier(shadow)))
        for step in plan.steps:
            if step.action in ("drop", "create", "replace"):
                conn.execute(q("pending_clear"), {"model": step.name})  # groups an aggregate had waiting
            if step.action == "drop":
                conn.execute(q("record_dropped"), (step.name,))
            elif step.action in ("create", "replace"):
                model = pipeline.models[step.name]
                started = time.monotonic()
                # A new incremental model is built by the refresh, in batches. One that replaces an
                # existing object is built here, so readers keep the old one until this commits.
                empty = step.action == "create" and of(model.kind).by_document
                try:
                    if model.name in prebuilt:  # catch up with the writes since its build began
                        built = prebuilt[model.name]
                        rows = of(model.kind).rederive(conn, cfg, model, built.snapshot, built.rows, [],
                                                          shadow_name(model.name)).rows
                        rename_shadow(conn, model)
                        conn.execute(q("build_done"), (model.name,))
                    else:
                        rows = create_model(conn, model, empty)
                except psycopg.Error as exc:
                    raise ModelBuildError(f"model '{model.name}': {first_line(exc)}") from None
                conn.execute(q("record_created"), {
                    "name": model.name, "kind": model.kind, "hash": model.hash, "rows": rows,
                    "ms": (time.monotonic() - started) * 1000,
                    "snapshot": snapshot if of(model.kind).has_rows and not empty else None})
        for view in saved:
            try:
                _restore(conn, view)
            except psycopg.Error as exc:
                raise ModelBuildError(
                    f"models apply: cannot recreate {view.schema}.{view.name}, a view built on a model"
                    f" being replaced or dropped: {first_line(exc)}. Change or drop that view first"
                ) from None
    return plan


def _run(conn: psycopg.Connection, name: str, statement: sql.Composable) -> None:
    try:
        conn.execute(statement)
    except psycopg.errors.DependentObjectsStillExist as exc:
        detail = exc.diag.message_detail or ""
        raise PlanConflict(f"models apply: cannot drop '{name}': other objects depend on it: "
                          f"{' '.join(detail.split())}") from None
