from __future__ import annotations

import copy

import pytest

from appliance.policy import redact_record, redact_text
from appliance.scanning import Finding


def fnd(field, etype, start, end, action="redact", record=1):
    return Finding(record, field, etype, start, end, 0.9, action)


def test_redacts_chat_record_keeping_structure():
    record = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "I am Maria Kowalczyk, maria@example.org"}]},
            {"role": "assistant", "content": "Hello Maria!", "weight": 1},
        ],
        "id": 7,
    }
    original = copy.deepcopy(record)
    findings = [
        fnd("messages[1].content[0].text", "PERSON", 5, 20),
        fnd("messages[1].content[0].text", "EMAIL_ADDRESS", 22, 39),
        fnd("messages[2].content", "PERSON", 6, 11),
    ]
    out = redact_record(record, findings)
    assert record == original  # input untouched
    assert out == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "I am <PERSON>, <EMAIL_ADDRESS>"}]},
            {"role": "assistant", "content": "Hello <PERSON>!", "weight": 1},
        ],
        "id": 7,
    }


def test_overlapping_spans_become_one_placeholder():
    text = "key=ghp_abcdefghij and more"
    findings = [fnd("text", "GENERIC_SECRET", 4, 16), fnd("text", "GITHUB_TOKEN", 4, 18), fnd("text", "PERSON", 10, 12)]
    assert redact_text(text, findings) == "key=<GITHUB_TOKEN> and more"
    assert redact_record({"text": text}, findings) == {"text": "key=<GITHUB_TOKEN> and more"}


def test_only_redact_actions_are_applied():
    record = {"prompt": "call 555-0100", "completion": "ok Maria"}
    findings = [fnd("prompt", "PHONE_NUMBER", 5, 13, action="allow"), fnd("completion", "PERSON", 3, 8)]
    assert redact_record(record, findings) == {"prompt": "call 555-0100", "completion": "ok <PERSON>"}
    assert redact_record(record, []) == record


@pytest.mark.parametrize(
    ("findings", "fragment"),
    [
        ([Finding(1, "text", "PERSON", 0, 4, 0.9)], "has no action"),
        ([fnd("text", "PERSON", 0, 4), fnd("text", "PERSON", 5, 9, record=2)], "one record"),
        ([fnd("prompt", "PERSON", 0, 4)], "`prompt`, which the record does not have"),
        ([fnd("text", "PERSON", 0, 99)], "outside `text`"),
    ],
)
def test_bad_findings_are_refused(findings, fragment):
    with pytest.raises(ValueError, match=fragment):
        redact_record({"text": "Maria Kowalczyk"}, findings)
