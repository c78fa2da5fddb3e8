"""The policy's optional ``quality.block_over``: validated in full, hashed only when set, applied to a report."""

from __future__ import annotations

import pytest

from appliance.files.quality import _PROBLEM_ADVICE, QualityPass
from appliance.policy import PolicyError, parse_policy
from appliance.policy.model import QUALITY_CODES

pytestmark = pytest.mark.no_database

MINIMAL = {"version": 1, "default": {"action": "block", "threshold": 0.5}}


def test_no_quality_section_blocks_nothing_and_keeps_the_hash():
    plain = parse_policy(MINIMAL)
    assert plain.quality_block == {} and "quality" not in plain.canonical()
    limited = parse_policy(MINIMAL | {"quality": {"block_over": {"exact_duplicates": 0.2}}})
    assert limited.quality_block == {"exact_duplicates": 0.2} and limited.content_hash != plain.content_hash


def test_every_problem_is_reported_at_once():
    with pytest.raises(PolicyError) as err:
        parse_policy(MINIMAL | {"quality": {"block_over": {"dupes": 0.1, "near_duplicates": 1.5,
                                                           "empty_conversation": True}}})
    text = str(err.value)
    assert "quality.block_over.dupes: unknown quality problem" in text
    assert "quality.block_over.near_duplicates: must be a share of records" in text and "1.5" in text
    assert "quality.block_over.empty_conversation" in text
    with pytest.raises(PolicyError, match="the one key block_over"):
        parse_policy(MINIMAL | {"quality": {"block_on": {}}})


def test_the_codes_are_the_reports_own():
    assert set(QUALITY_CODES) == {"exact_duplicates", "near_duplicates", "over_max_seq_length", *_PROBLEM_ADVICE}


def test_violations_name_count_share_and_limit():
    q = QualityPass()
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    q.add([(i, record) for i in range(4)] + [(4, {"text": ""})])
    report = q.summary()
    policy = parse_policy(MINIMAL | {"quality": {"block_over": {"exact_duplicates": 0.5,
                                                                "empty_conversation": 0, "repeated_role": 0}}})
    assert policy.quality_violations(report) == {
        "exact_duplicates": {"count": 3, "share": 0.6, "limit": 0.5},
        "empty_conversation": {"count": 1, "share": 0.2, "limit": 0.0},
    }
