"""The CHT base models (sql/models.yaml): realistic CHT documents go through the real ingest
function, the models are built and refreshed, and every model is compared column by column with
rows written by hand; then documents are edited, deleted and retyped, and compared again."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from chtsync import db
from chtsync import pipeline as engine
from tests.cht_fixtures import (
    MEDIC,
    META,
    MODELS_YAML,
    ROOT,
    USERS,
    Feed,
    load_models,
    model_sql,
    ts,
)
from tests.conftest import make_config

T = 1700006400  # 2023-11-15 00:00:00 UTC
MS = 1000

# --- the contract: names, column order and types a CHT Pipeline 2.0 user relies on ----------

VARCHAR, TEXT, BOOL = "character varying", "text", "boolean"
TS, TSTZ = "timestamp without time zone", "timestamp with time zone"

CONTRACT: dict[str, list[tuple[str, str]]] = {
    "document_metadata": [("uuid", VARCHAR), ("saved_timestamp", TS), ("_deleted", BOOL),
                          ("doc_type", TEXT), ("instance", TEXT), ("dbname", TEXT)],
    "contact": [("uuid", VARCHAR), ("saved_timestamp", TS), ("reported", TSTZ),
                ("parent_uuid", TEXT), ("name", TEXT), ("contact_type", TEXT),
                ("active", TEXT), ("notes", TEXT), ("muted", TEXT)],
    "contact_detail": [("uuid", VARCHAR), ("saved_timestamp", TS), ("contact_type", TEXT),
                       ("sex", TEXT), ("phone", TEXT), ("phone2", TEXT), ("patient_id", TEXT),
                       ("contact_id", TEXT), ("place_id", TEXT)],
    "contact_type": [("id", TEXT), ("person", BOOL), ("configured", BOOL)],
    "person": [("uuid", VARCHAR), ("saved_timestamp", TS), ("sex", TEXT), ("phone", TEXT),
               ("phone2", TEXT), ("patient_id", TEXT)],
    "place": [("uuid", VARCHAR), ("saved_timestamp", TS), ("contact_id", TEXT),
              ("place_id", TEXT)],
    "patient": [("uuid", VARCHAR), ("saved_timestamp", TS), ("patient_id", TEXT)],
    "data_record": [("uuid", VARCHAR), ("saved_timestamp", TS), ("reported", TSTZ),
                    ("form", TEXT), ("from_phone", TEXT), ("patient_id", TEXT),
                    ("place_id", TEXT), ("contact_uuid", TEXT), ("parent_uuid", TEXT),
                    ("grandparent_uuid", TEXT), ("source", TEXT)],
    # the example form model (generated from YAML: chtsync/pipeline/forms.py)
    "pregnancy_home_visit": [("uuid", VARCHAR), ("saved_timestamp", TS), ("reported", TSTZ),
                             ("form", TEXT), ("from_phone", TEXT), ("patient_id", TEXT),
                             ("place_id", TEXT), ("contact_uuid", TEXT), ("parent_uuid", TEXT),
                             ("grandparent_uuid", TEXT), ("source", TEXT), ("visit_option", TEXT),
                             ("weeks_since_lmp", "bigint"), ("edd", "date"),
                             ("anc_visits_hf_past", "bigint"), ("vaginal_bleeding", BOOL),
                             ("fever", BOOL), ("_cast_failures", "text[]")],
    "user": [("user_id", VARCHAR), ("saved_timestamp", TS), ("contact_uuid", TEXT),
             ("language", TEXT), ("roles", TEXT)],
    "feedback": [("uuid", VARCHAR), ("saved_timestamp", TS), ("source", TEXT), ("url", TEXT),
                 ("user_name", TEXT), ("period_start", TEXT), ("cause", TEXT),
                 ("message", TEXT)],
    "telemetry": [("uuid", VARCHAR), ("saved_timestamp", TS), ("period_start", TSTZ),
                  ("user_name", TEXT), ("app_version", TEXT), ("boot_time_min", TEXT),
                  ("boot_time_max", TEXT), ("boot_time_count", TEXT),
                  ("doc_count_on_local_db", TEXT)],
    "telemetry_devices": [("uuid", VARCHAR), ("saved_timestamp", TS), ("period_start", TSTZ),
                          ("device_manufacturer", TEXT), ("device_model", TEXT),
                          ("user_agent", TEXT), ("cht_android_version", TEXT),
                          ("android_version", TEXT), ("storage_free", TEXT),
                          ("storage_total", TEXT), ("network_up_speed", TEXT),
                          ("network_down_speed", TEXT)],
    "reports_by_form_daily": [("form", TEXT), ("day", "date"), ("count", "bigint")],
    "contact_hierarchy": [("uuid", VARCHAR), ("name", TEXT), ("contact_type", TEXT),
                          ("parent_uuid", TEXT)]
    + [(f"parent_{n}_{part}", TEXT) for n in range(1, 5) for part in ("uuid", "name", "type")]
    + [("district_uuid", TEXT), ("district_name", TEXT), ("health_facility_uuid", TEXT),
       ("health_facility_name", TEXT)],
}

# Models whose rows carry saved_timestamp of the document they come from, and the key column.
KEYS = {"document_metadata": "uuid", "contact": "uuid", "contact_detail": "uuid",
        "contact_type": "id", "person": "uuid", "place": "uuid", "patient": "uuid",
        "data_record": "uuid", "user": "user_id", "feedback": "uuid", "telemetry": "uuid",
        "telemetry_devices": "uuid", "reports_by_form_daily": "form",
        "contact_hierarchy": "uuid"}

# --- the documents ---------------------------------------------------------------------------


def lineage(*ids: str) -> dict[str, Any] | None:
    """CHT's denormalised parent chain: lineage('cl1', 'hc1') -> {_id: cl1, parent: {_id: hc1}}."""
    out: dict[str, Any] | None = None
    for i in reversed(ids):
        out = {"_id": i, **({"parent": out} if out else {})}
    return out


