"""The scanner API: units in, findings out; ordering, offsets, streaming, limits."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from appliance.errors import InvalidRequestError
from appliance.scanning import DEFAULT_ENTITIES, SUPPORTED_ENTITIES, Finding, ScanUnit
from appliance.scanning.engine import NER_SEGMENT_CHARS


def test_findings_carry_positions_not_values(scanner):
    text = "Reach Maria Kowalczyk at maria@example.org"
    (person, email) = scanner.scan([ScanUnit(7, "messages[1].content", text)])
    assert (person.record, person.field, person.entity_type) == (7, "messages[1].content", "PERSON")
    assert text[email.start : email.end] == "maria@example.org"
    assert email.action is None
    assert set(email.to_dict()) == {"record", "field", "entity_type", "start", "end", "score", "action"}
    assert {f.name for f in dataclasses.fields(Finding)} == set(email.to_dict())
    assert "maria@example.org" not in repr(email)


def test_plain_tuples_and_empty_texts(scanner):
    assert scanner.scan([(1, "text", ""), (2, "text", "   ")]) == []
    assert [f.entity_type for f in scanner.scan([(3, "prompt", "ip 203.0.113.77")])] == ["IP_ADDRESS"]


def test_unknown_entity_type_is_an_error(scanner):
    with pytest.raises(InvalidRequestError) as info:
        scanner.scan([(1, "text", "x")], entities=["EMAIL"])
    assert info.value.param == "entities"
    assert "EMAIL" in info.value.message


def test_non_string_text_is_an_error(scanner):
    with pytest.raises(InvalidRequestError) as info:
        scanner.scan([(1, "text", None)])
    assert info.value.param == "text"


def test_iter_scan_is_lazy_and_bounded(scanner):
    consumed = 0

    def endless():
        nonlocal consumed
        for i in itertools.count():
            consumed += 1
            yield ScanUnit(i, "text", f"Call Maria Kowalczyk, ticket {i}")

    findings = scanner.iter_scan(endless())
    first = list(itertools.islice(findings, 3))
    assert [f.record for f in first] == [0, 1, 2]
    assert consumed <= scanner.batch_size


def test_long_text_is_segmented_for_ner_and_offsets_stay_right(scanner):
    filler = "The quarterly figures are attached for review. " * (NER_SEGMENT_CHARS // 40)
    text = filler + "Please call Ngozi Okonkwo about it. " + filler + "key AKIAQ3EGRX5BLWZ7TY4P"
    found = {(f.entity_type, text[f.start : f.end]) for f in scanner.scan([ScanUnit(0, "text", text)])}
    assert found == {("PERSON", "Ngozi Okonkwo"), ("AWS_ACCESS_KEY_ID", "AKIAQ3EGRX5BLWZ7TY4P")}


def test_default_entities():
    assert "LOCATION" not in DEFAULT_ENTITIES
    assert DEFAULT_ENTITIES < SUPPORTED_ENTITIES
