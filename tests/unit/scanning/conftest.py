"""One real scanner (presidio + the spaCy model) for the whole test session."""

from __future__ import annotations

import pytest

from appliance.scanning import Finding, Scanner, ScanUnit, get_scanner


@pytest.fixture(scope="session")
def scanner() -> Scanner:
    return get_scanner()


@pytest.fixture(scope="session")
def scan_text(scanner: Scanner):
    """``scan_text(text, entities=None) -> [(entity_type, matched_text, score)]``."""

    def run(text: str, entities=None) -> list[tuple[str, str, float]]:
        findings: list[Finding] = scanner.scan([ScanUnit(0, "text", text)], entities=entities)
        return [(f.entity_type, text[f.start : f.end], f.score) for f in findings]

    return run
