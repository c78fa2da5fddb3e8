"""The dataset quality report, computed at upload beside the scan.

:class:`QualityPass` is fed the stored (policy-redacted) records batch by batch
by the intake pipeline and keeps only counts, lengths and fixed-size sketches:

* record and token counts (with the chosen base model's tokenizer; characters when there is none),
  the length distribution and how many records ``max_seq_length`` would cut;
* exact duplicates (a digest of each record, its text normalised for case and spacing) and near
  duplicates (MinHash over byte 5-grams, 64 permutations, 16 LSH bands of 4 rows; a candidate pair
  counts when at least 80 % of the signature agrees);
* empty or one-sided conversations and role-order problems of chat records;
* the language mix (see :func:`detect_language`: what it can and cannot tell).

The summary holds counts, 1-based line numbers, 0-based stored record indices, a histogram and
language codes, never text. The per-record digests and signatures (the *sketch*, for leakage
between a training and a validation/test file, :func:`leakage`) are only ever stored inside an
encrypted blob of the file, shredded with it.
"""

from __future__ import annotations

import hashlib
import io
import re
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.scanning import iter_text_fields

VERSION = 1
NUM_PERM, BANDS = 64, 16
ROWS = NUM_PERM // BANDS
SHINGLE = 5
#: Estimated Jaccard similarity from which two records are near duplicates.
NEAR_THRESHOLD = 0.8
#: Records sketched for near duplicates and leakage (272 bytes each, so at most 54 MB); the other figures
#: cover every record (8 bytes each for exact duplicates, 8 for lengths and lines).
MAX_SKETCH_RECORDS = 200_000
#: Line numbers and example groups kept per problem.
MAX_LINES, MAX_EXAMPLES = 20, 5
#: ``max_seq_length`` assumed when none is given (the jobs' ``auto`` cap).
DEFAULT_MAX_SEQ_LENGTH = 2048
_rng = np.random.default_rng(0x5EED)  # fixed: sketches of two files must be comparable
_PERM_A = (_rng.integers(1, 2**63 - 1, NUM_PERM, dtype=np.uint64) | np.uint64(1))
_PERM_B = _rng.integers(0, 2**63 - 1, NUM_PERM, dtype=np.uint64)
_BAND_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5],
                     dtype=np.uint64)


# -- language ------------------------------------------------------------------------------------
_STOPWORDS = {
    "en": "the and of to is in that it for you with this are on be was have not what can",
    "de": "der die und das ist nicht ich sie mit den ein eine zu auf für auch sich dem wir",
    "fr": "le la les et est des une que pour dans pas vous qui sur sont avec ce nous il",
    "es": "el la los las que de y es en por para una con no se del como pero está",
    "it": "il di che non è per una sono della con gli le del questo come anche ci",
    "pt": "o os que de não uma para com é do da em se por mais você são isso",
    "nl": "de het een en van is dat niet ik je zijn op te met voor er maar ook",
    "pl": "nie się że jest na do to jak w z co ale jestem tak są dla czy",
    "sv": "och att det är som en på för med inte jag har till av den om vi",
    "tr": "ve bir bu da de için ne ile çok ama gibi daha var olarak mi değil",
}
_WORD_LANGS: dict[str, list[str]] = {}
for _lang, _words in _STOPWORDS.items():
    for _w in _words.split():
        _WORD_LANGS.setdefault(_w, []).append(_lang)
