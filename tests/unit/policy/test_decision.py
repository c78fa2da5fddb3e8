from __future__ import annotations

from appliance.policy import DecisionBuilder, decide, parse_policy
from appliance.scanning import Finding

POLICY = parse_policy(
    {
        "version": 1,
        "default": {"action": "block", "threshold": 0.5},
        "entities": {
            "PERSON": {"action": "redact", "threshold": 0.7},
            "EMAIL_ADDRESS": "redact",
            "IP_ADDRESS": "allow",
        },
    }
)


def f(record: int, etype: str, score: float = 0.9, start: int = 0) -> Finding:
    return Finding(record, "text", etype, start, start + 4, score)


def test_accepted_with_redactions_and_allows():
    d = decide([f(1, "PERSON"), f(2, "EMAIL_ADDRESS"), f(2, "IP_ADDRESS"), f(3, "PERSON", 0.65)], POLICY)
    assert d.outcome == "accepted" and d.accepted
    assert [x.action for x in d.findings] == ["redact", "redact", "allow"]
    assert dict(d.counts_by_type) == {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1, "PERSON": 1}
    assert dict(d.counts_by_action) == {"block": 0, "redact": 2, "pseudonymize": 0, "allow": 1}
    assert dict(d.blocked) == {}
    assert d.dropped_below_threshold == 1  # the 0.65 PERSON is under its 0.7 threshold
    assert d.policy_hash == POLICY.content_hash


def test_rejected_lists_types_and_records():
    d = decide([f(9, "JWT"), f(2, "AWS_ACCESS_KEY_ID"), f(4, "JWT"), f(4, "JWT", start=10), f(5, "PERSON"), f(6, "JWT", 0.2)], POLICY)
    assert d.outcome == "rejected"
    assert dict(d.blocked) == {"AWS_ACCESS_KEY_ID": (2,), "JWT": (4, 9)}
    assert d.counts_by_action["block"] == 4
    assert [x.record for x in d.findings] == [2, 4, 4, 5, 9]
    doc = d.to_dict()
    assert doc["decision"] == "rejected"
    assert doc["blocked"] == {"AWS_ACCESS_KEY_ID": [2], "JWT": [4, 9]}
    assert doc["findings"][0] == {
        "record": 2, "field": "text", "entity_type": "AWS_ACCESS_KEY_ID", "start": 0, "end": 4, "score": 0.9, "action": "block"
    }


def test_builder_in_chunks_matches_one_go():
    findings = [f(i, t) for i, t in enumerate(["PERSON", "JWT", "EMAIL_ADDRESS", "PERSON", "IP_ADDRESS"])]
    builder = DecisionBuilder(POLICY, keep_findings=False)
    kept = builder.add(findings[:2]) + builder.add(findings[2:])
    one_go = decide(findings, POLICY)
    chunked = builder.result()
    assert tuple(kept) == one_go.findings
    assert chunked.findings == ()
    assert (chunked.outcome, dict(chunked.counts_by_type), dict(chunked.blocked)) == (
        one_go.outcome, dict(one_go.counts_by_type), dict(one_go.blocked)
    )


def test_nothing_found_is_accepted():
    d = decide([], POLICY)
    assert d.accepted and d.findings == ()
    assert dict(d.counts_by_action) == {"block": 0, "redact": 0, "pseudonymize": 0, "allow": 0}
