"""Realistic CHT sample data: a deterministic generator, a CouchDB loader and a live trickle.

`generate(n, seed)` yields exactly n `(db, doc)` pairs for the three databases chtsync follows
(`medic`, `medic-users-meta`, `_users`), shaped like the documents a CHT 3.x/4.x instance holds:
the settings document, a place hierarchy, persons, health workers and their users, reports of
several forms, feedback and telemetry, with some messy values and a counted few bad documents.
The same (n, seed, end_ms) always gives byte-identical output. `expected_counts` tells what the
base models must hold after a sync, so tests and the demo can check the whole pipeline.

Speed matters (1M documents for benchmarks): everything random is drawn from precomputed pools
and nested parent chains are built once and shared between documents, so treat yielded
documents as read-only (serialize or copy them before changing anything).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

MEDIC, USERS_META, USERS = "medic", "medic-users-meta", "_users"
DBS = (MEDIC, USERS_META, USERS)
MIN_DOCS = 100
DAY_MS = 86_400_000
SPAN_MS = 730 * DAY_MS  # reports spread over the two years before end_ms
DEFAULT_END_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed so a seed alone fixes the output

CONTACT_TYPES: list[dict[str, Any]] = [
    {
        "id": "district_hospital",
        "name_key": "contact.type.district_hospital",
        "group_key": "contact.type.district_hospital.plural",
        "create_key": "contact.type.district_hospital.new",
        "edit_key": "contact.type.place.edit",
        "icon": "medic-district-hospital",
        "create_form": "form:contact:district_hospital:create",
        "edit_form": "form:contact:district_hospital:edit",
    },
    {
        "id": "health_center",
        "name_key": "contact.type.health_center",
        "group_key": "contact.type.health_center.plural",
        "create_key": "contact.type.health_center.new",
        "edit_key": "contact.type.place.edit",
        "parents": ["district_hospital"],
        "icon": "medic-health-center",
        "create_form": "form:contact:health_center:create",
        "edit_form": "form:contact:health_center:edit",
    },
    {
        "id": "clinic",
        "name_key": "contact.type.clinic",
        "group_key": "contact.type.clinic.plural",
        "create_key": "contact.type.clinic.new",
        "edit_key": "contact.type.place.edit",
        "parents": ["health_center"],
        "icon": "medic-clinic",
        "count_visits": True,
        "create_form": "form:contact:clinic:create",
        "edit_form": "form:contact:clinic:edit",
    },
    {
        "id": "person",
        "name_key": "contact.type.person",
        "group_key": "contact.type.person.plural",
        "create_key": "contact.type.person.new",
        "edit_key": "contact.type.person.edit",
        "primary_contact_key": "clinic.field.contact",
        "parents": ["district_hospital", "health_center", "clinic"],
        "icon": "medic-person",
        "create_form": "form:contact:person:create",
        "edit_form": "form:contact:person:edit",
        "person": True,
    },
    # Custom types, as configurable hierarchies (CHT >= 3.7) add them: `type: contact`.
    {
        "id": "chw_area",
        "name_key": "contact.type.chw_area",
        "group_key": "contact.type.chw_area.plural",
        "create_key": "contact.type.chw_area.new",
        "edit_key": "contact.type.place.edit",
        "parents": ["health_center"],
        "icon": "medic-chw-area",
        "person": False,
        "create_form": "form:contact:chw_area:create",
    },
    {
        "id": "chw",
        "name_key": "contact.type.chw",
        "group_key": "contact.type.chw.plural",
        "create_key": "contact.type.chw.new",
        "edit_key": "contact.type.person.edit",
        "parents": ["chw_area"],
        "icon": "medic-chw",
        "person": True,
        "create_form": "form:contact:chw:create",
    },
]

# Name pools: data tables, kept dense.
# fmt: off
FEMALE = ("Amina", "Grace", "Fatuma", "Mary", "Aisha", "Esther", "Wanjiru", "Achieng", "Halima",
    "Joyce", "Nafula", "Priya", "Sita", "Anjali", "Mercy", "Faith", "Zawadi", "Neema", "Rehema",
    "Asha", "Lucy", "Ruth", "Jane", "Agnes", "Sarah", "Rose", "Beatrice", "Lilian")
MALE = ("John", "Peter", "Juma", "Otieno", "Baraka", "Daniel", "Joseph", "Musa", "Hassan",
    "Kamau", "Brian", "Kevin", "Samuel", "Ravi", "Arjun", "David", "James", "Moses", "Isaac",
    "Paul", "Omondi", "Kiprono", "Ali", "Yusuf", "George", "Francis", "Patrick", "Simon")
LAST = ("Mwangi", "Otieno", "Wanjiku", "Kamau", "Odhiambo", "Njoroge", "Mutua", "Kiptoo",
    "Achieng", "Hassan", "Omar", "Sharma", "Thapa", "Gurung", "Banda", "Phiri", "Mensah",
    "Okafor", "Nkosi", "Mbeki", "Kariuki", "Chebet", "Wafula", "Nyambura", "Said", "Abdi")
PLACES = ("Kisumu", "Siaya", "Bungoma", "Kakamega", "Busia", "Migori", "Homa Bay", "Vihiga",
    "Nyando", "Rongo", "Ugunja", "Butere", "Mumias", "Malava", "Lugari", "Likuyani", "Webuye",
    "Kimilili", "Sirisia", "Kabuchai", "Teso", "Nambale", "Matayos", "Funyula")
# fmt: on
LANGS = ("en", "en", "en", "fr", "sw", "ne", "es")
# Form weights out of 100, roughly as a maternal and child health deployment reports them.
FORM_WEIGHTS = {
    "assessment": 24,
    "household_survey": 18,
    "pregnancy_home_visit": 16,
    "immunization_visit": 16,
    "pnc_visit": 12,
    "delivery": 10,
    "death_report": 4,
}
FORMS = tuple(FORM_WEIGHTS)
FORM_TABLE = tuple(f for f, w in FORM_WEIGHTS.items() for _ in range(w))
# Telemetry from CHT before 3.8.0 counts months from zero; the models must add one.
APP_VERSIONS = ("3.6.1", "3.7.0", "3.7.3", "3.8.0", "3.9.1", "3.17.0", "4.1.1", "4.5.2", "4.10.0")
OLD_VERSIONS = frozenset(v for v in APP_VERSIONS if tuple(map(int, v.split("."))) < (3, 8, 0))
DEVICES = (
    ("samsung", "SM-A105F", "exynos7884"),
    ("TECNO", "TECNO KE5", "mt6761"),
    ("Xiaomi", "Redmi 9A", "mt6762"),
    ("HUAWEI", "Y6 Prime 2019", "mt6761"),
    ("Nokia", "Nokia 2.3", "mt6761"),
    ("itel", "itel A56", "sc9832e"),
)
ANDROID = (("8.1.0", 27), ("9", 28), ("10", 29), ("11", 30), ("12", 31), ("13", 33))
ERRORS = (
    "Cannot read properties of undefined (reading 'contact')",
    "Failed to fetch",
    "QuotaExceededError: The quota has been exceeded.",
    "Server error: 502 Bad Gateway",
    "TypeError: e.parent is null",
    "Form could not be loaded: undefined",
    "Timed out replicating to server",
)
MANUAL = (
    "The app was slow when opening the household list",
    "I cannot find the delivery form for my client",
    "Task for PNC visit did not clear after submitting",
    "Sync keeps failing in the afternoon when the network is weak",
)
URLS = (
    "https://cht.example.org/#/reports",
    "https://cht.example.org/#/contacts",
    "https://cht.example.org/#/tasks",
    "https://cht.example.org/#/analytics",
)
YES_NO = ("yes", "no", "no", "no")
INPUT_META = '{"location":{"lat":"","long":"","error":"","message":""},"deprecatedID":""}'
CAUSES = ("network", "replication", "enketo", "app")

# Compact and ASCII-only: a lone surrogate stays a valid `\udxxx` escape on its way to CouchDB.
dumps: Callable[[Any], str] = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


@dataclass
class SampleCounts:
    """What a sample holds, per kind; `models` is what every base model must hold after a sync."""

    docs: int = 0
    by_db: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)  # settings, clinic, person, ... per type
    forms: Counter[str] = field(default_factory=Counter)  # stored reports per form
    messy: Counter[str] = field(default_factory=Counter)  # odd values the models must survive
    persons: int = 0
    places: int = 0
    patients: int = 0
    reports: int = 0  # stored reports (refused ones excluded)
    nul: int = 0  # documents holding a NUL character: stored with it stripped
    refused: int = 0  # documents Postgres cannot store (lone UTF-16 surrogate): one error row each

    @property
    def models(self) -> dict[str, int]:
        return {
            "document_metadata": self.docs - self.refused,
            "contact": self.persons + self.places,
            "contact_detail": self.persons + self.places,
            "contact_type": len(CONTACT_TYPES),
            "person": self.persons,
            "place": self.places,
            "patient": self.patients,
            "data_record": self.reports,
            "user": self.kinds["user-settings"],
            "feedback": self.kinds["feedback"],
            "telemetry": self.kinds["telemetry"],
            "telemetry_devices": self.kinds["telemetry"],
        }


@dataclass(frozen=True)
class _Patient:
    uuid: str
    patient_id: str | None
    name: str
    dob: str
    sex: str
    age: int
    clinic: int
    contact_json: str  # the report's fields.inputs.contact
    fields_json: str  # the report's patient_* fields


def _uuid(bits: int) -> str:
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _stat(rng: random.Random, low: float, high: float) -> dict[str, float | int]:
    """A telemetry metric aggregate like CHT's: min, max, sum, count, sumsqr."""
    count = 1 + int(rng.random() * 40)
    lo = round(low + rng.random() * (high - low) / 4, 1)
    hi = round(lo + rng.random() * (high - lo), 1)
    mean = (lo + hi) / 2
    return {
        "min": lo,
        "max": hi,
        "sum": round(mean * count, 1),
        "count": count,
        "sumsqr": round(mean * mean * count, 1),
    }