def contact_type_entry(id_: str, parents: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": id_, "name_key": f"contact.type.{id_}", "group_key": f"contact.type.{id_}.plural",
            "create_key": f"contact.type.{id_}.new", "edit_key": "contact.type.place.edit",
            "icon": f"medic-{id_}", "create_form": f"form:contact:{id_}:create",
            "parents": parents, **extra}


SETTINGS = {
    "_id": "settings",
    "settings": {
        "locale": "en",
        "contact_types": [
            contact_type_entry("district_hospital", []),
            contact_type_entry("health_center", ["district_hospital"]),
            contact_type_entry("clinic", ["health_center"]),
            contact_type_entry("person", ["district_hospital", "health_center", "clinic"],
                               person=True),
            # a custom person type, with a boolean written as a string (seen in the wild)
            contact_type_entry("chw", ["health_center"], person="yes"),
            # a configured place type nobody uses yet
            contact_type_entry("catchment", ["health_center"]),
            "not-an-object",
            {"name_key": "entry without an id", "person": True},
        ],
    },
}

DH1 = {"_id": "dh1", "type": "district_hospital", "name": "Kisumu District Hospital",
       "reported_date": T * MS, "place_id": "P-DH1", "is_active": True,
       "notes": "Main referral hospital", "contact": {"_id": "chw1"}}
HC1 = {"_id": "hc1", "type": "health_center", "name": "Kondele Health Centre",
       "parent": lineage("dh1"), "reported_date": str((T + 60) * MS), "place_id": "P-HC1",
       "contact_id": "chw1"}
CL1 = {"_id": "cl1", "type": "clinic", "name": "Manyatta Clinic", "parent": lineage("hc1", "dh1"),
       "reported_date": T + 120,  # seconds, not milliseconds
       "contact": {"_id": "p1", "parent": lineage("cl1", "hc1", "dh1")}, "notes": ""}
P1 = {"_id": "p1", "type": "person", "name": "Alice Atieno",
      "parent": lineage("cl1", "hc1", "dh1"), "sex": "female", "phone": "+254700000001",
      "alternative_phone": "+254700000011", "patient_id": "12345", "date_of_birth": "1990-04-01",
      "reported_date": ""}
P2 = {"_id": "p2", "type": "person", "name": "Bob Otieno", "parent": lineage("cl1", "hc1", "dh1"),
      "sex": "male", "phone": "+254700000002", "reported_date": "yesterday", "muted": ""}
CHW1 = {"_id": "chw1", "type": "contact", "contact_type": "chw", "name": "Carol Wanjiru",
        "parent": lineage("hc1", "dh1"), "phone": "+254711111111", "sex": "female",
        "reported_date": T * MS + 123, "muted": "2023-11-20T08:00:00.000Z", "is_active": "false"}
VIL1 = {"_id": "vil1", "type": "contact", "contact_type": "village", "name": "Nyalenda Village",
        "parent": lineage("hc1", "dh1"), "place_id": "V-001", "contact_id": "chw1",
        "reported_date": 99999999999999999999}
ORPHAN = {"_id": "orphan", "type": "person", "name": "Orphan Person",
          "parent": lineage("missing-clinic", "missing-hc"), "sex": "female",
          "patient_id": "99999", "reported_date": -5}
STRAY = {"_id": "stray", "type": "person", "name": "Stray Parent", "parent": "cl1",
         "reported_date": f" {T * MS} "}
GHOST = {"_id": "ghost", "type": "person", "name": "Deleted Before Build",
         "parent": lineage("cl1", "hc1", "dh1"), "reported_date": T * MS}


def report(id_: str, form: str | None, reported: Any, contact: dict | None = None,
           fields: dict | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": id_, "type": "data_record", "reported_date": reported,
                           "content_type": "xml", **extra}
    if form is not None:
        doc["form"] = form
    if contact is not None:
        doc["contact"] = contact
    if fields is not None:
        doc["fields"] = fields
    return doc


R1 = report("r1", "pregnancy", (T + 3600) * MS, lineage("chw1", "hc1", "dh1"),
            {"patient_id": "12345", "patient_uuid": "p1", "patient_name": "Alice Atieno",
             "lmp_date": "2023-09-01", "danger_signs": {"bleeding": "no", "fever": "yes"},
             "inputs": {"source": "task", "contact": {"_id": "p1"}}},
            **{"from": "+254711111111"})
R2 = report("r2", "pregnancy", 1700050000 * MS, lineage("chw1", "hc1"),
            {"patient_uuid": "p1", "visit": {"n": 2}})
R3 = report("r3", "assessment", 1700100000,  # seconds
            lineage("p1", "cl1", "hc1"), {"patient_id": "ignored", "place_id": "P-CL1"},
            patient_id="12345", **{"from": "+254700000001"})
R4 = report("r4", "assessment", "", None, {"place_id": "other"}, place_id="P-HC1")
R5 = {"_id": "r5", "type": "data_record", "from": "+254799999999", "reported_date": 1700100000 * MS,
      "sms_message": {"message": "hello", "from": "+254799999999"}, "tasks": []}
R6 = report("r6", "assessment", 1700103600 * MS, lineage("chw1", "hc1", "dh1"),
            {"patient_uuid": "p2", "symptoms": ["cough"]})
R7 = report("r7", "pregnancy_home_visit", 1700200000 * MS, lineage("chw1", "hc1", "dh1"),
            {"patient_id": "", "patient_uuid": "p1"})

