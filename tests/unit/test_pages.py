"""The bytes of a _changes page, without a server: the trailer read ahead, NUL escapes removed."""

from __future__ import annotations

import json

import pytest

from chtsync.couch import page_trailer, seq_number
from chtsync.store import strip_nul


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"results":[],\n"last_seq":"12-g1AAAA","pending":3}\n', ("12-g1AAAA", 3)),
    (b'{"results":[],"last_seq":12}', ("12", None)),  # pouchdb: a number, no pending
    (b'{"results":[], "last_seq" : "7-x\\"y" , "pending" : 0 }  ', ('7-x"y', 0)),
    (b'{"results":[{"id":"a"}],"last_seq":"3-abc"', None),  # cut short: no trailer
    (b'{"error":"unauthorized"}', None),
])
def test_page_trailer(body: bytes, expected: tuple[str, int | None] | None) -> None:
    assert page_trailer(body) == expected


def test_page_trailer_agrees_with_the_json_of_the_page() -> None:
    page = {"results": [{"seq": f"{i}-g", "id": f"d{i}", "doc": {"x": "}" * i}} for i in range(50)],
            "last_seq": "50-g1AAAAB\\x", "pending": 17}
    body = json.dumps(page).encode()
    assert page_trailer(body) == (page["last_seq"], 17)


@pytest.mark.parametrize(("seq", "number"), [("12-g1AA", 12), ("12", 12), ('"5-x"', 5), ("now", None), (None, None)])
def test_seq_number(seq: str | None, number: int | None) -> None:
    assert seq_number(seq) == number


@pytest.mark.parametrize(("body", "expected"), [
    (rb'{"a":"x\u0000y"}', rb'{"a":"xy"}'),
    (rb'{"a":"\\u0000"}', rb'{"a":"\\u0000"}'),  # the text "\u0000": an escaped backslash, kept
    (rb'{"a":"\\\u0000"}', rb'{"a":"\\"}'),  # a backslash, then a NUL
    (b'{"a":"x\x00y"}', b'{"a":"xy"}'),  # a raw NUL byte
    (rb'{"a":"plain"}', rb'{"a":"plain"}'),
])
def test_strip_nul(body: bytes, expected: bytes) -> None:
    assert strip_nul(body) == expected
    assert "\x00" not in json.loads(strip_nul(body))["a"]