def _form_fields(form: str, rng: random.Random) -> dict[str, Any]:
    """The form-specific part of a report's `fields` (several variants per form are pooled)."""
    yn = YES_NO
    r = rng.random
    if form == "assessment":
        temp = round(36.0 + r() * 4, 1)
        return {
            "group_fever": {
                "patient_fever": "yes" if temp > 37.5 else "no",
                "patient_temperature": str(temp),
                "fever_duration": str(1 + int(r() * 7)),
                "mrdt_result": rng.choice(("positive", "negative", "not_done")),
            },
            "group_cough": {
                "patient_coughs": yn[int(r() * 4)],
                "coughing_duration": str(int(r() * 21)),
                "chest_indrawing": yn[int(r() * 4)],
                "breath_count": str(20 + int(r() * 40)),
            },
            "danger_signs": {
                "convulsions": "no",
                "unable_to_drink": yn[int(r() * 4)],
                "lethargic": "no",
                "vomits_everything": yn[int(r() * 4)],
            },
            "treatment": {
                "ors_given": yn[int(r() * 4)],
                "zinc_given": yn[int(r() * 4)],
                "act_given": yn[int(r() * 4)],
                "referral_follow_up": "true",
            },
        }
    if form == "pregnancy_home_visit":
        weeks = 4 + int(r() * 36)
        return {
            "pregnancy_summary": {
                "visit_option": "yes",
                "weeks_since_lmp": str(weeks),
                "edd_8601": f"2025-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}",
                "current_edd": "",
                "anc_visits_hf_past": str(int(r() * 5)),
            },
            "danger_signs": {
                "vaginal_bleeding": yn[int(r() * 4)],
                "fits": "no",
                "severe_abdominal_pain": "no",
                "severe_headache": yn[int(r() * 4)],
                "very_pale": "no",
                "fever": yn[int(r() * 4)],
                "reduced_or_no_fetal_movements": "no",
                "breaking_water": "no",
                "easily_tired": yn[int(r() * 4)],
                "face_hand_swelling": "no",
                "breathlessness": "no",
            },
        }
    if form == "delivery":
        alive = 1 if r() > 0.03 else 0
        return {
            "delivery_outcome": {
                "babies_delivered": "1",
                "babies_alive": str(alive),
                "delivery_date": f"2025-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}",
                "delivery_place": rng.choice(("health_facility", "health_facility", "home")),
                "delivery_mode": rng.choice(("vaginal", "vaginal", "cesarean")),
            },
            "condition": {"woman_outcome": "alive_well"},
            "babys_condition": {
                "baby_repeat": [
                    {
                        "baby_details": {
                            "baby_condition": "alive_well" if alive else "deceased",
                            "baby_name": "Baby",
                            "baby_sex": rng.choice(("female", "male")),
                            "birth_weight_know": "yes",
                            "birth_weight": str(2200 + int(r() * 1800)),
                            "breastfeeding": "yes",
                        }
                    }
                ]
            },
        }
    if form == "pnc_visit":
        return {
            "pnc_danger_sign_check_mother": {
                "fever": yn[int(r() * 4)],
                "severe_headache": "no",
                "vaginal_bleeding": "no",
                "vaginal_discharge": "no",
                "convulsion": "no",
            },
            "pnc_danger_sign_check_baby": {
                "infected_umbilical_cord": "no",
                "convulsion": "no",
                "difficulty_feeding": yn[int(r() * 4)],
                "fever": "no",
                "yellow_skin": yn[int(r() * 4)],
                "breathing_fast": "no",
            },
            "visit_day": str(int(r() * 42)),
            "pnc_visit_number": str(1 + int(r() * 3)),
        }
    if form == "immunization_visit":
        given = rng.sample(
            (
                "bcg",
                "opv0",
                "opv1",
                "penta1",
                "pcv1",
                "rota1",
                "opv2",
                "penta2",
                "measles1",
                "vit_a",
            ),
            1 + int(r() * 4),
        )
        return {
            "vaccines": " ".join(given),
            "vaccines_given_count": str(len(given)),
            "group_immunization": {
                "imm_card": "yes",
                "next_visit_date": f"2025-{1 + int(r() * 12):02d}-15",
                "received_vaccines": given,
            },
            "group_growth": {
                "weight": str(round(3 + r() * 12, 1)),
                "muac_color": rng.choice(("green", "green", "yellow")),
            },
        }
    if form == "death_report":
        return {
            "death_details": {
                "date_of_death": f"2025-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}",
                "place_of_death": rng.choice(("home", "health_facility", "other")),
                "death_information": "Reported by a family member during a home visit",
            },
        }
    # household_survey: a report about a place, not a person
    return {
        "household": {
            "water_source": rng.choice(("piped", "borehole", "river", "rain")),
            "treats_water": yn[int(r() * 4)],
            "has_latrine": rng.choice(("yes", "yes", "no")),
            "uses_llin": "yes",
            "members": str(1 + int(r() * 9)),
            "children_under_5": str(int(r() * 4)),
            "hand_washing_facility": yn[int(r() * 4)],
        },
    }