FORM = {"_id": "form:pregnancy", "type": "form", "internalId": "pregnancy", "title": "Pregnancy"}
DDOC = {"_id": "_design/medic", "views": {}}

U_CAROL = {"_id": "org.couchdb.user:carol", "type": "user-settings", "name": "carol",
           "contact_id": "chw1", "facility_id": "hc1", "language": "sw", "roles": ["chw"],
           "known": True}
U_ADMIN = {"_id": "org.couchdb.user:admin2", "type": "user-settings", "name": "admin2",
           "facility_id": "dh1", "language": "en", "roles": ["program_officer", "data_entry"]}
U_CAROL_USERS = {"_id": "org.couchdb.user:carol", "type": "user", "name": "carol",
                 "roles": ["chw"], "facility_id": "hc1", "password_scheme": "pbkdf2",
                 "derived_key": "0123abcd", "salt": "5a17", "iterations": 10}

FB1 = {"_id": "feedback-2023-11-15T10:00:00.000Z-aaaa", "type": "feedback",
       "meta": {"time": "2023-11-15T10:00:00.000Z", "user": {"name": "carol"},
                "url": "https://cht.example.org/#/reports", "app": "medic", "version": "4.5.0",
                "source": "automatic"},
       "info": {"message": "Cannot read properties of undefined",
                "cause": "TypeError at reports.js:12"}}
FB2 = {"_id": "feedback-2023-11-16T09:30:00.000Z-bbbb", "type": "feedback",
       "meta": {"time": "2023-11-16T09:30:00.000Z", "user": {"name": "admin2"},
                "url": "https://cht.example.org/#/messages", "source": "manual"},
       "info": {"message": "The app is slow"}}

ANDROID = {"userAgent": "Mozilla/5.0 (Linux; Android 8.1.0; TECNO KB7)",
           "deviceInfo": {"app": {"version": "v0.4.24-webview", "packageName": "org.medicmobile"},
                          "software": {"androidVersion": "8.1.0", "osApi": 27},
                          "hardware": {"manufacturer": "TECNO", "model": "TECNO KB7"},
                          "storage": {"free": 1073741824, "total": 16000000000},
                          "network": {"upSpeed": 5000, "downSpeed": 20000}}}


def telemetry(id_: str, app: str | None, year: Any, month: Any, day: Any = None,
              device: dict | None = None, user: str = "carol") -> dict[str, Any]:
    meta: dict[str, Any] = {"year": year, "month": month, "user": user, "deviceId": "dev-1"}
    if day is not None:
        meta["day"] = day
    if app is not None:
        meta["versions"] = {"app": app, "forms": {"pregnancy": "1-abc"}, "settings": "9-def"}
    doc: dict[str, Any] = {"_id": id_, "type": "telemetry", "metadata": meta,
                           "metrics": {"boot_time": {"min": 1200, "max": 5600.5, "sum": 20000,
                                                     "count": 12, "sumsqr": 1}},
                           "dbInfo": {"doc_name": f"medic-user-{user}", "doc_count": 1234}}
    if device is not None:
        doc["device"] = device
    return doc


# Before 3.8.0 the month was JavaScript's zero-based one: T1's 10 means November.
T1 = telemetry("telemetry-2019-10-carol", "3.7.1", 2019, 10, device=ANDROID)
T2 = telemetry("telemetry-2020-11-14-admin2", "3.10.0", 2020, 11, 14,  # 3.10 > 3.8, not text
               device={"userAgent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/119.0"},
               user="admin2")
T3 = telemetry("telemetry-2023-twelve-carol", "4.5.0", 2023, "twelve", 3)
T4 = telemetry("telemetry-2021-1-5-carol", "3.8.0", 2021, 1, "5")
T5 = telemetry("telemetry-2022-6-2-carol", None, 2022, 6, 2)
T6 = telemetry("telemetry-2019-11-31-carol", "v3.7.0-rc.1", 2019, 11, 31)
T7 = telemetry("telemetry-2023-2-30-carol", "3.17.1", 2023, 2, 30)
# No year, no month and a whole date in day: that date (CHT Pipeline's CONCAT_WS reads it so).
T8 = telemetry("telemetry-day-only-carol", "4.5.0", None, None, "2021-05-17")
T9 = telemetry("telemetry-day-only-bad-carol", "4.5.0", None, None, "2021-02-30")
TELEMETRY = [T1, T2, T3, T4, T5, T6, T7, T8, T9]

MEDIC_DOCS = [SETTINGS, DH1, HC1, CL1, P1, P2, CHW1, VIL1, ORPHAN, STRAY, GHOST,
              R1, R2, R3, R4, R5, R6, R7, FORM, DDOC, U_CAROL, U_ADMIN]


def load_all(feed: Feed) -> None:
    feed.put(MEDIC_DOCS)
    feed.delete(["ghost"])
    feed.put([U_CAROL_USERS], source=USERS)
    feed.put([FB1, FB2, *TELEMETRY], source=META)


# --- expected rows ---------------------------------------------------------------------------

H = "health_center"
D = "district_hospital"


def hier(uuid: str, name: str, ctype: str, parents: list[tuple[str, str | None, str | None]],
         district: tuple[str, str] | None, facility: tuple[str, str] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"uuid": uuid, "name": name, "contact_type": ctype,
                           "parent_uuid": parents[0][0] if parents else None}
    for n in range(1, 5):
        p = parents[n - 1] if n <= len(parents) else (None, None, None)
        row.update({f"parent_{n}_uuid": p[0], f"parent_{n}_name": p[1], f"parent_{n}_type": p[2]})
    row.update(district_uuid=district and district[0], district_name=district and district[1],
               health_facility_uuid=facility and facility[0],
               health_facility_name=facility and facility[1])
    return row


