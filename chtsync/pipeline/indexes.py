"""A model's indexes: their names and definitions, created with the model, or after the rows of
a first build or rebuild (inserting into a table with ten indexes costs several times more than
building them once, sorted, at the end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from chtsync.pipeline.kinds import of
from chtsync.pipeline.session import q

if TYPE_CHECKING:
    from chtsync.pipeline.graph import Model


@dataclass(frozen=True)
class ModelIndex:
    suffix: str  # its name: index_name(relation, suffix)
    body: sql.Composable  # what follows ON <relation>
    unique: bool
    on_key: bool  # leads with the document key: the refresh and a build by ids delete by it


def index_name(model: str, suffix: str) -> str:
    """The name of a model's index: at most 63 bytes (a longer one Postgres would cut silently),
    with a suffix of up to 6 characters."""
    return f"{model[:56]}_{suffix}"


def model_indexes(model: Model) -> list[ModelIndex]:
    """The indexes the models file declares, plus one on the key of a model refreshed by
    document when none of those serves the refresh's deletes."""
    key = model.spec.unique_key[:1]
    out = [ModelIndex(f"ix{i}", q("model_index_body", method=sql.SQL(ix.method),
                                  columns=sql.SQL(f"({ix.expression})") if ix.expression  # normalized by pglast
                                  else sql.SQL(", ").join(map(sql.Identifier, ix.columns))),
                      ix.unique, bool(key) and not ix.expression and ix.columns[:1] == key)
           for i, ix in enumerate(model.spec.indexes)]
    if of(model.kind).by_document and not any(
            ix.columns[:1] == key and ix.method in ("btree", "hash") for ix in model.spec.indexes):
        # Each run deletes by the key: without an index that is a scan of the whole table.
        out.append(ModelIndex("key", q("model_index_body", method=sql.SQL("btree"), columns=sql.Identifier(key[0])),
                              False, True))
    return out


def create(conn: psycopg.Connection, model: Model, relation: str) -> None:
    """Create those of the model's indexes that `relation` does not have."""
    have = {r[0] for r in conn.execute(q("relation_indexes"), (relation,))}
    for ix in model_indexes(model):
        name = index_name(relation, ix.suffix)
        if name not in have:
            conn.execute(q("create_model_index", unique=sql.SQL("UNIQUE " if ix.unique else ""),
                           index=sql.Identifier(name), relation=sql.Identifier(relation), body=ix.body))


def defer(conn: psycopg.Connection, model: Model, relation: str, keep_key: bool) -> None:
    """Drop the indexes a build fills more cheaply at its end (`create`): all but the unique ones
    (a duplicate is refused by the batch that brings it) and, with keep_key, those on the key (a
    build by ids deletes by it; a build that only inserts does not need it before its end)."""
    for ix in model_indexes(model):
        if not (ix.on_key and keep_key) and not ix.unique:
            conn.execute(q("drop_index", index=sql.Identifier(index_name(relation, ix.suffix))))
