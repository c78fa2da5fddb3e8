from __future__ import annotations

import pytest
import yaml

from appliance.errors import InvalidRequestError
from appliance.policy import DEFAULT_POLICY_PATH, PolicyError, load_default_policy, load_policy, parse_policy
from appliance.scanning import SECRET_ENTITIES, SUPPORTED_ENTITIES

MINIMAL = {"version": 1, "default": {"action": "block", "threshold": 0.5}}


def test_shipped_default_policy_is_strict():
    policy = load_default_policy()
    assert policy.default.action == "block"
    for etype in SECRET_ENTITIES | {"CREDIT_CARD", "US_SSN", "IBAN_CODE", "UK_NHS"}:
        assert policy.rule_for(etype).action == "block", etype
    for etype in ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS"):
        assert policy.rule_for(etype).action == "redact", etype
    # Every supported type is listed explicitly; the only allow is bare place names.
    assert set(policy.entities) == SUPPORTED_ENTITIES
    assert [t for t, r in policy.entities.items() if r.action == "allow"] == ["LOCATION"]
    assert policy.rule_for("PERSON").threshold == 0.6
    assert policy.rule_for("EMAIL_ADDRESS").threshold == 0.5  # inherits the default threshold
    assert policy.content_hash.startswith("sha256:") and len(policy.content_hash) == 7 + 64


def test_shipped_default_policy_is_read_as_package_data_even_from_a_zip(tmp_path):
    """Read through importlib.resources, not a file system path: found however ``policies`` is installed."""
    import subprocess
    import sys
    import zipfile

    archive = tmp_path / "policies.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("policies/__init__.py", "")
        z.writestr("policies/default.yaml", DEFAULT_POLICY_PATH.read_text())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import policies; assert '.zip' in policies.__file__; "
            "from appliance.policy import load_default_policy; print(load_default_policy().content_hash)")
    out = subprocess.run([sys.executable, "-c", code, str(archive)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == load_default_policy().content_hash


def test_shorthand_and_defaults():
    policy = parse_policy({**MINIMAL, "entities": {"EMAIL_ADDRESS": "redact", "PERSON": {"action": "allow", "threshold": 0.9}}})
    assert policy.rule_for("EMAIL_ADDRESS").action == "redact"
    assert policy.rule_for("EMAIL_ADDRESS").threshold == 0.5
    assert policy.rule_for("PERSON").threshold == 0.9
    assert policy.rule_for("JWT").action == "block"
    assert "PERSON" not in policy.scanned_entities()
    assert "JWT" in policy.scanned_entities()


def test_hash_ignores_form_but_not_meaning():
    text = DEFAULT_POLICY_PATH.read_text()
    base = parse_policy(text).content_hash
    doc = yaml.safe_load(text)
    reordered = {"entities": dict(reversed(list(doc["entities"].items()))), "default": doc["default"], "version": 1}
    assert parse_policy(reordered).content_hash == base
    assert parse_policy(yaml.safe_dump(doc, default_flow_style=True)).content_hash == base
    assert parse_policy({**doc, "description": "reworded"}).content_hash == base
    # Explicit threshold equal to the default is the same decision.
    explicit = {**doc, "entities": {**doc["entities"], "EMAIL_ADDRESS": {"action": "redact", "threshold": 0.5}}}
    assert parse_policy(explicit).content_hash == base
    changed = {**doc, "entities": {**doc["entities"], "EMAIL_ADDRESS": "allow"}}
    assert parse_policy(changed).content_hash != base


def test_all_errors_reported_at_once():
    doc = {
        "version": 2,
        "colour": "blue",
        "default": {"action": "block"},
        "entities": {
            "EMAIL_ADDRESS": {"action": "hide"},
            "PERSON": {"action": "redact", "threshold": 1.5, "note": "x"},
            "EMAIL": "redact",
            "PHONE_NUMBER": 3,
            "JWT": {"threshold": True},
        },
    }
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    problems = info.value.problems
    assert problems == [
        "colour: unknown key; allowed keys are version, description, default, entities, retention, allow_list, quality",
        "version: must be 1; got 2",
        "default.threshold: is required for the default rule (a number between 0 and 1)",
        "entities.EMAIL_ADDRESS.action: must be one of block, redact, pseudonymize, allow; got 'hide'",
        "entities.PERSON.note: unknown key; allowed keys are action, threshold",
        "entities.PERSON.threshold: must be a number between 0 and 1; got 1.5",
        "entities.EMAIL: unknown entity type; known types are " + ", ".join(sorted(SUPPORTED_ENTITIES)),
        "entities.PHONE_NUMBER: must be a mapping with `action` and optional `threshold`, or an action name; got 3",
        "entities.JWT.action: is required (one of block, redact, pseudonymize, allow)",
        "entities.JWT.threshold: must be a number between 0 and 1; got True",
    ]
    assert info.value.param == "policy"
    assert isinstance(info.value, InvalidRequestError)
    for problem in problems:
        assert problem in info.value.message


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("version: [1\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "(top level): must be a mapping"),
        ("version: 1\nentities: []\n", "entities: must be a mapping"),
    ],
)
def test_malformed_documents(source, fragment):
    with pytest.raises(PolicyError) as info:
        parse_policy(source)
    assert fragment in info.value.message


def test_load_policy_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\ndefault: {action: nope, threshold: 0.5}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(bad)
    assert str(bad) in info.value.message
    assert "default.action: must be one of block, redact, pseudonymize, allow; got 'nope'" in info.value.problems
    with pytest.raises(InvalidRequestError) as missing:
        load_policy(tmp_path / "absent.yaml")
    assert missing.value.param == "policy"


def test_inventoried_entities_add_types_named_allow():
    policy = parse_policy("version: 1\ndefault: {action: allow, threshold: 0.5}\nentities:\n  EMAIL_ADDRESS: allow\n  JWT: block\n")
    assert "EMAIL_ADDRESS" not in policy.scanned_entities()
    assert policy.inventoried_entities() == {"EMAIL_ADDRESS", "JWT"}