#: Scripts that name a language (or a family) by themselves.
_SCRIPTS = [
    ("ja", re.compile(r"[\u3040-\u30ff]")), ("ko", re.compile(r"[\uac00-\ud7af]")),
    ("zh", re.compile(r"[\u4e00-\u9fff]")), ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")), ("he", re.compile(r"[\u0590-\u05ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")), ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
]
_NON_LATIN = re.compile(r"[^\W\d_\u0000-\u036f]")
_WORD = re.compile(r"[^\W\d_]+")
#: Characters of a record looked at for its language.
_LANG_SAMPLE = 1000


def detect_language(text: str) -> str:
    """The language code of a text, from its script or its most common function words; ``und`` when unclear.

    It tells the 10 Latin-script languages of ``_STOPWORDS`` apart by their commonest words, and Japanese,
    Korean, Chinese, Arabic, Hebrew, Greek, Hindi and Thai by their script; Cyrillic counts as ``ru``
    (Ukrainian, Bulgarian... too), Arabic script as ``ar`` (Persian, Urdu too), Devanagari as ``hi``. It
    cannot tell languages it has no profile of (they show as ``und`` or as a close neighbour), nor a text
    of fewer than a handful of words, nor code (``und`` when no function word is found).
    """
    sample = text[:_LANG_SAMPLE]
    words = _WORD.findall(sample.lower())
    if not words:
        return "und"
    if not sample.isascii():
        other = "".join(_NON_LATIN.findall(sample))
        if len(other) * 3 >= sum(map(len, words)):  # a third of the letters in a script of its own
            found = [lang for lang, pattern in _SCRIPTS if len(pattern.findall(other)) * 3 >= len(other)]
            if found:
                return "ja" if "ja" in found or (found[0] == "zh" and _SCRIPTS[0][1].search(other)) else found[0]
    votes: Counter[str] = Counter()
    for word in words[:300]:
        for lang in _WORD_LANGS.get(word, ()):
            votes[lang] += 1
    if not votes:
        return "und"
    (best, n), *rest = votes.most_common(2) + [("", 0)]
    return best if n >= 2 and n > rest[0][1] else "und"


# -- tokens --------------------------------------------------------------------------------------
@dataclass
class TokenCounter:
    """Counts tokens of record texts with a base model's tokenizer.

    Args:
        model: The base model's name (shown in the report).
        tokenizer: A transformers tokenizer.
        context_length: The model's context (``max_position_embeddings``), if known.
    """

    model: str
    tokenizer: Any
    context_length: int | None = None

    def __post_init__(self) -> None:
        # A chat message costs its content plus the template's markup (role, separators): measured once.
        self.per_message = 0
        if getattr(self.tokenizer, "chat_template", None):
            try:
                one = self.tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=True)
                self.per_message = len(one)
            except Exception:  # noqa: BLE001 - a template that needs more than one message: no markup counted
                self.per_message = 0

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            # the Rust tokenizer, in parallel over the batch, without the offsets nobody reads here
            return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        ids = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(x) for x in ids]


# -- the pass ------------------------------------------------------------------------------------
def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


