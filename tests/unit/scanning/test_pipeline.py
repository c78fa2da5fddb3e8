"""Scan, decide, redact: the path an accepted upload takes."""

from __future__ import annotations

from appliance.policy import decide, load_default_policy, redact_record
from appliance.scanning import ScanUnit, iter_text_fields


def test_scan_decide_redact_end_to_end(scanner):
    record = {"messages": [{"role": "user", "content": "I'm Maria Kowalczyk; mail maria@example.org or call +44 20 7946 0958."}]}
    units = [ScanUnit(1, path, text) for path, text in iter_text_fields(record)]
    decision = decide(scanner.scan(units), load_default_policy())
    assert decision.accepted
    out = redact_record(record, decision.findings)
    assert out == {"messages": [{"role": "user", "content": "I'm <PERSON>; mail <EMAIL_ADDRESS> or call <PHONE_NUMBER>."}]}
