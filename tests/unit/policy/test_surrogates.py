"""``pseudonymize``: consistent, type-appropriate surrogates keyed by the dataset's secret."""

from __future__ import annotations

import re

import pytest

from appliance.policy import parse_policy, redact_record
from appliance.policy.model import PolicyError
from appliance.policy.redaction import redact_text, stored_span
from appliance.policy.surrogates import SURROGATE_TYPES, Surrogates
from appliance.scanning import Finding

KEY_A, KEY_B = b"a" * 32, b"b" * 32


def test_the_same_value_maps_to_the_same_surrogate_and_another_key_to_another():
    a, b = Surrogates(KEY_A), Surrogates(KEY_B)
    assert a.value("PERSON", "Maria Lopez") == a.value("PERSON", "maria   LOPEZ")  # case and spacing aside
    assert a.value("PERSON", "Maria Lopez") != a.value("PERSON", "Mario Lopez")
    people = {a.value("PERSON", f"Person {i}") for i in range(200)}
    assert len(people) > 190  # distinct values rarely collide
    assert sum(a.value("PERSON", f"Person {i}") == b.value("PERSON", f"Person {i}") for i in range(200)) < 3


def test_surrogates_keep_the_shape_and_stay_in_reserved_ranges():
    s = Surrogates(KEY_A)
    assert len(s.value("PERSON", "Maria").split()) == 1 and len(s.value("PERSON", "Maria Lopez").split()) == 2
    assert re.fullmatch(r"[a-z]+\.[a-z]+@example\.com", s.value("EMAIL_ADDRESS", "maria.lopez@corp.example"))
    assert re.fullmatch(r"\+1 \d{3} 555 01\d\d", s.value("PHONE_NUMBER", "+44 20 7946 0958"))
    assert re.fullmatch(r"(192\.0\.2|198\.51\.100|203\.0\.113)\.\d+", s.value("IP_ADDRESS", "10.1.2.3"))
    assert s.value("IP_ADDRESS", "fe80::1").startswith("2001:db8::")
    assert s.value("LOCATION", "Berlin").isalpha()
    for etype in SURROGATE_TYPES:
        assert s.value(etype, "Maria Lopez").casefold() != "maria lopez"


def test_only_types_with_surrogates_and_a_real_secret():
    with pytest.raises(ValueError, match="no surrogates for 'CREDIT_CARD'"):
        Surrogates(KEY_A).value("CREDIT_CARD", "4111111111111111")
    with pytest.raises(ValueError, match="at least 16 bytes; got 4"):
        Surrogates(b"abcd")


def test_the_policy_allows_pseudonymize_only_where_surrogates_exist():
    ok = parse_policy("version: 1\ndefault: {action: block, threshold: 0.5}\nentities:\n  PERSON: pseudonymize\n")
    assert ok.rule_for("PERSON").action == "pseudonymize"
    with pytest.raises(PolicyError) as err:
        parse_policy("version: 1\ndefault: {action: pseudonymize, threshold: 0.5}\nentities:\n"
                     "  CREDIT_CARD: pseudonymize\n")
    assert err.value.problems == [
        "default.action: pseudonymize is available for EMAIL_ADDRESS, IP_ADDRESS, LOCATION, PERSON, PHONE_NUMBER "
        "(block or redact the others); got it for the default rule",
        "entities.CREDIT_CARD.action: pseudonymize is available for EMAIL_ADDRESS, IP_ADDRESS, LOCATION, PERSON, "
        "PHONE_NUMBER (block or redact the others); got it for CREDIT_CARD",
    ]


def _found(text: str, value: str, etype: str, action: str, field: str = "messages[0].content", nth: int = 0) -> Finding:
    start = -1
    for _ in range(nth + 1):
        start = text.index(value, start + 1)
    return Finding(0, field, etype, start, start + len(value), 0.9, action)


def test_a_record_keeps_its_shape_with_consistent_surrogates():
    s = Surrogates(KEY_A)
    text = "Maria Lopez wrote to jane@corp.example; later Maria Lopez called."
    record = {"messages": [{"role": "user", "content": text}]}
    findings = [_found(text, "Maria Lopez", "PERSON", "pseudonymize"),
                _found(text, "jane@corp.example", "EMAIL_ADDRESS", "redact"),
                _found(text, "Maria Lopez", "PERSON", "pseudonymize", nth=1)]
    out = redact_record(record, findings, s)["messages"][0]["content"]
    fake = s.value("PERSON", "Maria Lopez")
    assert out == f"{fake} wrote to <EMAIL_ADDRESS>; later {fake} called."
    assert record["messages"][0]["content"] == text  # not modified
    # Without the dataset's surrogates (the output guard), the placeholder.
    assert redact_record(record, findings)["messages"][0]["content"].startswith("<PERSON> wrote to <EMAIL_ADDRESS>")


def test_overlaps_take_the_stricter_action_and_stored_spans_follow_the_surrogates():
    s = Surrogates(KEY_A)
    text = "Ask Maria Lopez about Otto today."
    mixed = [_found(text, "Maria Lopez", "PERSON", "pseudonymize"), _found(text, "Lopez", "PERSON", "redact")]
    assert redact_text(text, mixed, s) == "Ask <PERSON> about Otto today."
    pseudo = [_found(text, "Maria Lopez", "PERSON", "pseudonymize")]
    out = redact_text(text, pseudo, s)
    otto = _found(text, "Otto", "PERSON", "allow")
    start, end = stored_span(otto, pseudo, text, s)
    assert out[start:end] == "Otto"


def test_replaced_spans_point_at_each_findings_placeholder_or_surrogate():
    """The portal's masked context finds a redacted value's placeholder (or surrogate) in the stored text."""
    from appliance.policy.redaction import replaced_span

    s = Surrogates(KEY_A)
    text = "Ask Maria Lopez at maria@example.com about Otto."
    name = _found(text, "Maria Lopez", "PERSON", "pseudonymize")
    mail = _found(text, "maria@example.com", "EMAIL_ADDRESS", "redact")
    inner = _found(text, "Lopez", "PERSON", "redact")  # merged into the name's span
    both = [name, mail]
    out = redact_text(text, both, s)
    start, end = replaced_span(mail, both, text, s)
    assert out[start:end] == "<EMAIL_ADDRESS>"
    start, end = replaced_span(name, both, text, s)
    assert out[start:end] == s.value("PERSON", "Maria Lopez")
    merged = [name, mail, inner]
    out = redact_text(text, merged, s)
    start, end = replaced_span(inner, merged, text, s)
    assert out[start:end] == "<PERSON>"  # the stricter action won the merged span; the inner finding lies in it
    assert replaced_span(_found(text, "Otto", "PERSON", "allow"), both, text, s) is None
