"""Each secret type is found, with the right span; look-alikes are not."""

from __future__ import annotations

import base64
import hashlib

import pytest

from appliance.scanning.secret_recognizers import is_high_entropy_secret, shannon_entropy

AWS_ID = "AKIAQ3EGRX5BLWZ7TY4P"
AWS_SECRET = "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"
GCP = "AIzaSyA1b2C3d4E5f6G7h8I9j0K_lMnOpQrStUv"
AZURE = base64.b64encode(hashlib.sha512(b"storage account").digest()).decode()  # 88 characters, "==" at the end
GH = "ghp_R8x2Lq9ZkT4mVb7nC1wE6yH3pJ5sD0fGaUoI"
GH_PAT = "github_pat_11ABCDEFG0123456789abc_" + "Zx9" * 19 + "Qw"
GL = "glpat-Xy7_kP2mQ9vLr4TzW8nB"
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
HOOK = "https://hooks.slack.com/services/T0ABCDEFG/B0HIJKLMN/aBcDeFgHiJkLmNoPqRsTuVwX"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x9Qz\nk3Jd9sPq==\n-----END RSA PRIVATE KEY-----"
JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NSIsImlhdCI6MTcwMDAwMDAwMH0.c2lnbmF0dXJlLWJ5dGVzLWhlcmUtMzItbG9uZw"
APL = "apl_0123456789ab_" + "A" * 20 + "b-_" + "c" * 20


@pytest.mark.parametrize(
    ("entity", "text", "value"),
    [
        ("AWS_ACCESS_KEY_ID", f"aws_access_key_id = {AWS_ID}", AWS_ID),
        ("AWS_ACCESS_KEY_ID", "session key ASIAY34FZKBOKMUTVV7A expired", "ASIAY34FZKBOKMUTVV7A"),
        ("AWS_SECRET_ACCESS_KEY", f"aws_secret_access_key={AWS_SECRET}", AWS_SECRET),
        ("AWS_SECRET_ACCESS_KEY", f"Here is the AWS secret key: {AWS_SECRET}", AWS_SECRET),
        ("GCP_API_KEY", f"fetch('https://maps.googleapis.com/?key={GCP}')", GCP),
        ("AZURE_STORAGE_KEY", f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={AZURE};EndpointSuffix=core.windows.net", AZURE),
        ("AZURE_STORAGE_KEY", f"the storage account key is {AZURE}", AZURE),
        ("GITHUB_TOKEN", f"git clone https://{GH}@github.com/acme/app.git", GH),
        ("GITHUB_TOKEN", f"GITHUB_TOKEN={GH_PAT}", GH_PAT),
        ("GITLAB_TOKEN", f"PRIVATE-TOKEN: {GL}", GL),
        ("SLACK_TOKEN", f"token {SLACK} fails", SLACK),
        ("SLACK_TOKEN", f"post to {HOOK}", HOOK),
        ("PRIVATE_KEY", f"key:\n{PEM}\nthanks", PEM),
        ("JWT", f"Authorization: Bearer {JWT}", JWT),
        ("APPLIANCE_TOKEN", f"export APPLIANCE_TOKEN={APL}", APL),
        ("GENERIC_SECRET", "DB_PASSWORD=Xk9#mQ2$vL7p", "Xk9#mQ2$vL7p"),
        ("GENERIC_SECRET", '"api_key": "f3a9c2e8b7d1406a9e5c3b2a1d0f9e8c"', "f3a9c2e8b7d1406a9e5c3b2a1d0f9e8c"),
        ("GENERIC_SECRET", "The admin password is Tr0ub4dor&3x", "Tr0ub4dor&3x"),
        ("GENERIC_SECRET", "mysql -u root -p'Zq8!rT3#wL' -h db01", "Zq8!rT3#wL"),
    ],
)
def test_secret_found_with_exact_span(scan_text, entity, text, value):
    found = scan_text(text)
    assert (entity, value) in [(t, v) for t, v, _ in found], found
    # The specific type wins over the generic `key = value` match on the same span.
    if entity != "GENERIC_SECRET":
        assert "GENERIC_SECRET" not in [t for t, _, _ in found]


def test_truncated_private_key_is_covered_to_the_end(scan_text):
    text = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
    assert scan_text(text) == [("PRIVATE_KEY", text, 1.0)]


@pytest.mark.parametrize(
    "text",
    [
        "Read the password from os.environ['DB_PASSWORD'] instead of hard-coding it.",
        "api_key: ${API_KEY}",
        "password: <redacted>",
        'token = "{{ vault_token }}"',
        "secret: changeme123",
        "password=YOUR_PASSWORD_HERE",
        "The password is incorrect, please try again.",
        "Set password_min_length to 12 in the policy.",
        "client_secret = settings.CLIENT_SECRET",
        "The build failed on commit 3f9a1c7e2b8d4f6a0c5e9b1d7f3a2c8e4b6d0f1a.",
        "Request id 7c9e6679-7425-40de-944b-e07fc1f90ae7 timed out.",
        "Checksum sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "The AKIA prefix marks long-term AWS keys.",
        "ghp_ tokens are classic GitHub tokens.",
    ],
)
def test_look_alikes_are_not_secrets(scan_text, text):
    assert [f for f in scan_text(text) if f[0] != "PERSON"] == []


def test_entropy():
    assert shannon_entropy("") == 0
    assert shannon_entropy("aaaa") == 0
    assert shannon_entropy("abcd") == 2
    assert is_high_entropy_secret("q8#Lx!2vRm")
    assert not is_high_entropy_secret("password")
    assert not is_high_entropy_secret("${SECRET}")


def test_random_letters_only_secret_is_still_a_secret(scan_text):
    assert scan_text("client_secret = 'bHkTqzWvYxLmNoPaRsTuVw'") == [("GENERIC_SECRET", "bHkTqzWvYxLmNoPaRsTuVw", 0.8)]
    assert scan_text("token = refreshToken") == []
    assert scan_text("DB_PASSWORD: $XqWOlKkQ9E7hxn") == [("GENERIC_SECRET", "$XqWOlKkQ9E7hxn", 0.8)]
    assert scan_text("DB_PASSWORD: $DB_PASSWORD_FROM_VAULT") == []