DH = ("dh1", "Kisumu District Hospital", D)
HC = ("hc1", "Kondele Health Centre", H)
CL = ("cl1", "Manyatta Clinic", "clinic")
DIST = ("dh1", "Kisumu District Hospital")
FAC = ("hc1", "Kondele Health Centre")


def expected_initial() -> dict[str, list[dict[str, Any]]]:
    def meta(uuid: str, doc_type: str | None, db: str = "medic") -> dict[str, Any]:
        return {"uuid": uuid, "_deleted": False, "doc_type": doc_type, "instance": "localhost",
                "dbname": db}

    def contact(uuid, reported, parent, name, ctype, active=None, notes=None, muted=None):
        return {"uuid": uuid, "reported": reported, "parent_uuid": parent, "name": name,
                "contact_type": ctype, "active": active, "notes": notes, "muted": muted}

    def rec(uuid, reported, form, from_phone, patient_id, place_id, contact, parent, grand, source=None):
        return {"uuid": uuid, "reported": reported, "form": form, "from_phone": from_phone,
                "patient_id": patient_id, "place_id": place_id, "contact_uuid": contact,
                "parent_uuid": parent, "grandparent_uuid": grand, "source": source}

    def tele(uuid, period, app, user="carol"):
        return {"uuid": uuid, "period_start": period, "user_name": user, "app_version": app,
                "boot_time_min": "1200", "boot_time_max": "5600.5", "boot_time_count": "12",
                "doc_count_on_local_db": "1234"}

    def device(uuid, period, **cols):
        row = {"uuid": uuid, "period_start": period, "device_manufacturer": None,
               "device_model": None, "user_agent": None, "cht_android_version": None,
               "android_version": None, "storage_free": None, "storage_total": None,
               "network_up_speed": None, "network_down_speed": None}
        row.update(cols)
        return row

    def day(y, m, d):
        return dt.datetime(y, m, d, tzinfo=dt.UTC)

    tele_rows = [
        tele(T1["_id"], day(2019, 11, 1), "3.7.1"),
        tele(T2["_id"], day(2020, 11, 14), "3.10.0", "admin2"),
        tele(T3["_id"], None, "4.5.0"),
        tele(T4["_id"], day(2021, 1, 5), "3.8.0"),
        tele(T5["_id"], day(2022, 6, 2), None),
        tele(T6["_id"], day(2019, 12, 31), "v3.7.0-rc.1"),
        tele(T7["_id"], None, "3.17.1"),
        tele(T8["_id"], day(2021, 5, 17), "4.5.0"),
        tele(T9["_id"], None, "4.5.0"),
    ]
    device_rows = [device(r["uuid"], r["period_start"]) for r in tele_rows]
    device_rows[0].update(device_manufacturer="TECNO", device_model="TECNO KB7",
                          user_agent=ANDROID["userAgent"], cht_android_version="v0.4.24-webview",
                          android_version="8.1.0", storage_free="1073741824",
                          storage_total="16000000000", network_up_speed="5000",
                          network_down_speed="20000")
    device_rows[1].update(user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/119.0")

    return {
        "document_metadata": [
            *(meta(d["_id"], d.get("type")) for d in MEDIC_DOCS if d is not GHOST),
            meta("org.couchdb.user:carol", "user", "_users"),
            *(meta(d["_id"], d["type"], "medic-users-meta") for d in [FB1, FB2, *TELEMETRY]),
        ],
        "contact": [
            contact("dh1", ts(T), None, "Kisumu District Hospital", D, "true",
                    "Main referral hospital"),
            contact("hc1", ts(T + 60), "dh1", "Kondele Health Centre", H),
            contact("cl1", ts(T + 120), "hc1", "Manyatta Clinic", "clinic", notes=""),
            contact("p1", None, "cl1", "Alice Atieno", "person"),
            contact("p2", None, "cl1", "Bob Otieno", "person"),
            contact("chw1", ts(T + 0.123), "hc1", "Carol Wanjiru", "chw", "false",
                    muted="2023-11-20T08:00:00.000Z"),
            contact("vil1", None, "hc1", "Nyalenda Village", "village"),
            contact("orphan", None, "missing-clinic", "Orphan Person", "person"),
            contact("stray", ts(T), None, "Stray Parent", "person"),
        ],
        "contact_type": [
            {"id": D, "person": False, "configured": True},
            {"id": H, "person": False, "configured": True},
            {"id": "clinic", "person": False, "configured": True},
            {"id": "person", "person": True, "configured": True},
            {"id": "chw", "person": True, "configured": True},
            {"id": "catchment", "person": False, "configured": True},
            {"id": "village", "person": False, "configured": False},
        ],
        "person": [
            {"uuid": "p1", "sex": "female", "phone": "+254700000001", "phone2": "+254700000011",
             "patient_id": "12345"},
            {"uuid": "p2", "sex": "male", "phone": "+254700000002", "phone2": None,
             "patient_id": None},
            {"uuid": "chw1", "sex": "female", "phone": "+254711111111", "phone2": None,
             "patient_id": None},
            {"uuid": "orphan", "sex": "female", "phone": None, "phone2": None,
             "patient_id": "99999"},
            {"uuid": "stray", "sex": None, "phone": None, "phone2": None, "patient_id": None},
        ],
        "place": [
            {"uuid": "dh1", "contact_id": None, "place_id": "P-DH1"},
            {"uuid": "hc1", "contact_id": "chw1", "place_id": "P-HC1"},
            {"uuid": "cl1", "contact_id": None, "place_id": None},
            {"uuid": "vil1", "contact_id": "chw1", "place_id": "V-001"},
        ],
        "patient": [
            {"uuid": "p1", "patient_id": "12345"},
            {"uuid": "orphan", "patient_id": "99999"},
        ],
        "data_record": [
            rec("r1", ts(T + 3600), "pregnancy", "+254711111111", "12345", None, "chw1", "hc1",
                "dh1", "task"),
            rec("r2", ts(1700050000), "pregnancy", None, "p1", None, "chw1", "hc1", None),
            rec("r3", ts(1700100000), "assessment", "+254700000001", "12345", "P-CL1", "p1",
                "cl1", "hc1"),
            rec("r4", None, "assessment", None, None, "P-HC1", None, None, None),
            rec("r5", ts(1700100000), None, "+254799999999", None, None, None, None, None),
            rec("r6", ts(1700103600), "assessment", None, "p2", None, "chw1", "hc1", "dh1"),
            # the first non-null patient id wins, even an empty one (as in CHT Pipeline)
            rec("r7", ts(1700200000), "pregnancy_home_visit", None, "", None, "chw1", "hc1",
                "dh1"),
        ],
        "user": [
            {"user_id": "org.couchdb.user:carol", "contact_uuid": "chw1", "language": "sw",
             "roles": '["chw"]'},
            {"user_id": "org.couchdb.user:admin2", "contact_uuid": "dh1", "language": "en",
             "roles": '["program_officer", "data_entry"]'},
        ],
        "feedback": [
            {"uuid": FB1["_id"], "source": "automatic", "url": "https://cht.example.org/#/reports",
             "user_name": "carol", "period_start": "2023-11-15T10:00:00.000Z",
             "cause": "TypeError at reports.js:12",
             "message": "Cannot read properties of undefined"},
            {"uuid": FB2["_id"], "source": "manual", "url": "https://cht.example.org/#/messages",
             "user_name": "admin2", "period_start": "2023-11-16T09:30:00.000Z",
             "cause": '{"message": "The app is slow"}', "message": "The app is slow"},
        ],
        "telemetry": tele_rows,
        "telemetry_devices": device_rows,
        "reports_by_form_daily": [
            {"form": "pregnancy", "day": dt.date(2023, 11, 15), "count": 2},
            {"form": "assessment", "day": dt.date(2023, 11, 16), "count": 2},
            {"form": "pregnancy_home_visit", "day": dt.date(2023, 11, 17), "count": 1},
        ],
        "contact_hierarchy": [
            hier("dh1", "Kisumu District Hospital", D, [], DIST, None),
            hier("hc1", "Kondele Health Centre", H, [DH], DIST, FAC),
            hier("cl1", "Manyatta Clinic", "clinic", [HC, DH], DIST, FAC),
            hier("p1", "Alice Atieno", "person", [CL, HC, DH], DIST, FAC),
            hier("p2", "Bob Otieno", "person", [CL, HC, DH], DIST, FAC),
            hier("chw1", "Carol Wanjiru", "chw", [HC, DH], DIST, FAC),
            hier("vil1", "Nyalenda Village", "village", [HC, DH], DIST, FAC),
            hier("orphan", "Orphan Person", "person", [("missing-clinic", None, None)], None,
                 None),
            hier("stray", "Stray Parent", "person", [], None, None),
        ],
    }


# --- building, refreshing, comparing ---------------------------------------------------------


class Pipeline:
    """The models of sql/models.yaml in the test database, built and refreshed by the chtsync
    pipeline engine (apply, then refresh_once with force: intervals ignored)."""

    def __init__(self, dbname: str) -> None:
        self.cfg = make_config(dbname, CHTSYNC_MODELS=str(MODELS_YAML))
        self.conn = db.connect(self.cfg, autocommit=True)

    def apply(self) -> None:
        engine.apply(self.cfg, self.conn)

    def refresh(self) -> dict[str, Any]:
        """Refresh every model; return the engine's result per model."""
        results = engine.refresh_once(self.cfg, self.conn, force=True)
        bad = [(r.name, r.status, r.error) for r in results if r.status not in ("ok", "skipped")]
        assert bad == []
        return {r.name: r for r in results}

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def feed(pg: psycopg.Connection) -> Feed:
    return Feed(pg)


@pytest.fixture
def pipeline(dbname: str, pg: psycopg.Connection) -> Iterator[Pipeline]:
    p = Pipeline(dbname)
    yield p
    p.close()


def columns(pg: psycopg.Connection, name: str) -> list[tuple[str, str]]:
    """Columns of any relation (pg_attribute: information_schema omits materialized views)."""
    return [(r[0], r[1]) for r in pg.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = format('v1.%%I', %s::text)::regclass AND attnum > 0"
        " AND NOT attisdropped ORDER BY attnum", (name,))]