class Sample:
    """A sample of n CHT documents; iterate for `(db, doc)`, then read `counts`.

    Structure sizes follow n; all ids, names and chains are drawn at construction (cheap) so
    that iteration is a tight loop and the trickle can write reports about the same people.
    """

    def __init__(self, n: int, seed: int, *, end_ms: int = DEFAULT_END_MS, bad: bool = True) -> None:
        if n < MIN_DOCS:
            raise ValueError(f"a sample needs at least {MIN_DOCS} documents, got {n}")
        self.n, self.seed, self.end_ms, self.bad = n, seed, end_ms, bad
        rng = self.rng = random.Random(seed)
        self.n_feedback = max(1, n // 200)
        self.n_telemetry = max(2, n // 60)
        self.n_clinics = max(1, n * 3 // 100)
        self.n_hcs = max(1, self.n_clinics // 8)
        self.n_dhs = max(1, self.n_hcs // 5)
        self.n_household = max(self.n_clinics, n * 14 // 100)
        n_places = self.n_dhs + 2 * self.n_hcs + self.n_clinics
        n_persons = self.n_household + self.n_hcs + self.n_dhs
        self.n_users = self.n_hcs + self.n_dhs
        self.n_reports = n - 1 - n_places - n_persons - 2 * self.n_users - self.n_feedback - self.n_telemetry
        # Report positions that carry a NUL (stored, stripped) or a lone surrogate (refused).
        n_nul = max(1, n // 10_000) if bad else 0
        n_refused = max(1, n // 50_000) if bad else 0
        special = rng.sample(range(self.n_reports), n_nul + n_refused)
        self.nul_at, self.refused_at = set(special[:n_nul]), set(special[n_nul:])
        self.counts = SampleCounts()
        bits = rng.getrandbits
        self.dh_ids = [_uuid(bits(128)) for _ in range(self.n_dhs)]
        self.hc_ids = [_uuid(bits(128)) for _ in range(self.n_hcs)]
        self.area_ids = [_uuid(bits(128)) for _ in range(self.n_hcs)]
        self.clinic_ids = [_uuid(bits(128)) for _ in range(self.n_clinics)]
        self.chw_ids = [_uuid(bits(128)) for _ in range(self.n_hcs)]
        self.sup_ids = [_uuid(bits(128)) for _ in range(self.n_dhs)]
        # Parent chains, shared by every document that points at them.
        self.hc_chain = [
            {"_id": hid, "parent": {"_id": self.dh_ids[h % self.n_dhs]}} for h, hid in enumerate(self.hc_ids)
        ]
        self.area_chain = [{"_id": aid, "parent": self.hc_chain[h]} for h, aid in enumerate(self.area_ids)]
        self.clinic_chain = [
            {"_id": cid, "parent": self.hc_chain[c % self.n_hcs]} for c, cid in enumerate(self.clinic_ids)
        ]
        self.chw_contact = [{"_id": pid, "parent": self.area_chain[h]} for h, pid in enumerate(self.chw_ids)]
        self.chw_names = [f"chw_{h + 1}" for h in range(self.n_hcs)]
        self.sup_names = [f"supervisor_{d + 1}" for d in range(self.n_dhs)]
        self.chw_phones = [self._phone() for _ in range(self.n_hcs)]
        self.place_names = [
            f"{PLACES[i % len(PLACES)]} {LAST[(i // len(PLACES)) % len(LAST)]}"
            for i in range(self.n_clinics + self.n_hcs + self.n_dhs)
        ]
        self.patients = [self._patient(j) for j in range(self.n_household)]
        # Reports are most of a sample: they are assembled as JSON text from these fragments.
        self.variant_json = {f: [dumps(_form_fields(f, rng)) for _ in range(48)] for f in FORMS}
        self.chw_contact_json = [dumps(c) for c in self.chw_contact]
        self.household_json = [
            (
                dumps({"_id": cid, "name": self.place_names[c], "parent": self.hc_chain[c % self.n_hcs]}),
                dumps({"place_id": cid, "place_name": self.place_names[c]})[1:-1],
            )
            for c, cid in enumerate(self.clinic_ids)
        ]
        self.geo_json = [
            dumps(
                {
                    "latitude": round(-1.5 + rng.random() * 2, 6),
                    "longitude": round(34 + rng.random() * 2, 6),
                    "altitude": None,
                    "accuracy": round(5 + rng.random() * 60, 1),
                    "altitudeAccuracy": None,
                    "heading": None,
                    "speed": None,
                }
            )
            for _ in range(64)
        ]
        # Iterating again starts from here, so a Sample always yields the same documents.
        self.state = rng.getstate()

    # -- pools -------------------------------------------------------------------------------

    def _phone(self) -> str:
        return f"+2547{int(self.rng.random() * 1e8):08d}"

    def _patient(self, j: int) -> _Patient:
        r = self.rng.random
        sex = "female" if r() < 0.55 else "male"
        names = FEMALE if sex == "female" else MALE
        first = names[int(r() * len(names))]
        # Many children and women of reproductive age, as in a maternal and child health program.
        age = int(r() * 5) if r() < 0.4 else 15 + int(r() * 50)
        end = dt.datetime.fromtimestamp(self.end_ms // 1000, dt.UTC).date()
        dob = end - dt.timedelta(days=age * 365 + int(r() * 365))
        # Unique 5+ digit ids, like CHT's generated patient_ids: a stride through the range.
        width = max(5, len(str(self.n_household * 10)))
        span = 9 * 10 ** (width - 1)
        patient_id = None if j % 41 == 17 else str(10 ** (width - 1) + (j * 7919) % span)
        uid, name, clinic = (
            _uuid(self.rng.getrandbits(128)),
            f"{first} {LAST[int(r() * len(LAST))]}",
            j % self.n_clinics,
        )
        contact = {
            "_id": uid,
            "name": name,
            "date_of_birth": dob.isoformat(),
            "sex": sex,
            "parent": self.clinic_chain[clinic],
        }
        fields = {"patient_uuid": uid, "patient_name": name, "patient_age_in_years": str(age), "patient_sex": sex}
        if patient_id is not None:
            fields["patient_id"] = patient_id
        return _Patient(uid, patient_id, name, dob.isoformat(), sex, age, clinic, dumps(contact), dumps(fields)[1:-1])

    def _date(self, before_ms: int = 0) -> int:
        """A reported_date (ms) in the two years before end_ms, minus `before_ms` of headroom."""
        return self.end_ms - before_ms - int(self.rng.random() * (SPAN_MS - before_ms))

    # -- documents ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        loads = json.loads
        for db, doc in self._docs():
            yield db, loads(doc) if isinstance(doc, str) else doc

    def texts(self) -> Iterator[tuple[str, str]]:
        """The same documents as compact JSON text (faster than serializing the dicts)."""
        for db, doc in self._docs():
            yield db, doc if isinstance(doc, str) else dumps(doc)

    def _docs(self) -> Iterator[tuple[str, dict[str, Any] | str]]:
        self.rng.setstate(self.state)
        counts = self.counts = SampleCounts()
        for db, kind, doc in chain(
            [(MEDIC, "settings", self.settings())],
            self.places(),
            self.persons(),
            self.users(),
            self.reports(),
            self.feedback(),
            self.telemetry(),
        ):
            counts.docs += 1
            counts.by_db[db] += 1
            counts.kinds[kind] += 1
            yield db, doc

    def settings(self) -> dict[str, Any]:
        return {
            "_id": "settings",
            "settings": {
                "locale": "en",
                "locale_outgoing": "en",
                "languages": [
                    {"locale": "en", "enabled": True},
                    {"locale": "fr", "enabled": True},
                    {"locale": "sw", "enabled": True},
                    {"locale": "ne", "enabled": True},
                ],
                "date_format": "DD-MMM-YYYY",
                "reported_date_format": "DD-MMM-YYYY HH:mm:ss",
                "contact_types": CONTACT_TYPES,
                "roles": {
                    "chw": {"name": "usertype.chw", "offline": True},
                    "chw_supervisor": {"name": "usertype.chw-supervisor", "offline": True},
                    "program_officer": {"name": "usertype.program-officer"},
                },
                "permissions": {
                    "can_access_gateway_api": ["gateway"],
                    "can_export_all": ["program_officer"],
                    "can_view_analytics": ["chw", "chw_supervisor", "program_officer"],
                },
                "transitions": {
                    "generate_patient_id_on_people": True,
                    "update_clinics": True,
                    "death_reporting": True,
                    "registration": True,
                },
                "district_admins_access_unallocated_messages": False,
                "outgoing_deny_list": "",
                "task_day_limit": 4,
            },
        }

    def places(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        sample = self
        names, n_c, n_h = self.place_names, self.n_clinics, self.n_hcs
        for d, uid in enumerate(self.dh_ids):
            yield (
                MEDIC,
                "district_hospital",
                self._place(
                    uid,
                    "district_hospital",
                    f"{names[n_c + n_h + d]} District Hospital",
                    None,
                    self.sup_ids[d],
                    f"dh{d + 1}",
                ),
            )
        for h, uid in enumerate(self.hc_ids):
            yield (
                MEDIC,
                "health_center",
                self._place(
                    uid,
                    "health_center",
                    f"{names[n_c + h]} Health Center",
                    {"_id": self.dh_ids[h % self.n_dhs]},
                    self.chw_ids[h],
                    f"hc{h + 1}",
                ),
            )
        for h, uid in enumerate(self.area_ids):
            doc = self._place(
                uid,
                "contact",
                f"{names[n_c + h]} CHW Area",
                self.hc_chain[h],
                self.chw_ids[h],
                f"area{h + 1}",
            )
            doc["contact_type"] = "chw_area"
            yield MEDIC, "chw_area", doc
        for c, uid in enumerate(self.clinic_ids):
            # The household's first member is its primary contact.
            head = sample.patients[c]
            yield (
                MEDIC,
                "clinic",
                self._place(
                    uid,
                    "clinic",
                    f"{head.name.split()[-1]} Household ({names[c].split()[0]})",
                    self.hc_chain[c % n_h],
                    head.uuid,
                    f"{10000 + c}",
                ),
            )
        self.counts.places = self.n_dhs + 2 * n_h + n_c

    def _place(
        self,
        uid: str,
        type_: str,
        name: str,
        parent: dict[str, Any] | None,
        contact: str,
        place_id: str,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"_id": uid, "type": type_, "name": name}
        if parent is not None:
            doc["parent"] = parent
        doc.update(
            {
                "contact": {"_id": contact},
                "contact_id": contact,
                "place_id": place_id,
                "reported_date": self._date(400 * DAY_MS),
                "is_name_generated": "false",
                "external_id": "",
                "notes": "",
                "geolocation": "",
                "meta": {
                    "created_by": "admin",
                    "created_by_person_uuid": "",
                    "created_by_place_uuid": "",
                },
            }
        )
        return doc

    def persons(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        counts, messy = self.counts, self.counts.messy
        for j, p in enumerate(self.patients):
            doc: dict[str, Any] = {"_id": p.uuid}
            # CHT >= 3.7 may store a person as a generic contact with a contact_type.
            if j % 10 == 0:
                doc.update(type="contact", contact_type="person")
            else:
                doc["type"] = "person"
            doc.update(
                name=p.name,
                short_name="",
                date_of_birth=p.dob,
                date_of_birth_method="",
                ephemeral_dob={"dob_calendar": p.dob, "dob_iso": p.dob, "dob_approx": p.dob},
                sex=p.sex,
                phone=self._phone() if p.age >= 15 else "",
                alternative_phone="",
                role="patient",
                external_id="",
                notes="",
            )
            if p.patient_id is not None:
                doc["patient_id"] = p.patient_id
                counts.patients += 1
            else:
                messy["person_without_patient_id"] += 1
            clinic = p.clinic
            if j % 97 == 13:
                messy["missing_parent"] += 1
            elif j % 89 == 7:
                doc["parent"] = {"_id": self.clinic_ids[clinic]}  # the chain stops short
                messy["short_parent_chain"] += 1
            else:
                doc["parent"] = self.clinic_chain[clinic]
            h = clinic % self.n_hcs
            if j % 151 == 3:
                doc["reported_date"] = ""
                messy["empty_reported_date"] += 1
            else:
                doc["reported_date"] = self._date(200 * DAY_MS)
            doc["meta"] = {
                "created_by": self.chw_names[h],
                "created_by_person_uuid": self.chw_ids[h],
                "created_by_place_uuid": self.area_ids[h],
            }
            yield MEDIC, "person", doc
        for h, uid in enumerate(self.chw_ids):
            yield (
                MEDIC,
                "chw",
                self._worker(uid, "chw", self.area_chain[h], self.chw_names[h], self.chw_phones[h]),
            )
        for d, uid in enumerate(self.sup_ids):
            yield (
                MEDIC,
                "person",
                self._worker(uid, "chw_supervisor", {"_id": self.dh_ids[d]}, self.sup_names[d], self._phone()),
            )
        counts.persons = self.n_household + self.n_hcs + self.n_dhs

    def _worker(self, uid: str, role: str, parent: dict[str, Any], username: str, phone: str) -> dict[str, Any]:
        r = self.rng.random
        sex = "female" if r() < 0.7 else "male"
        names = FEMALE if sex == "female" else MALE
        first = names[int(r() * len(names))]
        doc: dict[str, Any] = {"_id": uid}
        # CHWs use the custom person type; supervisors are plain persons.
        if role == "chw":
            doc.update(type="contact", contact_type="chw")
        else:
            doc["type"] = "person"
        doc.update(
            name=f"{first} {LAST[int(r() * len(LAST))]}",
            sex=sex,
            phone=phone,
            date_of_birth=f"{1970 + int(r() * 30)}-{1 + int(r() * 12):02d}-{1 + int(r() * 28):02d}",
            role=role,
            username=username,
            parent=parent,
            reported_date=self._date(500 * DAY_MS),
            meta={"created_by": "admin"},
        )
        return doc

    def users(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        workers = [(self.chw_names[h], self.area_ids[h], self.chw_ids[h], "chw") for h in range(self.n_hcs)]
        workers += [(self.sup_names[d], self.dh_ids[d], self.sup_ids[d], "chw_supervisor") for d in range(self.n_dhs)]
        r, bits = self.rng.random, self.rng.getrandbits
        for i, (name, facility, contact, role) in enumerate(workers):
            settings: dict[str, Any] = {
                "_id": f"org.couchdb.user:{name}",
                "name": name,
                "type": "user-settings",
                "fullname": name.replace("_", " ").title(),
                "email": f"{name}@example.org",
                "phone": self._phone(),
                "known": True,
                "language": LANGS[int(r() * len(LANGS))],
                "facility_id": facility,
                "roles": [role],
                "external_id": "",
            }
            if i % 13 != 5:  # a few users lack contact_id: the model falls back to facility_id
                settings["contact_id"] = contact
            else:
                self.counts.messy["user_without_contact_id"] += 1
            yield MEDIC, "user-settings", settings
            # Credentials as CouchDB stores them (hashes of nothing: nobody can log in with them).
            yield (
                USERS,
                "user",
                {
                    "_id": f"org.couchdb.user:{name}",
                    "name": name,
                    "type": "user",
                    "roles": [role, "kujua_user", "data_entry"],
                    "facility_id": facility,
                    "contact_id": contact,
                    "password_scheme": "pbkdf2",
                    "iterations": 10,
                    "derived_key": f"{bits(160):040x}",
                    "salt": f"{bits(128):032x}",
                },
            )

    def reports(self) -> Iterator[tuple[str, str, str]]:
        counts, messy, forms = self.counts, self.counts.messy, self.counts.forms
        nul_at, refused_at = self.nul_at, self.refused_at
        for i in range(self.n_reports):
            reported = self._date()
            stored: int | str = reported
            if i % 199 == 5:
                stored = ""
                messy["empty_reported_date"] += 1
            elif i % 211 == 9:
                stored = reported // 1000  # seconds, as some old SMS gateways sent
                messy["reported_date_in_seconds"] += 1
            notes = None
            if i in nul_at:
                notes = "Client reported\u0000 dizziness"
                counts.nul += 1
            elif i in refused_at:
                notes = "garbled \ud83d text from a broken keyboard"
                counts.refused += 1
            form, text = self.report_json(reported, notes, stored)
            if i not in refused_at:
                forms[form] += 1
            yield MEDIC, "data_record", text
        counts.reports = self.n_reports - counts.refused

    def report(self, reported: int) -> dict[str, Any]:
        """One new report (data_record) by a CHW about one of the sample's people."""
        return json.loads(self.report_json(reported)[1])

    def report_json(self, reported: int, notes: str | None = None, stored: int | str | None = None) -> tuple[str, str]:
        """(form, report as compact JSON), assembled from precomputed fragments.

        `stored` replaces the reported_date written (a messy value); `notes` adds fields.notes.
        """
        r = self.rng.random
        form = FORM_TABLE[int(r() * len(FORM_TABLE))]
        p = self.patients[int(r() * self.n_household)]
        h = p.clinic % self.n_hcs
        geo = self.geo_json[int(r() * 64)]
        if form == "household_survey":
            contact, about = self.household_json[p.clinic]
            source = "contact"
        else:
            contact, about = p.contact_json, p.fields_json
            source = "task" if r() < 0.6 else "contact"
        variant = self.variant_json[form][int(r() * 48)]
        instance = _uuid(self.rng.getrandbits(128))
        uid = _uuid(self.rng.getrandbits(128))
        logged = reported + 1000 + int(r() * 9000)
        extra = "" if notes is None else f',"notes":{dumps(notes)}'
        return form, (
            f'{{"_id":"{uid}","type":"data_record","form":"{form}","content_type":"xml",'
            f'"reported_date":{dumps(reported if stored is None else stored)},"contact":{self.chw_contact_json[h]},'
            f'"from":"{self.chw_phones[h]}","hidden_fields":["inputs","meta"],'
            f'"fields":{{"inputs":{{"meta":{INPUT_META},"source":"{source}","source_id":"",'
            f'"contact":{contact}}},{about},"{form}":{variant},'
            f'"meta":{{"instanceID":"uuid:{instance}","deprecatedID":""}}{extra}}},'
            f'"geolocation_log":[{{"timestamp":{logged},"recording":{geo}}}]}}'
        )

    def feedback(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        r = self.rng.random
        for k in range(self.n_feedback):
            when = self._date()
            iso = _iso(when)
            user = self.chw_names[int(r() * self.n_hcs)]
            version = APP_VERSIONS[int(r() * len(APP_VERSIONS))]
            info: dict[str, Any]
            if k % 4 == 3:
                info = {"message": MANUAL[int(r() * len(MANUAL))]}
                source = "manual"
            else:
                message = ERRORS[int(r() * len(ERRORS))]
                info = {
                    "message": message,
                    "stack": f"Error: {message}\n    at t.getContact (main.js:1:{int(r() * 9999)})"
                    "\n    at e.invoke (polyfills.js:1:8532)"
                    "\n    at Object.onInvoke (main.js:1:4812)",
                }
                if k % 3 == 0:
                    info["cause"] = CAUSES[int(r() * len(CAUSES))]
                source = "automatic"
            yield (
                USERS_META,
                "feedback",
                {
                    "_id": f"feedback-{iso}-{_uuid(self.rng.getrandbits(128))}",
                    "type": "feedback",
                    "meta": {
                        "time": iso,
                        "user": {"name": user},
                        "url": URLS[int(r() * len(URLS))],
                        "app": version,
                        "version": version,
                        "source": source,
                        "language": "en",
                    },
                    "info": info,
                },
            )

    def telemetry(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        r = self.rng.random
        for k in range(self.n_telemetry):
            day = dt.datetime.fromtimestamp(self._date() / 1000, dt.UTC)
            version = APP_VERSIONS[int(r() * len(APP_VERSIONS))]
            old = version in OLD_VERSIONS
            user = self.chw_names[int(r() * self.n_hcs)]
            month: int | str = day.month - 1 if old else day.month
            if k % 53 == 7:
                month = "x"
                self.counts.messy["telemetry_bad_month"] += 1
            metadata: dict[str, Any] = {"year": day.year, "month": month}
            if not old:  # daily telemetry arrived in 3.8.0; older documents are monthly
                metadata["day"] = day.day
            metadata.update(
                aggregate_date=f"{day.year}-{day.month}-{day.day}",
                user=user,
                deviceId=_uuid(self.rng.getrandbits(128)),
                versions={
                    "app": version,
                    "forms": {"assessment": "5-a1b2", "delivery": "3-c4d5"},
                    "settings": f"{12 + int(r() * 40)}-{self.rng.getrandbits(32):08x}",
                },
            )
            device: dict[str, Any]
            if k % 9 == 4:  # a desktop browser: no Android device info
                device = {
                    "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                    "(KHTML, like Gecko) "
                    "Chrome/120.0.0.0 Safari/537.36",
                    "hardwareConcurrency": 8,
                    "screen": {"width": 1920, "height": 1080},
                }
            else:
                maker, model, chip = DEVICES[int(r() * len(DEVICES))]
                android, api = ANDROID[int(r() * len(ANDROID))]
                total = (16 + 16 * int(r() * 4)) * 1_000_000_000
                device = {
                    "userAgent": f"Mozilla/5.0 (Linux; Android {android}; {model} Build/QP1A; wv) "
                    "AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/119.0.6045.163 "
                    "Mobile Safari/537.36 org.medicmobile.webapp.mobile/v1.0.4-4",
                    "hardwareConcurrency": 4 + 4 * int(r() * 2),
                    "screen": {"width": 720, "height": 1520},
                    "deviceInfo": {
                        "app": {
                            "version": f"v1.{int(r() * 5)}.{int(r() * 9)}-4",
                            "packageName": "org.medicmobile.webapp.mobile",
                            "versionCode": 104,
                        },
                        "software": {
                            "androidVersion": android,
                            "osApiLevel": api,
                            "osVersion": f"4.14.{int(r() * 200)}",
                        },
                        "hardware": {"manufacturer": maker, "model": model, "hardware": chip},
                        "ram": {
                            "free": int(r() * 2e9),
                            "total": 3_000_000_000,
                            "threshold": 226_492_416,
                        },
                        "storage": {"free": int(r() * total), "total": total},
                        "network": {"upSpeed": int(r() * 50_000), "downSpeed": int(r() * 100_000)},
                    },
                }
            yield (
                USERS_META,
                "telemetry",
                {
                    "_id": f"telemetry-{day.year}-{day.month}-{day.day}-{user}-" + _uuid(self.rng.getrandbits(128)),
                    "type": "telemetry",
                    "metadata": metadata,
                    "metrics": {
                        "boot_time": _stat(self.rng, 2000, 60000),
                        "search:contacts": _stat(self.rng, 50, 3000),
                        "enketo:reports:assessment:add:render": _stat(self.rng, 300, 5000),
                        "replication:medic:to:success": _stat(self.rng, 100, 20000),
                    },
                    "device": device,
                    "dbInfo": {
                        "doc_count": 500 + int(r() * 20000),
                        "update_seq": 1000 + int(r() * 90000),
                        "idb_attachment_format": "binary",
                        "db_name": f"medic-user-{user}",
                        "auto_compaction": False,
                        "adapter": "idb",
                    },
                },
            )


def generate(
    n: int, seed: int, *, end_ms: int = DEFAULT_END_MS, bad: bool = True
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Exactly n `(db, doc)` pairs, the same for the same arguments. Docs are read-only."""
    return iter(Sample(n, seed, end_ms=end_ms, bad=bad))


def expected_counts(n: int, seed: int, *, end_ms: int = DEFAULT_END_MS, bad: bool = True) -> SampleCounts:
    """What `generate(n, seed)` holds (runs the generator: about a second per 50k documents)."""
    sample = Sample(n, seed, end_ms=end_ms, bad=bad)
    for _ in sample:
        pass
    return sample.counts
