"""Refreshing models: in dependency order, only those whose inputs changed, one transaction each.

The watermark is the snapshot taken at the start of a model's last refresh: raw rows written
by transactions it did not see are new. Change detection costs two index probes on the raw
table's _xid per distinct watermark, so an idle system does no work and writes nothing.
Incremental tables re-derive only the rows of those documents (docs/pipeline.md: why exact).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg
from psycopg import sql

from chtsync import db
from chtsync.config import Config
from chtsync.errors import ModelsFileError, PostgresUnavailable
from chtsync.pipeline import datatests, graph, indexes
from chtsync.pipeline.graph import Model, Pipeline
from chtsync.pipeline.kinds import aggregates_by_upstream, of, since
from chtsync.pipeline.session import autocommit, first_line, q, value

log = logging.getLogger("chtsync.pipeline")

# Seconds between the starts of two rounds while writes keep arriving: writes arriving together
# trigger one refresh. A wake later than this after the last start refreshes at once.
DEBOUNCE = 0.2
# While a source catches up with more than cfg.hold_pending changes to read, the models wait, at
# most this many seconds between rounds: re-deriving ever more documents round after round would
# take the cores from the sync, and a first build once caught up reads every document once.
HOLD_SECONDS = 300.0
HOLD_POLL = 0.5  # seconds between looks at the sources while the models wait
STOP_GRACE = 3.0  # seconds a running refresh may take to finish once stop is set


@dataclass(frozen=True)
class RefreshResult:
    name: str
    kind: str
    status: str  # ok | skipped (inputs unchanged) | waiting (interval) | error | blocked | unapplied
    rows: int | None = None
    changed: int | None = None  # incremental: documents re-derived
    duration_ms: float = 0.0
    error: str | None = None


def _xip(snapshot: str) -> list[str]:
    """The transactions in progress when the snapshot ('xmin:xmax:xip,...') was taken."""
    return [x for x in snapshot.split(":")[2].split(",") if x]


def _age(snapshot: str) -> tuple[int, int]:
    """Orders snapshots by when they were taken: a later one has a higher xmax or, with the
    same xmax (no xid assigned in between), fewer transactions still in progress."""
    return int(snapshot.split(":")[1]), -len(_xip(snapshot))


@dataclass
class _State:
    hash: str
    snapshot: str | None
    seq: int | None
    rows: int | None
    age: float | None  # seconds since the last attempt


def _states(conn: psycopg.Connection) -> dict[str, _State]:
    return {
        name: _State(h, snap, seq, rows, age)
        for name, h, snap, seq, rows, age in conn.execute(q("model_states"))
    }


@dataclass(frozen=True)
class _Inputs:
    raw: bool
    external: bool
    models: frozenset[str]  # refreshed models read directly or through views


def _inputs(pipeline: Pipeline) -> dict[str, _Inputs]:
    out: dict[str, _Inputs] = {}
    for m in pipeline.models.values():  # upstream first
        raw, external, models = m.raw, m.external, set()
        for dep in m.deps:
            up = pipeline.models[dep]
            if not of(up.kind).has_rows:  # a view reads live data: look through it
                raw, external = raw or out[dep].raw, external or out[dep].external
                models |= out[dep].models
            else:
                models.add(dep)
        out[m.name] = _Inputs(raw, external, frozenset(models))
    return out


# Raw rows per transaction of a build by block ranges (~ this many, from the table's rows per
# block): bounded transactions (and WAL between checkpoints), progress that survives a restart,
# readers and ingest never wait for it.
BUILD_ROWS = 50_000
# Up to this many raw documents a build is one statement (a sequential scan, seconds even at
# this size); above it, batches of block ranges keep each transaction bounded.
ONE_STATEMENT_BUILD = 1_000_000
# First builds of models that read only the raw table run side by side, each on its own
# connection (a Postgres backend, a core): nothing else works while they run, and one INSERT ...
# SELECT uses one core. Two: these machines have two cores, and more would only share them.
BUILD_WORKERS = 2
# Documents per transaction of a shared build (_build_shared): the range's decompressed
# documents are held in memory for every model to read (local_shared_work_mem). Measured at 1M
# documents: about 2,000 per range reads fastest, half the time of one read per model.
SHARED_BUILD_ROWS = 2_000
# Block ranges timed per model to share the builds out evenly (_groups), spread over the table.
SAMPLE_RANGES = 8
PROGRESS_LOG_SECONDS = 10.0  # a shared build logs its progress at most this often


# Past the last block a table can have: the range a one-statement build reads (its snapshot
# may see blocks added after the table's size was read).
WHOLE_TABLE_END = "(4294967295,0)"


def _blocks_for(rows: int, blocks: int, total: int) -> int:
    """Blocks holding about `rows` of a relation of `total` rows in `blocks` blocks (at least one)."""
    return max(1, int(rows * blocks / max(total, 1)))


def _calls_aggregate(conn: psycopg.Connection, model: Model) -> bool:
    """An aggregate without GROUP BY in a model built by block ranges: each range would give a
    partial row (only Postgres knows which functions are aggregates)."""
    return bool(model.block_calls) and bool(value(conn, "aggregate_functions", (list(model.block_calls),)))


@dataclass
class Built:
    rows: int
    snapshot: str  # the build read everything this snapshot saw (and maybe more)
    batched: bool  # False: one statement, exact as of its own snapshot (no catch-up needed)
    seconds: float = 0.0  # the build's own time (it may have run beside others)


def _build_side_by_side(cfg: Config, models: list[Model], snapshot: str, aggregates: dict[str, list[Model]],
                        should_stop: Callable[[], bool], upstream: dict[str, str]) -> dict[str, Built]:
    """The first builds of `models`, BUILD_WORKERS at a time on connections of their own; what
    each built, by name. Those reading the raw table by block ranges with no build of theirs
    under way share its reads: split into BUILD_WORKERS groups of about equal cost, each group
    reads each range once for all its models. A model reading other models (each among
    `models`, or built before: its snapshot in `upstream`) starts on the first free connection
    once they are built and analyzed, from the oldest of their snapshots, as the round would
    build it. A build that failed or was stopped is left out, and so are its dependants: the
    round builds them again (resuming) in their turn, and records the failure."""
    names = {m.name for m in models}
    waiting = [m for m in models if m.deps]
    # upstream model -> how many of `models` read it by its blocks (a build after its own)
    readers = {d: sum(w.block_from == d for w in waiting) for d in {d for m in waiting for d in m.deps}}
    with db.connect(cfg, autocommit=True) as conn:
        shareable = [m for m in models if not m.deps and m.shared_sql
                     and value(conn, "build_state", (m.name,)) is None and not _calls_aggregate(conn, m)]
        groups = _groups(conn, cfg, shareable, readers) if len(shareable) > 1 else []
    groups = [g for g in groups if g]
    grouped = {m.name for g in groups for m in g}
    tasks = groups + [[m] for m in models if not m.deps and m.name not in grouped]

    def build(group: list[Model], snap: str) -> dict[str, Built]:
        started = time.monotonic()
        try:
            with db.connect(cfg, autocommit=True) as conn:
                if len(group) > 1:
                    built = _build_shared(conn, cfg, group, snap, aggregates, should_stop)
                else:
                    one = _build(conn, cfg, group[0], group[0].name, snap, aggregates.get(group[0].name, []),
                                 should_stop)
                    if one is not None and group[0].deps:
                        # read its upstreams before the round caught them up: even a build in
                        # one statement must derive the documents written since `snap` again
                        one.batched = True
                    built = {} if one is None else {group[0].name: one}
                for name in built.keys() & readers.keys():  # its dependants are planned with them
                    analyze(conn, name)
        except (psycopg.Error, PostgresUnavailable) as exc:
            log.warning("model build side by side failed names=%s error=%s (built again in its turn)",
                        ",".join(m.name for m in group), first_line(exc))
            return {}
        for one in built.values():
            one.seconds = time.monotonic() - started
        return built

    out: dict[str, Built] = {}
    finished: set[str] = set()
    with ThreadPoolExecutor(BUILD_WORKERS, thread_name_prefix="chtsync-build") as pool:
        running = {pool.submit(build, task, snapshot): task for task in tasks}

        def start_ready() -> None:
            for m in list(waiting):
                ours = [d for d in m.deps if d in names]
                if should_stop() or any(d in finished and d not in out for d in ours):
                    waiting.remove(m)  # stopped, or an upstream failed: the round deals with it
                elif all(d in out for d in ours):
                    waiting.remove(m)
                    snap = min([snapshot] + [out[d].snapshot for d in ours]
                               + [upstream[d] for d in m.deps if d in upstream], key=_age)
                    running[pool.submit(build, [m], snap)] = [m]

        start_ready()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                out.update(future.result())
                finished.update(m.name for m in running.pop(future))
            start_ready()
    return out


def _groups(conn: psycopg.Connection, cfg: Config, models: list[Model],
            readers: dict[str, int]) -> list[list[Model]]:
    """`models` in BUILD_WORKERS groups of about equal cost, each to be built by one shared read,
    fewer when there are fewer models. A model's cost is the time it takes to derive and insert
    (rolled back, its indexes dropped as the build drops them) its rows of SAMPLE_RANGES ranges
    spread over the raw table, less the cheapest model's (what the read itself costs every one),
    as much again for each model to be built by its blocks after it (`readers`; its connection
    builds that one: at 10M, contact_hierarchy took 44 s after contact's own 32 s); the costliest
    first, each to the group with the least so far. A model failing there is left out: built
    alone, its error is recorded in its turn, and it stops no other build."""
    blocks, _ = conn.execute(q("raw_blocks"), (cfg.schema, cfg.table)).fetchone()
    total = value(conn, "raw_documents", (cfg.schema, cfg.table), table=db.table_ident(cfg))
    step = _blocks_for(SHARED_BUILD_ROWS, blocks, total)
    starts = sorted({blocks * i // SAMPLE_RANGES for i in range(SAMPLE_RANGES)})

    def sample(m: Model) -> float | None:
        started = time.monotonic()
        try:
            with conn.transaction(force_rollback=True):
                conn.execute(q("local_jit_off"))
                indexes.defer(conn, m, m.name, keep_key=False)  # as in the build (rolled back too)
                for start in starts:
                    conn.execute(q("build_range"), (f"({start},0)", f"({start + step},0)"))
                    conn.execute(q("build_sample", model=sql.Identifier(m.name), body=sql.SQL(m.block_sql)),
                                 prepare=False)
        except psycopg.Error as exc:
            if conn.broken:
                raise
            log.info("model build not shared name=%s error=%s", m.name, first_line(exc))
            return None
        return time.monotonic() - started

    # Untimed first: the first read of fresh rows (into memory, hint bits set) would be counted
    # against whichever model came first (measured: 3x its cost right after an initial sync).
    sample(models[0])
    cost = {m.name: t for m in models if (t := sample(m)) is not None}
    models = [m for m in models if m.name in cost]
    if len(models) < 2 or BUILD_WORKERS < 2:
        return [models] if len(models) > 1 else []
    floor = min(cost.values())
    weight = {m.name: (cost[m.name] - floor) * (1 + readers.get(m.name, 0)) for m in models}
    groups: list[list[Model]] = [[] for _ in range(min(BUILD_WORKERS, len(models)))]
    loads = [0.0] * len(groups)
    for m in sorted(models, key=lambda m: weight[m.name], reverse=True):
        i = loads.index(min(loads))
        groups[i].append(m)
        loads[i] += weight[m.name]
    log.info("model builds shared groups=%s sampled_ms=%s", " ".join(",".join(m.name for m in g) for g in groups),
             ",".join(f"{m.name}:{cost[m.name] * 1000:.0f}" for m in models))
    return [sorted(g, key=models.index) for g in groups]


def _reset(conn: psycopg.Connection, model: Model, into: str, aggregates: list[Model], by_ids: bool) -> None:
    """Empty `into` for a build from scratch: its indexes wait for the rows (but for those on the
    key when it is built by ids: each batch deletes by it), and the aggregates over the model
    count everything again."""
    conn.execute(q("truncate", model=sql.Identifier(into)))
    indexes.defer(conn, model, into, keep_key=by_ids)
    for agg in aggregates:
        conn.execute(q("pending_all"), (agg.name,))


def _build_shared(conn: psycopg.Connection, cfg: Config, models: list[Model], snapshot: str,
                  aggregates: dict[str, list[Model]], should_stop: Callable[[], bool]) -> dict[str, Built]:
    """First builds of `models` (each with shared_sql) reading each block range of the raw table
    once for all of them (query build_shared), one transaction per range of about
    SHARED_BUILD_ROWS documents; what each built, by name, or {} when stopped or when the table
    was rewritten. Each model's progress is recorded as _build records it, so a model the round
    finds unbuilt resumes alone where this left it."""
    table = db.table_ident(cfg)
    blocks, filenode = conn.execute(q("raw_blocks"), (cfg.schema, cfg.table)).fetchone()
    names = [m.name for m in models]
    with conn.transaction():
        total = value(conn, "raw_documents", (cfg.schema, cfg.table), table=table)
        for m in models:
            _reset(conn, m, m.name, aggregates.get(m.name, []), by_ids=False)
            conn.execute(q("build_start"), {"name": m.name, "snapshot": snapshot, "blocks": blocks,
                                            "filenode": filenode, "into": m.name, "hash": m.hash, "total": total})
    ctes = [sql.Identifier(f"chtsync_insert_{i}") for i in range(len(models))]
    statement = q(
        "build_shared", source=sql.Identifier(graph.SHARED_SOURCE), table=table,
        inserts=sql.SQL(", ").join(q("build_shared_insert", cte=cte, model=sql.Identifier(m.name),
                                     body=sql.SQL(m.shared_sql)) for cte, m in zip(ctes, models, strict=True)),
        counts=sql.SQL(", ").join(q("build_shared_count", cte=cte) for cte in ctes))
    step = _blocks_for(SHARED_BUILD_ROWS, blocks, total)
    rows, block, docs = [0] * len(models), 0, 0
    started = logged = time.monotonic()
    log.info("model build shared started names=%s docs=%d", ",".join(names), total)
    while block < blocks:
        if should_stop():
            return {}
        end = min(block + step, blocks)
        with conn.transaction():
            if conn.execute(q("raw_blocks"), (cfg.schema, cfg.table)).fetchone()[1] != filenode:
                log.info("model build shared stopped names=%s (the raw table was rewritten: each starts"
                         " over alone)", ",".join(names))
                return {}
            conn.execute(q("local_jit_off"))
            conn.execute(q("local_shared_work_mem"))
            conn.execute(q("build_range"), (f"({block},0)", f"({end},0)"))
            # the same text every range (the range is in settings): prepared, planned once
            rows = [r + n for r, n in zip(rows, conn.execute(statement, prepare=True).fetchone(), strict=True)]
            block, docs = end, min(total, round(total * end / blocks))
            conn.execute(q("build_progress_shared"), {"block": block, "docs": docs, "names": names, "rows": rows})
        now = time.monotonic()
        if now - logged >= PROGRESS_LOG_SECONDS or block >= blocks:
            logged, rate = now, docs / max(now - started, 1e-3)
            log.info("model building names=%s docs=%d/%d rows=%s rate=%.0f docs/s eta=%.0f s", ",".join(names),
                     docs, total, ",".join(map(str, rows)), rate, max(total - docs, 0) / rate if rate else 0.0)
    for m in models:
        indexes.create(conn, m, m.name)  # each CREATE INDEX its own transaction: readers go on
    log.info("model build shared done names=%s rows=%s in %.1f s", ",".join(names), ",".join(map(str, rows)),
             time.monotonic() - started)
    return {m.name: Built(r, snapshot, batched=True) for m, r in zip(models, rows, strict=True)}


def _build(conn: psycopg.Connection, cfg: Config, model: Model, into: str, snapshot: str,
           aggregates: list[Model], should_stop: Callable[[], bool]) -> Built | None:
    """Fill `into` (an incremental model, or its shadow during a rebuild) from scratch, resuming
    a build of the same target an earlier run left unfinished; None when stopped first.

    Above ONE_STATEMENT_BUILD rows it walks the blocks of the relation it reads (the raw table,
    or the incremental model its block_sql reads by range) in ranges of about BUILD_ROWS rows,
    one transaction each (docs/pipeline.md, "First builds and rebuilds": why
    this is exact once the caller catches up from the returned snapshot)."""
    table, target = db.table_ident(cfg), sql.Identifier(into)
    key = sql.Identifier(model.spec.unique_key[0])
    conn.execute(q("changed_ids_table"))
    build_snapshot, block, blocks, filenode, build_into, docs, rows, total, build_hash = conn.execute(
        q("build_state"), (model.name,)).fetchone()
    by_range = bool(model.block_sql) and not _calls_aggregate(conn, model)
    # the relation whose blocks the ranges walk: the raw table, or the model's incremental upstream
    walked = model.block_from if by_range else cfg.table
    now_blocks, now_filenode = conn.execute(q("raw_blocks"), (cfg.schema, walked)).fetchone()
    if (build_snapshot is not None and build_into == into and build_hash == model.hash and block is not None
            and filenode == now_filenode):
        log.info("model build resumed name=%s into=%s docs=%d rows=%d", model.name, into, docs, rows)
    else:
        if build_snapshot is not None:
            log.info("model build started over name=%s into=%s (the table it walks was rewritten, or"
                     " another build was under way)", model.name, into)
        with conn.transaction():
            total = value(conn, "raw_documents", (cfg.schema, walked),
                          table=sql.Identifier(cfg.schema, walked))
            _reset(conn, model, into, aggregates, by_ids=total > ONE_STATEMENT_BUILD and not by_range)
            if total <= ONE_STATEMENT_BUILD:
                conn.execute(q("local_jit_off"))
                body = model.sql
                if model.block_sql:  # one range, the whole table: its rows decompressed once
                    conn.execute(q("build_range"), ("(0,0)", WHOLE_TABLE_END))
                    body = model.block_sql
                rows = conn.execute(q("full_insert", model=target, body=sql.SQL(body)), prepare=False).rowcount
                indexes.create(conn, model, into)
                log.info("model built name=%s into=%s docs=%d rows=%d (one statement)", model.name, into, total, rows)
                return Built(rows, snapshot, batched=False)
            block, blocks, docs, rows, build_snapshot = 0, now_blocks, 0, 0, snapshot
            conn.execute(q("build_start"), {"name": model.name, "snapshot": snapshot, "blocks": blocks,
                                            "filenode": now_filenode, "into": into, "hash": model.hash,
                                            "total": total})
    step = _blocks_for(BUILD_ROWS, blocks, total)
    started, block_before = time.monotonic(), block
    while block < blocks:
        if should_stop():
            return None
        end = min(block + step, blocks)
        with conn.transaction():
            if conn.execute(q("raw_blocks"), (cfg.schema, walked)).fetchone()[1] != now_filenode:
                break  # rewritten meanwhile: start over below
            conn.execute(q("local_jit_off"))
            conn.execute(q("build_range"), (f"({block},0)", f"({end},0)"))
            if by_range:  # the model reads the range alone: a TID range scan, no index probe
                rows += conn.execute(q("full_insert", model=target, body=sql.SQL(model.block_sql)),
                                     prepare=False).rowcount
            else:  # the documents of the range, derived again (a document may span ranges)
                conn.execute(q("build_block_ids", table=table), prepare=False)
                conn.execute(q("changed_ids_analyze"))
                rows -= conn.execute(q("incremental_delete", model=target, key=key), prepare=False).rowcount
                rows += conn.execute(q("incremental_insert", model=target, key=key, body=sql.SQL(model.sql)),
                                     prepare=False).rowcount
            block = end
            docs = min(total, round(total * block / blocks))
            conn.execute(q("build_progress"), {"name": model.name, "block": block, "docs": docs, "rows": rows})
        rate = (block - block_before) * total / blocks / max(time.monotonic() - started, 1e-3)
        eta = max(total - docs, 0) / rate if rate else 0.0
        log.info("model building name=%s into=%s docs=%d/%d rows=%d rate=%.0f docs/s eta=%.0f s",
                 model.name, into, docs, total, rows, rate, eta)
    else:
        started = time.monotonic()
        indexes.create(conn, model, into)  # each CREATE INDEX its own transaction: readers go on
        log.info("model indexes built name=%s into=%s rows=%d in %.1f s", model.name, into, rows,
                 time.monotonic() - started)
        return Built(rows, build_snapshot, batched=True)
    with conn.transaction():
        conn.execute(q("build_done"), (model.name,))
    return _build(conn, cfg, model, into, value(conn, "current_snapshot"), aggregates, should_stop)


def _record_failure(conn: psycopg.Connection, name: str, status: str, error: str, ms: float) -> None:
    with conn.transaction():
        conn.execute(q("record_refresh_failed"), {"name": name, "status": status, "error": error, "ms": ms})


def _run(cfg: Config, conn: psycopg.Connection, pipeline: Pipeline, force: bool,
         should_stop: Callable[[], bool], first_builds: bool = True) -> list[RefreshResult]:
    # Taken before anything is read: whatever is not visible now is re-read next run.
    snapshot = value(conn, "current_snapshot")
    states = _states(conn)
    inputs = _inputs(pipeline)
    raw_changed: dict[str, bool] = {}
    failed: dict[str, str] = {}  # model -> why its dependents are blocked
    unbuilt: set[str] = set()  # first builds left for after the initial sync (first_builds=False)
    # A data test of severity error that failed holds the model's dependants back until it
    # passes; a test never run yet runs at the end of this round.
    held, untested = datatests.pending(conn, pipeline)
    results: list[RefreshResult] = []
    touched_models: set[str] = set()  # whose rows this round changed
    tested: set[str] = set()
    aggregates = aggregates_by_upstream(pipeline)
    # The models' SQL is planned with the raw table's statistics: bring them up to date first.
    analyze_due(cfg, conn, [cfg.table])

    # Models never built, reading the raw table and models built before or among these: built
    # side by side before the round (which then records each in its turn, with the catch-up of
    # a batched build). A model reading a view, or a model whose test of severity error failed
    # or has yet to run (it would hold the dependants back), is built in its turn.
    built_before = {n: st.snapshot for n, st in states.items()
                    if st.snapshot is not None and n not in held and n in pipeline.models
                    and of(pipeline.models[n].kind).by_document}
    firsts: list[Model] = []
    for m in pipeline.models.values():  # upstream first
        ready = {f.name for f in firsts if not _may_hold(f)} | built_before.keys()
        if (first_builds and of(m.kind).by_document and m.name in states and states[m.name].snapshot is None
                and states[m.name].hash == m.hash and ready.issuperset(m.deps)):
            firsts.append(m)
    prebuilt = (_build_side_by_side(cfg, firsts, snapshot, aggregates, should_stop, built_before)
                if len(firsts) > 1 else {})
    if should_stop():  # recorded next round: a batched build resumes complete, others build again
        return [RefreshResult(m.name, m.kind, "building") for m in firsts]

    def raw_changed_since(snap: str) -> bool:
        if snap not in raw_changed:
            raw_changed[snap] = bool(value(conn, "raw_changed_since", since(cfg, snap), prepare=False))
        return raw_changed[snap]

    for model in pipeline.models.values():
        if should_stop():
            break
        if model.name in held:
            failed[model.name] = held[model.name]
        blocked = [d for d in model.deps if d in failed]
        state = states.get(model.name)
        strategy = of(model.kind)
        if not strategy.has_rows:
            if blocked:
                failed[model.name] = "was not refreshed"
            continue
        if blocked:
            error = f"not refreshed: upstream model {blocked[0]} {failed[blocked[0]]}"
            failed[model.name] = "was not refreshed"
            if state is not None:
                _record_failure(conn, model.name, "blocked", error, 0.0)
            results.append(RefreshResult(model.name, model.kind, "blocked", error=error))
            continue
        if state is None or state.hash != model.hash:
            failed[model.name] = "is not applied"
            results.append(RefreshResult(model.name, model.kind, "unapplied",
                                         error="definition differs from the applied one: run `chtsync models apply`"))
            continue
        if not first_builds and (state.snapshot is None or any(d in unbuilt for d in model.deps)):
            # A round forced during the initial sync: built now, a model would be built from part
            # of the raw table and then catch up on the rest by id, several times slower than one
            # build by block ranges once the sync is done. Its dependents wait with it.
            unbuilt.add(model.name)
            results.append(RefreshResult(model.name, model.kind, "waiting", rows=state.rows))
            continue
        inp = inputs[model.name]
        if not force:
            # The interval throttles a model that holds data; an empty one (just created, before
            # the first documents arrived) fills as soon as its inputs change.
            if (model.spec.interval and state.age is not None and state.age < model.spec.interval
                    and state.rows):
                results.append(RefreshResult(model.name, model.kind, "waiting", rows=state.rows))
                continue
            upstream_newer = any((states[u].seq or 0) > (state.seq or 0) for u in inp.models)
            changed = (state.snapshot is None or inp.external or upstream_newer
                       or (inp.raw and raw_changed_since(state.snapshot)))
            if not changed:
                results.append(RefreshResult(model.name, model.kind, "skipped", rows=state.rows))
                continue
        # An incremental model read its incremental upstreams as of their own snapshots (one may
        # be waiting for its interval): keep the oldest, so that documents written since are
        # re-derived here once the upstream has caught up.
        new_snapshot = min([snapshot] + [states[u].snapshot for u in inp.models
                                         if of(pipeline.models[u].kind).by_document and states[u].snapshot],
                           key=_age)
        started = time.monotonic()
        try:
            if strategy.by_document and state.snapshot is None:  # first build, in batches
                built = prebuilt.get(model.name) or _build(conn, cfg, model, model.name, new_snapshot,
                                                           aggregates.get(model.name, []), should_stop)
                if built is None:
                    failed[model.name] = "is still being built"
                    results.append(RefreshResult(model.name, model.kind, "building"))
                    continue
                rows, changed_docs, touched = built.rows, None, True
                with conn.transaction():
                    if built.batched:  # what was written since the build began, derived again
                        rows = of(model.kind).rederive(conn, cfg, model, built.snapshot, rows,
                                                          aggregates.get(model.name, []), model.name).rows
                    else:
                        new_snapshot = built.snapshot
                    ms = (time.monotonic() - started + built.seconds) * 1000
                    state.seq = value(conn, "record_refresh_ok", {
                        "name": model.name, "ms": ms, "rows": rows, "snapshot": new_snapshot,
                        "touched": True, "seen": 0})
                    conn.execute(q("build_done"), (model.name,))
            else:
                with conn.transaction():
                    rows, changed_docs, touched = strategy.refresh(conn, cfg, model, state,
                                                                   aggregates.get(model.name, []))
                    ms = (time.monotonic() - started) * 1000
                    state.seq = value(conn, "record_refresh_ok", {
                        "name": model.name, "ms": ms, "rows": rows, "snapshot": new_snapshot, "touched": touched,
                        "seen": max([states[u].seq or 0 for u in inp.models], default=0)})
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            ms = (time.monotonic() - started) * 1000
            error = first_line(exc)
            failed[model.name] = "failed"
            _record_failure(conn, model.name, "error", error, ms)
            log.warning("model refresh failed name=%s error=%s", model.name, error)
            results.append(RefreshResult(model.name, model.kind, "error", duration_ms=ms, error=error))
            continue
        state.snapshot, state.rows = new_snapshot, rows
        if changed_docs is None and strategy.analyze_after_build:
            # Built from scratch: downstream models are planned with its statistics.
            analyze(conn, model.name)
        log.info("model refreshed name=%s kind=%s rows=%s changed=%s ms=%.0f",
                 model.name, model.kind, rows, changed_docs, ms)
        results.append(RefreshResult(model.name, model.kind, "ok", rows, changed_docs, ms))
        if touched:
            touched_models.add(model.name)
        # Its rows changed, or a model its relationships point to did, or time moved a freshness
        # test: test it again. A run that changed no row cannot change another result, and
        # testing costs a scan of the model.
        fresh = changed_docs != 0 and any(t.kind == "freshness" for t in model.spec.tests)
        if model.spec.tests and (touched or fresh or _points_to(model, touched_models)):
            untested.discard(model.name)
            tested.add(model.name)
            failed.pop(model.name, None)
            fails = [t.name for t in datatests.run(conn, pipeline, [model.name]) if t.status == "fail"]
            if fails:
                failed[model.name] = f"failed data test {fails[0]}"
    # Also in a round that wrote nothing: a round's own writes reach the statistics counters up
    # to a second after it ends, so the round after it is the one that sees them.
    analyze_due(cfg, conn, [m.name for m in pipeline.models.values() if of(m.kind).has_rows])
    # Never-run tests, and those whose relationships point to a model refreshed after them.
    late = {m.name for m in pipeline.models.values() if m.name not in tested and _points_to(m, touched_models)}
    applied = [n for n in sorted(untested | late) if n in states and states[n].hash == pipeline.models[n].hash]
    if applied and not should_stop():
        datatests.run(conn, pipeline, applied)
    return results


def _may_hold(model: Model) -> bool:
    """A test of severity error could hold the model's dependants back once it is built."""
    return any(t.severity == "error" for t in model.spec.tests)


def _points_to(model: Model, models: set[str]) -> bool:
    return any(t.kind == "relationships" and t.to in models for t in model.spec.tests)


def analyze(conn: psycopg.Connection, relation: str) -> None:
    """ANALYZE one relation of the schema (outside any transaction: its lock, SHARE UPDATE
    EXCLUSIVE, lets ingest and readers go on)."""
    started = time.monotonic()
    conn.execute(q("analyze", relation=sql.Identifier(relation)))
    log.info("analyzed name=%s ms=%.0f", relation, (time.monotonic() - started) * 1000)


def analyze_due(cfg: Config, conn: psycopg.Connection, relations: list[str]) -> list[str]:
    """ANALYZE those of `relations` that enough rows were written to since their last ANALYZE
    (autovacuum's rule, whether autovacuum runs or not); return their names."""
    due = [r for (r,) in conn.execute(q("analyze_due"), (relations,))]
    for relation in due:
        analyze(conn, relation)
    return due


def refresh_once(cfg: Config, conn: psycopg.Connection, force: bool = False, *, wait: bool = True,
                 pipeline: Pipeline | None = None, should_stop: Callable[[], bool] = lambda: False,
                 first_builds: bool = True) -> list[RefreshResult]:
    """Refresh, in dependency order, every model whose inputs changed since its last refresh
    (all of them with force=True, ignoring intervals too). A failing model is recorded and its
    dependents skipped; the others go on. With wait=False, return [] at once when another
    process holds the pipeline lock (it is refreshing or applying). With first_builds=False
    (a round during the initial sync) models never built wait, and their dependents."""
    pipeline = pipeline or graph.load(cfg)
    key = (db.LOCK_CLASS, db.lock_key(cfg, "pipeline"))
    with autocommit(conn):
        with conn.pipeline():  # one round trip: an idle round is a handful of them
            conn.execute(q("refresh_commits_async"))
            locked = conn.execute(q("pipeline_lock" if wait else "pipeline_try_lock"), key)
        if not wait and not locked.fetchone()[0]:
            return []
        started = time.monotonic()
        try:
            results = _run(cfg, conn, pipeline, force, should_stop, first_builds)
            worked = [r for r in results if r.status not in ("skipped", "waiting")]
            if worked:  # an idle round (every model skipped) is not worth a line
                log.info("refresh round refreshed=%d ms=%.0f", len(worked), (time.monotonic() - started) * 1000)
            return results
        finally:
            with contextlib.suppress(psycopg.OperationalError):
                conn.execute(q("pipeline_unlock"), key)


async def _wait_any(timeout: float | None, *events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def initial_sync(hold_pending: int, sources: Iterable[tuple[str, str, int | None]]) -> str | None:
    """Why the models wait for the initial sync, if they do: a source (name, state, pending)
    catching up with more than hold_pending changes to read (or not known yet). 0: never wait."""
    if hold_pending <= 0:
        return None
    for name, state, pending in sources:
        if state == "starting" or (state == "catching up" and (pending is None or pending > hold_pending)):
            left = "pending not known yet" if pending is None else f"{pending:,} changes pending"
            return f"models wait for the initial sync ({name}: {left})"
    return None


async def refresh_loop(cfg: Config, stop: asyncio.Event, wake: asyncio.Event,
                       catching_up: Callable[[], str | None] = lambda: None) -> None:
    """The service's refresh: every cfg.refresh_interval seconds and, when `wake` is set (new
    rows committed), at once or DEBOUNCE seconds after the last round started, until `stop`.
    While `catching_up()` gives a reason, rounds wait for it to end (HOLD_SECONDS at most).
    Database errors are logged and retried; a broken models file is reported once and left alone
    until the file changes."""
    conn: psycopg.Connection | None = None
    broken_file: float | None = None  # mtime of a models file that failed to load
    last_round = time.monotonic()  # the hold's bound counts from the start too
    try:
        while not stop.is_set():
            stopped, forced = await _hold(catching_up, stop, last_round)
            if stopped:
                continue
            wake.clear()
            last_round = time.monotonic()
            try:
                if broken_file is None or broken_file != _mtime(cfg):
                    broken_file = None
                    if conn is None or conn.closed or conn.broken:
                        conn = await asyncio.to_thread(db.connect, cfg, autocommit=True)
                    await _refresh_until_stop(cfg, conn, stop, first_builds=not forced)
            except ModelsFileError as exc:
                # Retrying cannot fix a file: wait for someone to edit it.
                broken_file = _mtime(cfg)
                log.error("refresh paused until %s changes: %s", cfg.models, exc)
            except (psycopg.Error, PostgresUnavailable) as exc:
                log.warning("refresh: %s; retrying in %.0f s", first_line(exc), cfg.refresh_interval)
                if conn is not None and (conn.broken or conn.closed):
                    conn = None
            await _wait_any(cfg.refresh_interval, stop, wake)
            wait = last_round + DEBOUNCE - time.monotonic()
            if wake.is_set() and not stop.is_set() and wait > 0:
                await _wait_any(wait, stop)
    finally:
        if conn is not None:
            await asyncio.to_thread(conn.close)


async def _hold(catching_up: Callable[[], str | None], stop: asyncio.Event,
                last_round: float) -> tuple[bool, bool]:
    """Wait while a source catches up (HOLD_SECONDS after last_round at most): (stopped, still
    catching up: a forced round). Said in the log when it lasts (a restart holds for its first
    page only)."""
    reason, announced = catching_up(), False
    while reason is not None and time.monotonic() - last_round < HOLD_SECONDS:
        await _wait_any(HOLD_POLL, stop)
        if stop.is_set():
            return True, False
        reason = catching_up()
        if reason is not None and not announced:
            log.info("%s: refreshing once it is caught up (or every %.0f s)", reason, HOLD_SECONDS)
            announced = True
    if announced:
        log.info("models refresh: %s", "the initial sync is done" if reason is None
                 else f"{HOLD_SECONDS:.0f} s without a refresh during the initial sync (models"
                      " not built yet wait for its end)")
    return False, reason is not None


def _mtime(cfg: Config) -> float:
    try:
        return cfg.models.stat().st_mtime
    except OSError:
        return -1.0


async def _refresh_until_stop(cfg: Config, conn: psycopg.Connection, stop: asyncio.Event, *,
                              first_builds: bool = True) -> None:
    """One refresh_once in a thread; once stop is set it may finish for STOP_GRACE seconds,
    then its statement is cancelled."""
    task = asyncio.ensure_future(asyncio.to_thread(
        refresh_once, cfg, conn, wait=False, should_stop=stop.is_set, first_builds=first_builds))
    await _wait_any(None, stop, _done_event(task))
    if not task.done():
        done, _ = await asyncio.wait([task], timeout=STOP_GRACE)
        if not done:  # off the loop, and bounded: a Postgres that stopped answering must not stall it
            with contextlib.suppress(psycopg.Error):
                await asyncio.to_thread(conn.cancel_safe, timeout=STOP_GRACE)
    with contextlib.suppress(psycopg.errors.QueryCanceled):
        await task


def _done_event(task: asyncio.Future) -> asyncio.Event:
    event = asyncio.Event()
    task.add_done_callback(lambda _: event.set())
    return event
