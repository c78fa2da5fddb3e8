"""The real scanner (presidio + the spaCy model), for the dry-run report tests (as in tests/unit/scanning)."""

from __future__ import annotations

import pytest

from appliance.scanning import Scanner, get_scanner


@pytest.fixture(scope="session")
def scanner() -> Scanner:
    return get_scanner()