def rows(pg: psycopg.Connection, name: str) -> list[dict[str, Any]]:
    cur = pg.cursor(row_factory=psycopg.rows.dict_row)
    return list(cur.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(name))))


def saved_timestamps(pg: psycopg.Connection) -> dict[tuple[str, str], dt.datetime]:
    return {(r[0], r[1]): r[2] for r in pg.execute(
        "SELECT _id, source, saved_timestamp FROM couchdb WHERE NOT _deleted")}


def sort_key(row: dict[str, Any]) -> tuple:
    return tuple((v is None, str(v)) for v in row.values())


def assert_model(pg: psycopg.Connection, name: str, expected: list[dict[str, Any]]) -> None:
    """Every row and column of one model equals the hand-written rows; saved_timestamp must be
    the raw row's (it is not written by hand: ingest sets it)."""
    assert columns(pg, name) == CONTRACT[name], name
    saved = saved_timestamps(pg)
    actual = rows(pg, name)
    for row in actual:
        if "saved_timestamp" in row:
            stamp = row.pop("saved_timestamp")
            key = row.get("uuid") or row.get("user_id")
            if name == "document_metadata":
                want = saved[(key, f"{row['instance']}/{row['dbname']}")]
            else:
                source = META if name.startswith(("feedback", "telemetry")) else MEDIC
                want = saved[(key, source)]
            assert stamp == want, (name, key)
    exp = [{k: v for k, v in r.items() if k != "saved_timestamp"} for r in expected]
    for r in exp:
        assert list(r) == [c for c, _t in CONTRACT[name] if c != "saved_timestamp"], (name, r)
    missing = [r for r in exp if r not in actual]
    extra = [r for r in actual if r not in exp]
    assert (missing, extra) == ([], []), name
    assert len(actual) == len(exp), name  # no duplicates either


