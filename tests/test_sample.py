"""The sample generator: deterministic, the counts it promises, realistic shapes; loader; trickle."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import pytest

from chtsync import cli
from chtsync import demo as sample
from tests.servers import ADMIN, PouchServer

N, SEED = 3000, 7
CONTACT_DOC_TYPES = {"contact", "clinic", "district_hospital", "health_center", "person"}


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, dict]]:
    return list(sample.generate(N, SEED))


def test_same_seed_same_bytes_and_dicts_match_text() -> None:
    first = list(sample.Sample(N, SEED).texts())
    again = sample.Sample(N, SEED)
    assert list(again.texts()) == first
    assert list(again.texts()) == first, "iterating a Sample twice gives the same documents"
    assert [(db, sample.dumps(doc)) for db, doc in sample.generate(N, SEED)] == first
    assert list(sample.Sample(N, SEED + 1).texts()) != first


def test_exactly_n_documents_in_the_three_databases(docs: list[tuple[str, dict]]) -> None:
    counts = sample.expected_counts(N, SEED)
    assert len(docs) == counts.docs == N
    assert Counter(db for db, _ in docs) == counts.by_db
    assert set(counts.by_db) == {"medic", "medic-users-meta", "_users"}
    assert len({(db, doc["_id"]) for db, doc in docs}) == N, "ids are unique per database"
    with pytest.raises(ValueError):
        sample.Sample(sample.MIN_DOCS - 1, SEED)


def test_counts_match_the_base_model_rules(docs: list[tuple[str, dict]]) -> None:
    """Classify the documents the way the CHT base models do and compare with expected_counts."""
    counts = sample.expected_counts(N, SEED)
    settings = next(doc for _, doc in docs if doc["_id"] == "settings")
    person_types = {t["id"] for t in settings["settings"]["contact_types"] if t.get("person")}
    refused = [doc for _, doc in docs if _has_lone_surrogate(doc)]
    stored = [(db, doc) for db, doc in docs if not _has_lone_surrogate(doc)]
    contacts = [doc for _, doc in stored if doc.get("type") in CONTACT_DOC_TYPES]
    ctype = [doc.get("contact_type") or doc["type"] for doc in contacts]
    persons = [doc for doc, t in zip(contacts, ctype, strict=True) if t in person_types]
    reports = [doc for _, doc in stored if doc.get("type") == "data_record"]
    got = {
        "document_metadata": len(stored),
        "contact": len(contacts),
        "contact_detail": len(contacts),
        "contact_type": len({t["id"] for t in settings["settings"]["contact_types"]} | set(ctype)),
        "person": len(persons),
        "place": len(contacts) - len(persons),
        "patient": sum(1 for doc in persons if doc.get("patient_id") is not None),
        "data_record": len(reports),
        "user": sum(1 for _, doc in stored if doc.get("type") == "user-settings"),
        "feedback": sum(1 for db, doc in stored if doc.get("type") == "feedback" and db == "medic-users-meta"),
        "telemetry": sum(1 for db, doc in stored if doc.get("type") == "telemetry" and db == "medic-users-meta"),
        "telemetry_devices": sum(1 for _, doc in stored if doc.get("type") == "telemetry"),
    }
    assert got == counts.models
    assert Counter(doc["form"] for doc in reports) == counts.forms
    assert len(counts.forms) >= 6
    assert len(refused) == counts.refused >= 1
    assert sum(1 for _, doc in docs if "\\u0000" in json.dumps(doc)) == counts.nul >= 1
    # Every person-or-place type is configured, including the custom ones.
    assert {"chw_area", "chw"} <= set(ctype) <= {t["id"] for t in settings["settings"]["contact_types"]}
    users = {doc["_id"] for db, doc in docs if db == "_users"}
    assert users == {doc["_id"] for _, doc in docs if doc.get("type") == "user-settings"}


def test_realistic_shapes(docs: list[tuple[str, dict]]) -> None:
    by_id = {doc["_id"]: doc for db, doc in docs if db == "medic"}
    hierarchy = Counter()
    for _, doc in docs:
        if doc.get("type") == "clinic":
            hc = by_id[doc["parent"]["_id"]]
            assert hc["type"] == "health_center"
            assert by_id[doc["parent"]["parent"]["_id"]]["type"] == "district_hospital"
            assert doc["parent"]["parent"]["_id"] == hc["parent"]["_id"]
            # The household head lives in the household (unless made an orphan on purpose).
            assert by_id[doc["contact_id"]].get("parent", {"_id": doc["_id"]})["_id"] == doc["_id"]
            hierarchy["clinic"] += 1
    assert hierarchy["clinic"] == sample.expected_counts(N, SEED).kinds["clinic"]

    reports = [doc for _, doc in docs if doc.get("type") == "data_record"]
    dates = [d["reported_date"] for d in reports if isinstance(d["reported_date"], int) and d["reported_date"] > 1e11]
    assert max(dates) <= sample.DEFAULT_END_MS
    assert max(dates) - min(dates) > 700 * sample.DAY_MS, "spread over two years"
    for doc in reports[:200]:
        assert doc["contact"]["parent"]["parent"]["parent"]["_id"], "reporter with a full parent chain"
        assert doc["from"].startswith("+254")
        fields = doc["fields"]
        assert fields["inputs"]["contact"]["_id"]
        assert fields.get("patient_uuid") or fields.get("place_id")
        assert isinstance(fields[doc["form"]], dict)

    messy = Counter()
    for _, doc in docs:
        if doc.get("reported_date") == "":
            messy["empty"] += 1
        elif isinstance(doc.get("reported_date"), int) and doc["reported_date"] < 1e11:
            messy["seconds"] += 1
        if doc.get("type") in ("person", "contact") and "parent" not in doc:
            messy["orphan"] += 1
    assert min(messy.values()) >= 1 and len(messy) == 3

    telemetry = [doc for _, doc in docs if doc.get("type") == "telemetry"]
    old = [t for t in telemetry if t["metadata"]["versions"]["app"] in sample.OLD_VERSIONS]
    new = [t for t in telemetry if t["metadata"]["versions"]["app"] not in sample.OLD_VERSIONS]
    assert old and new
    assert any(t["metadata"]["month"] == 0 for t in old) or all(t["metadata"]["month"] != 12 for t in old)
    assert all(t["metadata"]["month"] in range(0, 12) for t in old if t["metadata"]["month"] != "x")
    assert all(t["metadata"]["month"] in range(1, 13) for t in new if t["metadata"]["month"] != "x")
    assert any(t["metadata"]["month"] == "x" for t in telemetry)
    device = next(t for t in telemetry if "deviceInfo" in t["device"])["device"]["deviceInfo"]
    assert {"app", "software", "hardware", "storage", "network"} <= set(device)
    feedback = [doc for _, doc in docs if doc.get("type") == "feedback"]
    assert all({"source", "url", "user", "time"} <= set(f["meta"]) for f in feedback)
    user = next(doc for db, doc in docs if db == "_users")
    assert {"derived_key", "salt", "password_scheme", "iterations"} <= set(user)


def test_average_size_like_real_reports() -> None:
    texts = [text for _, text in sample.Sample(20_000, 1).texts()]
    average = sum(map(len, texts)) / len(texts)
    assert 1000 <= average <= 1500, average


def test_sample_command_writes_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.jsonl"
    assert cli.main(["sample", "--docs", "500", "--seed", "3", "--out", str(out)]) == 0
    assert "500 documents" in capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert len(lines) == 500
    assert [json.loads(line)["doc"] for line in lines] == [doc for _, doc in sample.generate(500, 3)]
    again = tmp_path / "b.jsonl"
    assert cli.main(["sample", "--docs", "500", "--seed", "3", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_couch_target_credentials() -> None:
    assert sample.couch_target("http://a:b%40c@h:5984/", {}) == ("http://h:5984", ("a", "b@c"))
    assert sample.couch_target("https://h", {"COUCHDB_USER": "u", "COUCHDB_PASSWORD": "p"}) == (
        "https://h",
        ("u", "p"),
    )
    assert sample.couch_target("http://h:1", {}) == ("http://h:1", None)
    with pytest.raises(sample.SampleError):
        sample.couch_target("h:5984", {})
    assert sample.db_names() == {"medic": "medic", "medic-users-meta": "medic-users-meta", "_users": "_users"}
    assert sample.db_names("x")["_users"] == "x-users", "only medic itself touches the real _users"


def test_load_and_trickle_into_pouchdb(pouch_server: PouchServer) -> None:
    names = sample.db_names("loadtest")
    data = sample.Sample(1000, 5)
    with sample.couch_client(pouch_server.url, ADMIN) as client:
        try:
            steps: list[int] = []
            loaded = sample.load(client, data.texts(), dbs=names, batch=300, progress=steps.append)
            assert loaded.failed == 0 and sum(steps) == 1000
            assert loaded.written == Counter({names[db]: n for db, n in data.counts.by_db.items()})
            for db, n in data.counts.by_db.items():
                assert client.get(f"/{names[db]}").json()["doc_count"] == n
            # Documents arrive intact (pouchdb-server drops bodies without a JSON Content-Type).
            settings = client.get("/loadtest/settings").json()
            assert settings["settings"]["contact_types"] == sample.CONTACT_TYPES

            result = asyncio.run(_trickle(pouch_server.url, data))
            assert result.errors == 0 and len(result.created) >= 10
            assert result.writes >= 25
            state = {row["id"]: row for row in client.get("/loadtest/_all_docs").json()["rows"]}
            assert all(i in state for i in set(result.created) - set(result.deleted))
            assert not any(i in state for i in result.deleted)
            assert sum(result.forms.values()) == result.net_reports
            assert client.get("/loadtest").json()["doc_count"] == data.counts.by_db["medic"] + result.net_reports
        finally:
            for name in names.values():
                client.delete(f"/{name}")


async def _trickle(url: str, data: sample.Sample) -> sample.TrickleResult:
    async with httpx.AsyncClient(base_url=url, auth=ADMIN, headers={"Content-Type": "application/json"}) as client:
        return await sample.trickle(client, data, rate=30, seconds=1.5, db="loadtest")


def _has_lone_surrogate(doc: dict) -> bool:
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
