"""The policy's allow list: values a project reviewed as not personal data are ``allow``, secrets never."""

from __future__ import annotations

import pytest

from appliance.policy import decide, parse_policy
from appliance.policy.model import MAX_ALLOWED_VALUE_CHARS, PolicyError
from appliance.scanning import Finding

BASE = "version: 1\ndefault: {action: block, threshold: 0.5}\nentities:\n  PERSON: redact\n  EMAIL_ADDRESS: redact\n"


def policy(allow: str = ""):
    return parse_policy(BASE + allow)


def finding(text: str, value: str, entity_type: str = "PERSON", nth: int = 0) -> Finding:
    start = -1
    for _ in range(nth + 1):
        start = text.index(value, start + 1)
    return Finding(0, "content", entity_type, start, start + len(value), 0.85)


def test_the_allow_list_is_part_of_what_the_policy_decides():
    plain, listed = policy(), policy("allow_list: [Velvet Anchor, '  Otto ']\n")
    assert listed.allow_list == ("Velvet Anchor", "Otto")
    assert plain.content_hash != listed.content_hash
    # Case, spacing and order do not change the meaning, nor the hash.
    same = policy("allow_list:\n  - otto\n  - VELVET   anchor\n")
    assert same.content_hash == listed.content_hash
    assert "allow_list" not in plain.canonical()  # policies without one keep the hash they had


@pytest.mark.parametrize(("allow", "problem"), [
    ("allow_list: Otto\n", "allow_list: must be a list of strings; got 'Otto'"),
    ("allow_list: [Otto, '']\n", "allow_list[1]: must be a non-empty string; got ''"),
    ("allow_list: [Otto, 3]\n", "allow_list[1]: must be a non-empty string; got 3"),
    ("allow_list: [Otto, OTTO]\n", "allow_list[1]: repeats allow_list[0] (entries are compared without case)"),
    (f"allow_list: [{'x' * (MAX_ALLOWED_VALUE_CHARS + 1)}]\n",
     f"allow_list[0]: at most {MAX_ALLOWED_VALUE_CHARS} characters; got {MAX_ALLOWED_VALUE_CHARS + 1}"),
])
def test_a_bad_allow_list_names_the_entry(allow, problem):
    with pytest.raises(PolicyError) as err:
        policy(allow)
    assert problem in err.value.problems


def test_findings_within_an_allowed_value_are_allowed():
    p = policy("allow_list: [Velvet Anchor, Otto]\n")
    text = "The codename is VELVET  Anchor; Otto handles refunds; ask Maria Lopez. Anchor alone is not listed."
    findings = [finding(text, "Anchor"), finding(text, "Otto"), finding(text, "Maria Lopez"),
                finding(text, "Anchor", nth=1)]
    decided = decide(findings, p, lambda _: text).findings
    assert [(text[f.start:f.end], f.action) for f in decided] == [
        ("Anchor", "allow"), ("Otto", "allow"), ("Maria Lopez", "redact"), ("Anchor", "redact")]
    counts = decide(findings, p, lambda _: text).counts_by_action
    assert counts == {"block": 0, "redact": 2, "pseudonymize": 0, "allow": 2}


def test_whole_words_only():
    p = policy("allow_list: [Otto]\n")
    text = "Ottoline wrote to Otto."
    decided = decide([finding(text, "Ottoline"), finding(text, "Otto", nth=1)], p, lambda _: text).findings
    assert [f.action for f in decided] == ["redact", "allow"]


def test_secrets_are_never_allowed_and_no_text_means_no_allow_list():
    token = "ghp_" + "a1B2" * 9
    p = policy(f"allow_list: ['{token}', Otto]\n")
    text = f"token {token} for Otto"
    secret = Finding(0, "content", "GITHUB_TOKEN", 6, 6 + len(token), 0.95)
    assert decide([secret], p, lambda _: text).findings[0].action == "block"
    assert decide([finding(text, "Otto")], p).findings[0].action == "redact"  # no text_of: rules only


def test_a_glossary_merges_into_the_allow_list_and_the_hash():
    p = policy("allow_list: [Otto]\n")
    assert p.with_allowed([]) is p and p.with_allowed(["OTTO", " otto "]) is p  # nothing new: the same policy
    merged = p.with_allowed(["Elena  Brandt", "elena brandt", "Velvet Anchor"])
    assert merged.allow_list == ("Otto", "Elena  Brandt", "Velvet Anchor")
    assert merged.content_hash != p.content_hash
    assert merged.content_hash == policy("allow_list: [Otto, Elena Brandt, velvet anchor]\n").content_hash
    text = "Elena Brandt ships with Otto"
    assert [f.action for f in decide([finding(text, "Elena Brandt")], merged, lambda _: text).findings] == ["allow"]
