"""PERSON and LOCATION from spaCy's NER."""

from __future__ import annotations

from typing import NamedTuple

from presidio_analyzer import LocalRecognizer, RecognizerResult

#: spaCy OntoNotes labels reported as LOCATION.
LOCATION_LABELS = frozenset({"GPE", "LOC", "FAC"})


class NerSpan(NamedTuple):
    """An entity span from the NER model, in the scanned text's offsets."""

    start: int
    end: int
    label: str


class NerRecognizer(LocalRecognizer):
    """Maps NER spans to PERSON and LOCATION findings."""

    NER_SCORE = 0.85

    def __init__(self) -> None:
        super().__init__(supported_entities=["PERSON", "LOCATION"], name="NerRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        spans = [NerSpan(e.start_char, e.end_char, e.label_) for e in getattr(nlp_artifacts, "entities", [])]
        return self.analyze_spans(text, spans, frozenset(entities))

    def analyze_spans(self, text: str, spans: list[NerSpan], wanted: frozenset[str]) -> list[RecognizerResult]:
        """Findings for the wanted types among ``spans``."""
        results = []
        for span in spans:
            if span.label == "PERSON" and "PERSON" in wanted:
                results.append(RecognizerResult("PERSON", span.start, span.end, self.NER_SCORE))
            elif span.label in LOCATION_LABELS and "LOCATION" in wanted:
                results.append(RecognizerResult("LOCATION", span.start, span.end, self.NER_SCORE))
        return results