def assert_matches_rebuild(pg: psycopg.Connection) -> None:
    """Every incremental or aggregate table equals a full recomputation of its SQL (no stale rows)."""
    for m in load_models():
        if m["kind"] not in ("incremental", "aggregate"):
            continue
        name = sql.Identifier(m["name"])
        body = sql.SQL(model_sql(m))  # type: ignore[arg-type]
        diff = pg.execute(sql.SQL(
            "SELECT count(*) FROM ((TABLE {} EXCEPT ALL ({})) UNION ALL (({}) EXCEPT ALL TABLE {}))"
            " AS d").format(name, body, body, name)).fetchone()
        assert diff == (0,), m["name"]


def assert_all(pg: psycopg.Connection, expected: dict[str, list[dict[str, Any]]]) -> None:
    for name, want in expected.items():
        assert_model(pg, name, want)
    # contact_detail mirrors contact's row set; person and place split it exactly
    contact_ids = sorted(r["uuid"] for r in expected["contact"])
    assert sorted(r[0] for r in pg.execute("SELECT uuid FROM contact_detail")) == contact_ids
    split = sorted(r["uuid"] for r in expected["person"] + expected["place"])
    assert split == contact_ids
    # ... by the same rule as contact_type.person
    disagree = pg.execute(
        "SELECT c.uuid FROM contact c JOIN contact_type t ON t.id = c.contact_type"
        " WHERE t.person <> EXISTS (SELECT 1 FROM person p WHERE p.uuid = c.uuid)").fetchall()
    assert disagree == []
    assert_matches_rebuild(pg)


def by_key(rows_: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in rows_}


# --- tests -----------------------------------------------------------------------------------


def relations(node: Any, refs: set | None = None, ctes: set | None = None) -> tuple[set, set]:
    """Relation names a parse tree reads, and the CTE names it defines."""
    refs = set() if refs is None else refs
    ctes = set() if ctes is None else ctes
    if isinstance(node, dict):
        if "RangeVar" in node:
            refs.add(node["RangeVar"]["relname"])
        if "CommonTableExpr" in node:
            ctes.add(node["CommonTableExpr"]["ctename"])
        for v in node.values():
            relations(v, refs, ctes)
    elif isinstance(node, list):
        for v in node:
            relations(v, refs, ctes)
    return refs, ctes


def test_models_file_is_consistent() -> None:
    """One SQL file per model, no trailing semicolon, declared dependencies = the SQL's own
    references (as pglast finds them), and incremental keys are the first column."""
    import pglast.parser

    models = load_models()
    names = {m["name"] for m in models}
    assert set(CONTRACT) == names
    for m in models:
        text = model_sql(m).strip()
        assert not text.endswith(";"), m["name"]
        tree = json.loads(pglast.parser.parse_sql_json(text))
        assert len(tree["stmts"]) == 1 and "SelectStmt" in tree["stmts"][0]["stmt"], m["name"]
        refs, ctes = relations(tree)
        refs -= ctes
        assert refs == set(m.get("depends_on", [])), m["name"]
        assert refs <= names | {"couchdb"}, m["name"]
        if m["kind"] == "incremental":
            assert m["unique_key"][0] == CONTRACT[m["name"]][0][0], m["name"]
            assert {"columns": [m["unique_key"][0]], "method": "hash"} in m["indexes"], m["name"]


def test_models_documented() -> None:
    """docs/models.md describes every model and every column."""
    text = (ROOT / "docs" / "models.md").read_text()
    sections = re.split(r"^### ", text, flags=re.M)
    for name, cols in CONTRACT.items():
        section = next((s for s in sections if s.startswith(f"`{name}`")), None)
        assert section is not None, name
        for col, _type in cols:
            assert f"`{col}`" in section, (name, col)


