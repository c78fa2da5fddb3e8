from datetime import UTC, datetime, timedelta, timezone

import pytest

from appliance.audit.chain import canonical_json, event_hash, format_ts

FIELDS = {
    "seq": 1, "ts": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "actor": "alice", "auth_method": "token:abc",
    "action": "project.create", "resource_type": "project", "resource_id": "acme", "project": "acme",
    "outcome": "success", "reason": None, "origin_ip": "127.0.0.1", "request_id": "req_1",
    "details": {"b": 1, "a": "é"}, "prev_hash": "0" * 64,
}


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_timestamp_form_is_utc_with_microseconds():
    plus2 = datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))
    assert format_ts(plus2) == "2026-01-02T03:04:05.000006Z"
    with pytest.raises(ValueError, match="naive"):
        format_ts(datetime(2026, 1, 1))


def test_hash_is_deterministic_and_covers_every_field():
    base = event_hash(FIELDS)
    assert base == event_hash(dict(FIELDS, details={"a": "é", "b": 1}))
    for name, other in [("seq", 2), ("actor", "mallory"), ("outcome", "denied"), ("details", {"b": 2, "a": "é"}),
                        ("prev_hash", "1" * 64), ("ts", FIELDS["ts"] + timedelta(microseconds=1)),
                        ("reason", "x"), ("origin_ip", "10.0.0.1")]:
        assert event_hash(dict(FIELDS, **{name: other})) != base, name
