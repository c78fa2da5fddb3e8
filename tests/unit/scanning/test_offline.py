"""Loading the scanner and scanning never touch the network."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from appliance.scanning import Scanner, ScanUnit
from appliance.scanning.pii_recognizers import offline_tld_extract


@pytest.fixture
def no_network(monkeypatch):
    attempts: list[str] = []

    def refuse(name):
        def fn(*args, **kwargs):
            attempts.append(f"{name}{args[1:2] or args[:1]}")
            raise OSError(f"network disabled in this test ({name})")

        return fn

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


def test_load_and_scan_offline(no_network):
    offline_tld_extract.cache_clear()  # the suffix list must load now, with the network off
    scanner = Scanner()  # a fresh model load, too
    text = "Mail jane.doe@example.co.uk or visit https://example.org; Dr. Maria Kowalczyk, key AKIAQ3EGRX5BLWZ7TY4P"
    found = {(f.entity_type, text[f.start : f.end]) for f in scanner.scan([ScanUnit(1, "text", text)])}
    assert no_network == []
    assert {
        ("EMAIL_ADDRESS", "jane.doe@example.co.uk"),
        ("PERSON", "Maria Kowalczyk"),
        ("AWS_ACCESS_KEY_ID", "AKIAQ3EGRX5BLWZ7TY4P"),
    } <= found


_SCRIPT = """
import socket, sys
from appliance.scanning import Scanner, ScanUnit
try:
    socket.create_connection(("192.0.2.1", 443), timeout=1)
    sys.exit("network is reachable; this test needs an isolated namespace")
except OSError:
    pass
text = "Mail jane.doe@example.co.uk, call +44 20 7946 0958, Maria Kowalczyk, key AKIAQ3EGRX5BLWZ7TY4P"
print(sorted({f.entity_type for f in Scanner().scan([ScanUnit(1, "text", text)])}))
"""


@pytest.mark.slow
@pytest.mark.no_database
def test_scan_in_a_network_namespace_without_network():
    """The same, enforced by the kernel: a fresh process in its own empty network namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("unshare -n is not available here (needs root or user namespaces)")
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['AWS_ACCESS_KEY_ID', 'EMAIL_ADDRESS', 'PERSON', 'PHONE_NUMBER']"