def test_models_initial_build_and_changes(pg: psycopg.Connection, feed: Feed,
                                          pipeline: Pipeline) -> None:
    load_all(feed)
    pipeline.apply()
    pipeline.refresh()
    expected = expected_initial()
    assert_all(pg, expected)

    # --- edits, deletions, type changes, and a settings change that reclassifies contacts
    p1 = {**P1, "name": "Alice A. Otieno", "phone": "+254700000099"}
    del p1["patient_id"]
    orphan = {**ORPHAN, "type": "clinic", "name": "Orphan Clinic"}  # person -> place
    r3 = {**R3, "type": "data_record_void"}  # leaves data_record, stays a document
    settings = copy.deepcopy(SETTINGS)
    types = settings["settings"]["contact_types"]
    types[:] = [t for t in types if not (isinstance(t, dict) and t.get("id") in
                                         ("chw", "catchment"))]
    types.append(contact_type_entry("village", ["health_center"], person=True))
    t1 = copy.deepcopy(T1)
    t1["metadata"]["month"] = "x"
    del t1["device"]
    carol = {**U_CAROL, "language": "fr"}
    r8 = report("r8", "delivery", 1700300000 * MS, lineage("chw1", "hc1", "dh1"),
                {"patient_uuid": "p1", "delivery_date": "2023-11-18"})
    hc2 = {"_id": "hc2", "type": "health_center", "name": "Migosi Health Centre",
           "parent": lineage("dh1"), "reported_date": (T + 7200) * MS}
    p3 = {"_id": "p3", "type": "person", "name": "Dan Ouma", "parent": lineage("hc2", "dh1"),
          "sex": "male", "patient_id": "55555", "reported_date": (T + 7300) * MS}
    feed.put([p1, orphan, r3, settings, carol, r8, hc2, p3])
    feed.delete(["p2", "r6", "org.couchdb.user:admin2"])
    feed.put([t1], source=META)
    feed.delete([FB2["_id"]], source=META)
    results = pipeline.refresh()
    # incremental tables re-derived only the documents written since the last refresh
    assert results["contact"].changed == 13 and results["telemetry"].changed == 13

    exp = copy.deepcopy(expected)
    md = [r for r in exp["document_metadata"]
          if r["uuid"] not in ("p2", "r6", "org.couchdb.user:admin2", FB2["_id"])]
    for r in md:
        if r["uuid"] == "orphan":
            r["doc_type"] = "clinic"
        if r["uuid"] == "r3":
            r["doc_type"] = "data_record_void"
    md += [{"uuid": u, "_deleted": False, "doc_type": t, "instance": "localhost",
            "dbname": "medic"} for u, t in [("r8", "data_record"), ("hc2", H), ("p3", "person")]]
    exp["document_metadata"] = md

    contacts = by_key(exp["contact"], "uuid")
    del contacts["p2"]
    contacts["p1"]["name"] = "Alice A. Otieno"
    contacts["orphan"].update(name="Orphan Clinic", contact_type="clinic")
    contacts["hc2"] = {"uuid": "hc2", "reported": ts(T + 7200), "parent_uuid": "dh1",
                       "name": "Migosi Health Centre", "contact_type": H, "active": None,
                       "notes": None, "muted": None}
    contacts["p3"] = {"uuid": "p3", "reported": ts(T + 7300), "parent_uuid": "hc2",
                      "name": "Dan Ouma", "contact_type": "person", "active": None,
                      "notes": None, "muted": None}
    exp["contact"] = list(contacts.values())

    exp["contact_type"] = [
        {"id": D, "person": False, "configured": True},
        {"id": H, "person": False, "configured": True},
        {"id": "clinic", "person": False, "configured": True},
        {"id": "person", "person": True, "configured": True},
        {"id": "village", "person": True, "configured": True},
        {"id": "chw", "person": False, "configured": False},  # still used, no longer configured
    ]
    exp["person"] = [
        {"uuid": "p1", "sex": "female", "phone": "+254700000099", "phone2": "+254700000011",
         "patient_id": None},
        {"uuid": "stray", "sex": None, "phone": None, "phone2": None, "patient_id": None},
        # vil1's document did not change: the settings change alone made it a person
        {"uuid": "vil1", "sex": None, "phone": None, "phone2": None, "patient_id": None},
        {"uuid": "p3", "sex": "male", "phone": None, "phone2": None, "patient_id": "55555"},
    ]
    exp["place"] = [
        {"uuid": "dh1", "contact_id": None, "place_id": "P-DH1"},
        {"uuid": "hc1", "contact_id": "chw1", "place_id": "P-HC1"},
        {"uuid": "cl1", "contact_id": None, "place_id": None},
        {"uuid": "chw1", "contact_id": None, "place_id": None},  # chw is no longer a person type
        {"uuid": "orphan", "contact_id": None, "place_id": None},
        {"uuid": "hc2", "contact_id": None, "place_id": None},
    ]
    exp["patient"] = [{"uuid": "p3", "patient_id": "55555"}]

    records = by_key(exp["data_record"], "uuid")
    del records["r6"], records["r3"]
    records["r8"] = {"uuid": "r8", "reported": ts(1700300000), "form": "delivery",
                     "from_phone": None, "patient_id": "p1", "place_id": None,
                     "contact_uuid": "chw1", "parent_uuid": "hc1", "grandparent_uuid": "dh1",
                     "source": None}
    exp["data_record"] = list(records.values())

    exp["user"] = [{"user_id": "org.couchdb.user:carol", "contact_uuid": "chw1",
                    "language": "fr", "roles": '["chw"]'}]
    exp["feedback"] = [r for r in exp["feedback"] if r["uuid"] != FB2["_id"]]
    exp["telemetry"][0]["period_start"] = None
    exp["telemetry_devices"][0] = {k: (v if k == "uuid" else None)
                                   for k, v in exp["telemetry_devices"][0].items()}
    exp["reports_by_form_daily"] = [
        {"form": "pregnancy", "day": dt.date(2023, 11, 15), "count": 2},
        {"form": "pregnancy_home_visit", "day": dt.date(2023, 11, 17), "count": 1},
        {"form": "delivery", "day": dt.date(2023, 11, 18), "count": 1},
    ]
    hc2_ = ("hc2", "Migosi Health Centre", H)
    exp["contact_hierarchy"] = [
        hier("dh1", "Kisumu District Hospital", D, [], DIST, None),
        hier("hc1", "Kondele Health Centre", H, [DH], DIST, FAC),
        hier("cl1", "Manyatta Clinic", "clinic", [HC, DH], DIST, FAC),
        hier("p1", "Alice A. Otieno", "person", [CL, HC, DH], DIST, FAC),
        hier("chw1", "Carol Wanjiru", "chw", [HC, DH], DIST, FAC),
        hier("vil1", "Nyalenda Village", "village", [HC, DH], DIST, FAC),
        hier("orphan", "Orphan Clinic", "clinic", [("missing-clinic", None, None)], None, None),
        hier("stray", "Stray Parent", "person", [], None, None),
        hier("hc2", "Migosi Health Centre", H, [DH], DIST, ("hc2", "Migosi Health Centre")),
        hier("p3", "Dan Ouma", "person", [hc2_, DH], DIST, ("hc2", "Migosi Health Centre")),
    ]
    assert_all(pg, exp)

    # --- the settings document disappears: nothing fails, only used types remain
    feed.delete(["settings"])
    pipeline.refresh()
    exp["document_metadata"] = [r for r in exp["document_metadata"] if r["uuid"] != "settings"]
    used = sorted({r["contact_type"] for r in exp["contact"]})
    exp["contact_type"] = [{"id": t, "person": t == "person", "configured": False} for t in used]
    people = by_key(exp["person"], "uuid")
    del people["vil1"]
    exp["person"] = list(people.values())
    exp["place"].append({"uuid": "vil1", "contact_id": "chw1", "place_id": "V-001"})
    assert_all(pg, exp)


