"""The live trickle: new reports, edits and deletes written to CouchDB while the service runs."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from chtsync.demo.generator import MEDIC, Sample, dumps


@dataclass
class TrickleResult:
    """When CouchDB acknowledged each write (time.time()), per document id."""

    created: dict[str, float] = field(default_factory=dict)
    edited: dict[str, float] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    forms: Counter[str] = field(default_factory=Counter)  # reports created and not deleted
    errors: int = 0
    seconds: float = 0.0

    @property
    def writes(self) -> int:
        return len(self.created) + len(self.edited) + len(self.deleted)

    @property
    def net_reports(self) -> int:
        return len(self.created) - len(self.deleted)


async def trickle(
    client: httpx.AsyncClient,
    sample: Sample,
    *,
    rate: float,
    seconds: float,
    db: str = MEDIC,
    stop: asyncio.Event | None = None,
    result: TrickleResult | None = None,
) -> TrickleResult:
    """Write new reports, edits and deletes at `rate` per second for `seconds` (or until stop).

    Only documents this trickle created are edited or deleted, so pointing it at a real
    instance never touches existing data. `result` is filled as writes land, so a caller can
    watch it live (the demo measures write-to-model latency from `created`).
    """
    result = result if result is not None else TrickleResult()
    rng = sample.rng
    live: dict[str, tuple[dict[str, Any], str]] = {}  # id -> (doc, current rev)
    path = f"/{urllib.parse.quote(db, safe='')}/"
    loop = asyncio.get_running_loop()
    started = loop.time()
    k = 0
    while not (stop is not None and stop.is_set()):
        due = started + k / rate
        if due - started >= seconds:
            break
        if due > loop.time():
            if stop is None:
                await asyncio.sleep(due - loop.time())
            else:
                try:
                    await asyncio.wait_for(stop.wait(), due - loop.time())
                    break
                except TimeoutError:
                    pass
        k += 1
        roll = rng.random()
        try:
            if not live or roll < 0.75 or (roll >= 0.9 and len(live) < 5):
                doc = sample.report(int(time.time() * 1000))
                r = await client.put(path + doc["_id"], content=dumps(doc))
                r.raise_for_status()
                result.created[doc["_id"]] = time.time()
                result.forms[doc["form"]] += 1
                live[doc["_id"]] = (doc, r.json()["rev"])
            elif roll < 0.9:
                doc_id = rng.choice(list(live))
                doc, rev = live[doc_id]
                edited = {**doc, "_rev": rev, "fields": {**doc["fields"], "notes": f"edit {k}"}}
                r = await client.put(path + doc_id, content=dumps(edited))
                r.raise_for_status()
                result.edited[doc_id] = time.time()
                live[doc_id] = (edited, r.json()["rev"])
            else:
                doc_id = rng.choice(list(live))
                doc, rev = live.pop(doc_id)
                r = await client.delete(path + doc_id, params={"rev": rev})
                r.raise_for_status()
                result.deleted[doc_id] = time.time()
                result.forms[doc["form"]] -= 1
        except httpx.HTTPError:
            result.errors += 1
    result.seconds = loop.time() - started
    return result
