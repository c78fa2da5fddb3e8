"""The ``retention`` section of a policy: format, validation, hash."""

from __future__ import annotations

from datetime import timedelta

import pytest

from appliance.policy import PolicyError, Retention, format_duration, load_default_policy, parse_policy

MINIMAL = {"version": 1, "default": {"action": "block", "threshold": 0.5}}


def test_missing_retention_keeps_forever_and_the_default_sets_none():
    assert parse_policy(MINIMAL).retention == Retention()
    assert parse_policy({**MINIMAL, "retention": {}}).retention == Retention()
    assert load_default_policy().retention == Retention(datasets=None, adapters=None)


def test_days_and_hours():
    policy = parse_policy("version: 1\ndefault: {action: block, threshold: 0.5}\n"
                          "retention:\n  datasets: 90d\n  adapters: 36h\n")
    assert policy.retention.datasets == timedelta(days=90)
    assert policy.retention.adapters == timedelta(hours=36)
    only_datasets = parse_policy({**MINIMAL, "retention": {"datasets": "1h"}}).retention
    assert only_datasets.datasets == timedelta(hours=1) and only_datasets.adapters is None
    assert parse_policy({**MINIMAL, "retention": {"adapters": "36500d"}}).retention.adapters == timedelta(days=36500)


def test_every_bad_value_is_reported_naming_its_key_and_value():
    with pytest.raises(PolicyError) as info:
        parse_policy({**MINIMAL, "retention": {"datasets": 90, "adapters": "1 year", "models": "30d"}})
    problems = info.value.problems
    assert any(p.startswith("retention.datasets:") and "90d" in p and p.endswith("got 90") for p in problems)
    assert any(p.startswith("retention.adapters:") and p.endswith("got '1 year'") for p in problems)
    assert "retention.models: unknown key; allowed keys are datasets, adapters" in problems
    assert info.value.param == "policy"


@pytest.mark.parametrize("value", ["0d", "-3d", "90", "90D", "3w", "1.5d", "", True, None, 2.5, "36501d",
                                   "876001h", "99999999999999999999d", "90d\n", " 90d"])
def test_invalid_periods(value):
    with pytest.raises(PolicyError) as info:
        parse_policy({**MINIMAL, "retention": {"datasets": value}})
    [problem] = info.value.problems
    assert problem.startswith("retention.datasets: must be ") and f"got {value!r}"[:40] in problem


def test_retention_must_be_a_mapping():
    with pytest.raises(PolicyError, match=r"retention: must be a mapping with optional keys datasets, adapters.*got '90d'"):
        parse_policy({**MINIMAL, "retention": "90d"})


def test_hash_covers_retention_by_meaning():
    base = parse_policy(MINIMAL).content_hash
    assert "retention" not in parse_policy(MINIMAL).canonical()  # hashes of policies without one are unchanged
    ninety = parse_policy({**MINIMAL, "retention": {"datasets": "90d"}})
    assert ninety.content_hash != base
    assert parse_policy({**MINIMAL, "retention": {"datasets": "2160h"}}).content_hash == ninety.content_hash
    assert parse_policy({**MINIMAL, "retention": {"datasets": "30d"}}).content_hash != ninety.content_hash
    assert parse_policy({**MINIMAL, "retention": {"adapters": "90d"}}).content_hash != ninety.content_hash
    assert ninety.canonical()["retention"] == {"datasets": "90d"}


def test_format_duration():
    assert format_duration(timedelta(days=90)) == "90d"
    assert format_duration(timedelta(hours=48)) == "2d"
    assert format_duration(timedelta(hours=36)) == "36h"