def test_models_without_settings_or_documents(pg: psycopg.Connection, feed: Feed,
                                              pipeline: Pipeline) -> None:
    """An empty database builds every model; contacts without a settings document are split
    by the built-in rule (only 'person' is a person type)."""
    pipeline.apply()
    pipeline.refresh()
    for name in CONTRACT:
        assert rows(pg, name) == [], name
    feed.put([DH1, CHW1, P1])
    pipeline.refresh()
    assert sorted(r[0] for r in pg.execute("SELECT uuid FROM person")) == ["p1"]
    assert sorted(r[0] for r in pg.execute("SELECT uuid FROM place")) == ["chw1", "dh1"]
    assert sorted(pg.execute("SELECT id, person, configured FROM contact_type")) == [
        ("chw", False, False), (D, False, False), ("person", True, False)]


def test_switching_user_queries(pg: psycopg.Connection, feed: Feed,
                                pipeline: Pipeline) -> None:
    """Queries written against CHT Pipeline 2.0 run unchanged, with the same column types."""
    load_all(feed)
    pipeline.apply()
    pipeline.refresh()
    got = pg.execute("SELECT uuid, name, contact_type, parent_uuid FROM v1.contact"
                     " WHERE uuid = 'p1'").fetchall()
    assert got == [("p1", "Alice Atieno", "person", "cl1")]
    types = dict(pg.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = 'v1' AND table_name = 'contact'"))
    assert {c: types[c] for c in ("uuid", "name", "contact_type", "parent_uuid")} == {
        "uuid": VARCHAR, "name": TEXT, "contact_type": TEXT, "parent_uuid": TEXT}
    # a few more of the queries dashboards are built on
    assert pg.execute(
        "SELECT count(*) FROM v1.data_record dr JOIN v1.patient p ON p.patient_id = dr.patient_id"
        " WHERE dr.form = 'pregnancy'").fetchone() == (1,)
    assert pg.execute(
        "SELECT p.uuid FROM v1.person p JOIN v1.contact c USING (uuid)"
        " JOIN v1.contact_type t ON t.id = c.contact_type WHERE t.person AND c.parent_uuid = 'hc1'"
    ).fetchall() == [("chw1",)]
    assert pg.execute(
        'SELECT u.user_id, c.name FROM v1."user" u JOIN v1.contact c ON c.uuid = u.contact_uuid'
        " ORDER BY 1").fetchall() == [("org.couchdb.user:admin2", "Kisumu District Hospital"),
                                      ("org.couchdb.user:carol", "Carol Wanjiru")]
    assert pg.execute(
        "SELECT date_trunc('month', period_start)::date, count(*) FROM v1.telemetry"
        " WHERE period_start IS NOT NULL GROUP BY 1 ORDER BY 1 LIMIT 1").fetchone() == (
        dt.date(2019, 11, 1), 1)


def test_models_through_the_sync_engine(couch, cfg_factory, pg: psycopg.Connection,
                                        pipeline: Pipeline) -> None:
    """The same documents written to CouchDB (pouchdb-server) and synced by chtsync's own
    followers give the same model rows as the ingest-level test."""
    from tests.syncutil import sync_once

    for name in ("medic", "medic-users-meta"):
        couch.create_db(name)
    couch.bulk("medic", copy.deepcopy(MEDIC_DOCS))
    couch.delete("medic", "ghost")
    couch.bulk("medic-users-meta", copy.deepcopy([FB1, FB2, *TELEMETRY]))
    cfg = cfg_factory("medic,medic-users-meta", CHTSYNC_INSTANCE="localhost")
    sync_once(cfg)
    pipeline.apply()
    pipeline.refresh()
    expected = expected_initial()
    expected["document_metadata"] = [r for r in expected["document_metadata"]
                                     if r["dbname"] != "_users"]
    assert_all(pg, expected)

    # an edit and a deletion in CouchDB reach the models on the next sync and refresh
    p1 = couch.get("medic", "p1")
    couch.put("medic", {**p1, "name": "Alice A. Otieno"})
    couch.delete("medic", "r6")
    sync_once(cfg)
    pipeline.refresh()
    assert pg.execute("SELECT name FROM contact_hierarchy WHERE uuid = 'p1'").fetchone() == (
        "Alice A. Otieno",)
    assert pg.execute("SELECT count(*) FROM data_record WHERE uuid = 'r6'").fetchone() == (0,)
    assert pg.execute("SELECT count FROM reports_by_form_daily WHERE form = 'assessment'"
                      ).fetchone() == (1,)
    assert_matches_rebuild(pg)