class QualityPass:
    """Accumulates the quality report of one file, batch by batch (see the module docstring).

    Args:
        tokens: Counts tokens with the chosen base model; ``None``: lengths in characters and the
            report says why (``tokenizer_note``).
        max_seq_length: The length the report checks records against (in tokens; in characters
            when there is no tokenizer, which the report says).
        tokenizer_note: Why there is no tokenizer (shown in the report).
    """

    def __init__(self, *, tokens: TokenCounter | None = None, max_seq_length: int | None = None,
                 tokenizer_note: str | None = None) -> None:
        self.tokens, self.tokenizer_note = tokens, tokenizer_note
        context = tokens.context_length if tokens is not None else None
        self.max_seq_length = max_seq_length or min(DEFAULT_MAX_SEQ_LENGTH, context or DEFAULT_MAX_SEQ_LENGTH)
        self.records = 0
        self.kinds: Counter[str] = Counter()
        self.total_tokens = 0
        self.total_chars = 0
        self.lengths = array("I")
        self.over_lines: list[int] = []
        self.over = 0
        self.problems: dict[str, list[Any]] = {}  # code -> [count, lines]
        self.languages: Counter[str] = Counter()
        self._keys = array("Q")  # 8 bytes of each record's digest: exact duplicates, counted at the end
        self._lines = array("I")  # 1-based line of each record
        self._digests: list[bytes] = []
        self._signatures: list[np.ndarray] = []
        self.sketched = 0

    # -- feeding ----------------------------------------------------------------------------------
    def add(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        """Add stored records, in order: ``(0-based line index, record)``."""
        docs: list[bytes] = []
        texts: list[str] = []
        owners: list[int] = []
        messages: list[int] = []
        for line_index, record in batch:
            index = self.records
            self.records += 1
            self._lines.append(line_index + 1)
            fields = [text for _, text in iter_text_fields(record)]
            n_messages = self._shape(record, line_index + 1)
            messages.append(n_messages)
            texts.extend(fields)
            owners.extend([len(docs)] * len(fields))
            chars = sum(len(t) for t in fields)
            self.total_chars += chars
            joined = "\x1e".join(_normal(t) for t in fields)
            doc = joined.encode()
            docs.append(doc)
            digest = hashlib.blake2b(doc, digest_size=16, person=b"appliance-qual1").digest()
            self._keys.append(int.from_bytes(digest[:8], "little"))
            self.languages[detect_language(" ".join(fields))] += 1
            if index < MAX_SKETCH_RECORDS:
                self._digests.append(digest)
        lengths = [0] * len(batch)
        if self.tokens is not None:
            for owner, n in zip(owners, self.tokens.count(texts), strict=True):
                lengths[owner] += n
            lengths = [n + m * self.tokens.per_message for n, m in zip(lengths, messages, strict=True)]
            self.total_tokens += sum(lengths)
        else:
            for owner, text in zip(owners, texts, strict=True):
                lengths[owner] += len(text)
        first_index = self.records - len(batch)
        for i, n in enumerate(lengths):
            self.lengths.append(n)
            if n > self.max_seq_length:
                self.over += 1
                if len(self.over_lines) < MAX_LINES:
                    self.over_lines.append(self._lines[first_index + i])
        room = MAX_SKETCH_RECORDS - self.sketched
        if room > 0:
            docs = docs[:room]
            self._signatures.append(minhash(docs))
            self.sketched += len(docs)

    def _problem(self, code: str, line: int) -> None:
        entry = self.problems.setdefault(code, [0, []])
        entry[0] += 1
        if len(entry[1]) < MAX_LINES:
            entry[1].append(line)

    def _shape(self, record: dict[str, Any], line: int) -> int:
        """Count the record's kind and its shape problems; its number of chat messages (0 if not chat)."""
        if "messages" in record:
            self.kinds["chat"] += 1
            messages = record["messages"]
            roles = [m["role"] for m in messages]
            filled = [bool(_content(m).strip()) for m in messages]
            if not any(filled):
                self._problem("empty_conversation", line)
            elif not any(f for r, f in zip(roles, filled, strict=True) if r == "user"):
                self._problem("no_user_message", line)
            elif not any(f for r, f in zip(roles, filled, strict=True) if r == "assistant"):
                self._problem("no_assistant_answer", line)
            if not all(filled) and any(filled):
                self._problem("empty_message", line)
            if "system" in roles[1:]:
                self._problem("system_not_first", line)
            turns = [r for r in roles if r != "system"]
            if turns and turns[0] not in ("user", "developer"):
                self._problem("starts_without_user", line)
            if any(a == b and a in ("user", "assistant") for a, b in zip(turns, turns[1:])):
                self._problem("repeated_role", line)
            if turns and turns[-1] != "assistant":
                self._problem("ends_without_answer", line)
            return len(messages)
        if "text" in record:
            self.kinds["text"] += 1
            if not record["text"].strip():
                self._problem("empty_conversation", line)
            return 0
        self.kinds["completion"] += 1
        if not record["prompt"].strip() and not record["completion"].strip():
            self._problem("empty_conversation", line)
        elif not record["prompt"].strip():
            self._problem("no_user_message", line)
        elif not record["completion"].strip():
            self._problem("no_assistant_answer", line)
        return 0

    # -- results ----------------------------------------------------------------------------------
    def signatures(self) -> np.ndarray:
        if not self._signatures:
            return np.zeros((0, NUM_PERM), dtype=np.uint32)
        return np.concatenate(self._signatures)

    def near_duplicates(self) -> tuple[int, list[list[int]]]:
        """How many sketched records nearly duplicate an earlier one (exact duplicates aside), and example pairs
        ``[earlier record, record]``."""
        sig = self.signatures()
        pairs = _near_pairs(sig, sig, same=True)
        if not len(pairs):
            return 0, []
        exact = np.array([self._digests[i] == self._digests[j] for i, j in pairs], dtype=bool)
        pairs = pairs[~exact]
        later = np.unique(pairs[:, 1])
        # a record counts once, against its earliest near twin
        order = np.lexsort((pairs[:, 0], pairs[:, 1]))
        pairs = pairs[order]
        firsts = pairs[np.r_[True, pairs[1:, 1] != pairs[:-1, 1]]] if len(pairs) else pairs
        return int(len(later)), firsts[:MAX_EXAMPLES].tolist()

    def exact_duplicates(self) -> tuple[int, int, list[tuple[list[int], int]]]:
        """How many records repeat an earlier one, in how many groups, and the largest groups'
        ``(first records, size)``."""
        keys = np.frombuffer(self._keys, dtype=np.uint64)
        if not len(keys):
            return 0, 0, []
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        groups = np.nonzero(counts > 1)[0]
        top = groups[np.lexsort((first[groups], -counts[groups]))][:MAX_EXAMPLES]  # most copies, then earliest
        examples = [(np.nonzero(inverse == g)[0][:MAX_EXAMPLES].tolist(), int(counts[g])) for g in top]
        return int(len(keys) - len(first)), int(len(groups)), examples

    def summary(self) -> dict[str, Any]:
        """The report: counts, lines, histogram and languages; advice per problem; never text."""
        lengths = np.frombuffer(self.lengths, dtype=np.uint32) if self.records else np.zeros(1, np.uint32)
        edges = [0] + [2 ** k for k in range(4, 17)]
        hist, _ = np.histogram(lengths, bins=edges + [max(int(lengths.max()) + 1, edges[-1] + 1)])
        near, near_pairs = self.near_duplicates()
        line = self._lines
        exact, exact_groups, exact_top = self.exact_duplicates()
        unit = "tokens" if self.tokens is not None else "characters"
        report: dict[str, Any] = {
            "version": VERSION,
            "records": self.records,
            "kinds": dict(sorted(self.kinds.items())),
            "characters": self.total_chars,
            "tokenizer": self.tokens.model if self.tokens is not None else None,
            "tokenizer_note": self.tokenizer_note,
            "tokens": self.total_tokens if self.tokens is not None else None,
            "length_unit": unit,
            "lengths": {
                "min": int(lengths.min()), "p50": int(np.percentile(lengths, 50)),
                "p90": int(np.percentile(lengths, 90)), "p99": int(np.percentile(lengths, 99)),
                "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1),
                "histogram": [{"from": lo, "to": hi, "records": int(n)}
                              for lo, hi, n in zip(edges, edges[1:] + [None], hist, strict=True) if n],
            },
            "max_seq_length": self.max_seq_length,
            "over_max_seq_length": {"count": self.over, "lines": self.over_lines},
            "exact_duplicates": {"count": exact, "groups": exact_groups,
                                 "examples": [{"records": records, "lines": [line[r] for r in records], "count": n}
                                              for records, n in exact_top]},
            "near_duplicates": {"count": near, "threshold": NEAR_THRESHOLD,
                                "examples": [{"records": p, "lines": [line[p[0]], line[p[1]]]} for p in near_pairs],
                                "checked_records": self.sketched},
            "problems": {code: {"count": n, "lines": lines} for code, (n, lines) in sorted(self.problems.items())},
            "languages": dict(self.languages.most_common()),
        }
        report["advice"] = advise(report)
        return report

    def sketch(self) -> bytes:
        """The per-record digests, signatures and lines, for leakage checks (store it encrypted only)."""
        out = io.BytesIO()
        digests = np.frombuffer(b"".join(self._digests), dtype=np.uint8).reshape(-1, 16)
        np.savez(out, version=np.array([VERSION]), digests=digests, signatures=self.signatures(),
                 lines=np.frombuffer(self._lines, dtype=np.uint32)[:self.sketched].copy())
        return out.getvalue()


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


# -- MinHash -------------------------------------------------------------------------------------
def minhash(docs: list[bytes]) -> np.ndarray:
    """``(len(docs), NUM_PERM)`` uint32 MinHash signatures of byte 5-gram sets, vectorised over the batch."""
    if not docs:
        return np.zeros((0, NUM_PERM), dtype=np.uint32)
    pad = b"\0" * SHINGLE  # no window of one record reaches the next
    buf = np.frombuffer(pad.join(docs) + pad, dtype=np.uint8).astype(np.uint64)
    sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    starts = np.concatenate(([0], np.cumsum(sizes + SHINGLE)[:-1]))
    counts = np.maximum(sizes, 1)  # an empty record is one (empty) shingle
    n = len(buf) - SHINGLE + 1
    shingles = buf[:n].copy()  # the 5 bytes at each position, as one integer
    for k in range(1, SHINGLE):
        shingles |= buf[k:n + k] << np.uint64(8 * k)
    # the window positions of every record, contiguous: [start, start + count)
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    shingles = shingles[np.repeat(starts - offsets, counts) + np.arange(counts.sum())]
    out = np.empty((NUM_PERM, len(docs)), dtype=np.uint64)
    step = 8  # permutations at a time: rows of (step, shingles) stay in cache
    for k in range(0, NUM_PERM, step):
        mixed = _PERM_A[k:k + step, None] * shingles[None, :]
        mixed += _PERM_B[k:k + step, None]
        mixed >>= np.uint64(32)
        out[k:k + step] = np.minimum.reduceat(mixed, offsets, axis=1)
    return out.T.astype(np.uint32)


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """``(len(sig), BANDS)`` uint64: one hash per band of ``ROWS`` signature values."""
    s = sig.astype(np.uint64).reshape(len(sig), BANDS, ROWS)
    return (s * _BAND_MIX[None, None, :ROWS]).sum(axis=2, dtype=np.uint64)


def _near_pairs(a: np.ndarray, b: np.ndarray, *, same: bool) -> np.ndarray:
    """``(n, 2)`` pairs ``[i in a, j in b]`` sharing a band and agreeing on ``NEAR_THRESHOLD`` of the signature;
    with ``same`` (``a is b``) only ``i < j``."""
    if not len(a) or not len(b):
        return np.zeros((0, 2), dtype=np.int64)
    keys_a = _band_keys(a)
    keys_b = keys_a if same else _band_keys(b)
    found = []
    for band in range(BANDS):
        ka, kb = keys_a[:, band], keys_b[:, band]
        order = np.argsort(ka, kind="stable")
        sorted_a = ka[order]
        pos = np.searchsorted(sorted_a, kb)  # the first (lowest index) record of a with the same key
        hit = (pos < len(sorted_a)) & (sorted_a[np.minimum(pos, len(sorted_a) - 1)] == kb)
        j = np.nonzero(hit)[0]
        i = order[pos[j]]
        if same:
            keep = i < j
            i, j = i[keep], j[keep]
        found.append(np.stack([i, j], axis=1))
    pairs = np.unique(np.concatenate(found), axis=0)
    if not len(pairs):
        return pairs
    agree = (a[pairs[:, 0]] == b[pairs[:, 1]]).mean(axis=1)
    return pairs[agree >= NEAR_THRESHOLD]


# -- leakage -------------------------------------------------------------------------------------
def load_sketch(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in ("digests", "signatures", "lines")}


def leakage(train: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Records of ``other`` (a validation or test file) that are in ``train`` exactly or nearly.

    Returns counts and example line pairs ``[line in train, line in other]``; never text.
    """
    train_keys = {bytes(d): i for i, d in reversed(list(enumerate(train["digests"])))}
    exact = [(train_keys[bytes(d)], j) for j, d in enumerate(other["digests"]) if bytes(d) in train_keys]
    exact_j = {j for _, j in exact}
    pairs = _near_pairs(train["signatures"], other["signatures"], same=False)
    near = [(int(i), int(j)) for i, j in pairs if int(j) not in exact_j]
    near_j = sorted({j for _, j in near})
    first_near = {}
    for i, j in near:
        first_near.setdefault(j, i)
    tl, ol = train["lines"], other["lines"]
    n_other = len(other["digests"])
    report = {
        "records": n_other,
        "exact": {"count": len(exact_j), "examples": [[int(tl[i]), int(ol[j])] for i, j in exact[:MAX_EXAMPLES]]},
        "near": {"count": len(near_j), "threshold": NEAR_THRESHOLD,
                 "examples": [[int(tl[first_near[j]]), int(ol[j])] for j in near_j[:MAX_EXAMPLES]]},
        "share": round((len(exact_j) + len(near_j)) / n_other, 4) if n_other else 0.0,
    }
    report["advice"] = (
        f"{len(exact_j) + len(near_j)} of {n_other} evaluation records also appear (exactly or nearly) in the "
        "training file: remove them from one of the two files, or the evaluation measures memory, not "
        "generalisation" if report["share"] else "no overlap found")
    return report


# -- advice --------------------------------------------------------------------------------------
_PROBLEM_ADVICE = {
    "empty_conversation": "records with no text at all: remove them (they teach nothing and waste steps)",
    "no_user_message": "answers without a question (no user turn, or an empty prompt): add the prompt, or use "
                       "plain-text records if the file is not meant as dialogue",
    "no_assistant_answer": "records whose answers are empty: remove them or write the answer",
    "empty_message": "records with empty messages: drop the empty turns",
    "system_not_first": "records with a system message after the first turn: move it to the start (chat "
                        "templates place it first)",
    "starts_without_user": "conversations that start with the assistant: add the user turn that prompts it",
    "repeated_role": "conversations with two user or two assistant turns in a row: merge them, or add the "
                     "missing turn between",
    "ends_without_answer": "conversations that end on a user turn: that last question is never answered, so "
                           "nothing is learnt from it; drop it or add the answer",
}


def advise(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``{code, count, severity, message}`` per problem found, saying what to do; none blocks by itself."""
    n = max(1, report["records"])
    out = []
    if report["tokens"] is None:
        out.append({"code": "no_tokenizer", "count": 0, "severity": "info",
                    "message": (report.get("tokenizer_note") or "no tokenizer") +
                    ": lengths are in characters, not tokens; upload with the form field `model` naming an "
                    "imported base model for token counts"})
    over = report["over_max_seq_length"]["count"]
    if over:
        out.append({"code": "over_max_seq_length", "count": over, "severity": "warning",
                    "message": f"{over} record{'s' if over != 1 else ''} longer than max_seq_length "
                               f"{report['max_seq_length']} {report['length_unit']}: training cuts them (the end "
                               "of the answer is lost); split them, shorten them or raise max_seq_length"})
    exact = report["exact_duplicates"]["count"]
    if exact:
        out.append({"code": "exact_duplicates", "count": exact, "severity": "warning" if exact / n > 0.05 else "info",
                    "message": f"{exact} record{'s repeat' if exact != 1 else ' repeats'} an earlier one (same text up to "
                               "case and spacing): remove the copies unless the repetition is meant as weighting"})
    near = report["near_duplicates"]["count"]
    if near:
        out.append({"code": "near_duplicates", "count": near, "severity": "warning" if near / n > 0.1 else "info",
                    "message": f"{near} record{'s nearly repeat' if near != 1 else ' nearly repeats'} an earlier one (≥ "
                               f"{int(NEAR_THRESHOLD * 100)} % of 5-grams shared): keep the best of each group so "
                               "the model does not over-learn one phrasing"})
    for code, entry in report["problems"].items():
        out.append({"code": code, "count": entry["count"],
                    "severity": "info" if code in ("empty_message", "system_not_first") else "warning",
                    "message": f"{_PROBLEM_ADVICE[code][0].upper()}{_PROBLEM_ADVICE[code][1:]} "
                               f"({entry['count']} of {report['records']})"})
    langs = {k: v for k, v in report["languages"].items() if k != "und"}
    if len(langs) > 1:
        main, count = max(langs.items(), key=lambda kv: kv[1])
        if count / n < 0.9:
            out.append({"code": "language_mix", "count": n - count, "severity": "info",
                        "message": f"{n - count} of {n} records are not in the main language ({main}): check the mix is "
                                   "intended and matches what the model will be asked"})
    return out
