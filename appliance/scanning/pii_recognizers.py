"""Recognisers for personal data found by patterns, checksums and validation.

Where presidio's own recogniser is good we wrap it (email, IP address, NHS
and SSN checks) behind a cheap trigger so that most texts skip it. Where it is
slow, noisy or leaky we replace it:

* phone numbers: presidio runs ``phonenumbers.PhoneNumberMatcher`` over the
  whole text once per region (8 passes). We find phone-shaped candidates with
  one regex and ask ``phonenumbers`` to validate only those.
* credit cards: presidio's regex misses Amex's 4-6-5 grouping and 19-digit
  cards; ours takes any 12-19 digit run with single separators, then Luhn
  and a known issuer prefix.
* IBANs: presidio's per-country formats, but a capitalised word after the
  IBAN no longer hides it, and a failed check is not logged with the value.
* UK NHS numbers (any 10 digits passing mod 11) need the word "NHS" nearby.
* US SSNs without separators (any 9 digits) need "SSN"/"social security" nearby.
* US driver licences (12 capital letters), bank numbers (any 8-17 digits) and
  the like are not looked for at all.
"""

from __future__ import annotations

import functools
import re

import phonenumbers
import tldextract
import appliance.scanning._presidio  # noqa: F401, I001 - first: presidio without transformers
from presidio_analyzer import LocalRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import (
    EmailRecognizer,
    IpRecognizer,
    NhsRecognizer,
    UsSsnRecognizer,
)
from presidio_analyzer.predefined_recognizers.generic.iban_patterns import regex_per_country

@functools.cache
def offline_tld_extract() -> tldextract.TLDExtract:
    """tldextract on its bundled public suffix list snapshot.

    Nothing is ever downloaded (the default extractor fetches the list on first
    use) and no cache is written to the home directory.
    """
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


_SENTENCE_END = re.compile(r"(\w*)[.!?]\s|\n")
_ABBREVIATIONS = frozenset({"no", "nr", "tel", "ph", "mob", "ext", "fax", "dr", "mr", "mrs", "ms", "st", "approx", "ref", "acct", "e.g", "i.e"})


def _context_before(text: str, start: int, pattern: re.Pattern[str], window: int) -> bool:
    """Whether ``pattern`` occurs in the ``window`` characters before ``start``, in the same sentence and line.

    Context from the previous sentence ("reach me at ... . Order 7683100280")
    does not count; a period after an abbreviation ("NHS no. ...") does not end one.
    """
    lo = max(0, start - window)
    for m in _SENTENCE_END.finditer(text, lo, start):
        if m.group(0) == "\n" or m.group(1).lower() not in _ABBREVIATIONS:
            lo = m.end()
    return pattern.search(text, lo, start) is not None


# Top-level labels that are not on the public suffix list but end the domains of
# real addresses on-prem: reserved by RFC 2606 and RFC 6761 (example, test,
# invalid, localhost), mDNS's special-use .local (RFC 6762, in the RFC 6761
# registry), home.arpa (RFC 8375; arpa itself is on the list), .internal
# (reserved by ICANN for private use in 2024), and the labels in common
# internal use (corp and home: ICANN name-collision strings never delegated).
# Compared case-insensitively against the last label(s) of the domain.
INTERNAL_EMAIL_TLDS: tuple[str, ...] = (
    "example", "test", "invalid", "localhost", "local", "internal", "corp", "lan", "home", "home.arpa",
    "localdomain", "intranet", "private",
)
_INTERNAL_ENDINGS = tuple("." + label for label in INTERNAL_EMAIL_TLDS)


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's email recogniser, validating domains against the bundled suffix list.

    Domains ending in a reserved or internal label (:data:`INTERNAL_EMAIL_TLDS`,
    e.g. ``ops@build01.local``) are accepted too. Presidio's pattern needs a dot
    in the domain, so a bare host (``root@localhost``) is never a candidate.
    """

    def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):  # noqa: D102
        if "@" not in text:
            return []
        return super().analyze(text, entities, nlp_artifacts, regex_flags)

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        # A known public suffix is enough: presidio's fqdn check rejects real
        # addresses at domains that are themselves suffixes (x@aparecida.br).
        domain = pattern_text.rsplit("@", 1)[-1]
        if domain.lower().endswith(_INTERNAL_ENDINGS):
            return True
        return offline_tld_extract()(domain).suffix != ""


_IBAN_CANDIDATE = re.compile(r"(?<![A-Z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{1,4}){3,9}(?![A-Z0-9])")
_IBAN_FORMATS = {cc: re.compile(rx.replace("[ ]?", "") + "$") for cc, rx in regex_per_country.items()}


def iban_valid(compact: str) -> bool:
    """Whether ``compact`` (no separators) is an IBAN: the country's format and the mod-97 check."""
    fmt = _IBAN_FORMATS.get(compact[:2])
    if fmt is None or not fmt.match(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


class IbanCodeRecognizer(LocalRecognizer):
    """IBANs, plain or grouped: presidio's per-country formats plus the mod-97 check.

    Unlike presidio's recogniser, a capitalised word right after the IBAN
    (``ES73 5873 ... 0233 SLACK``) does not hide it: trailing groups are
    dropped until the rest validates. Nothing is logged about candidates.
    """

    def __init__(self) -> None:
        super().__init__(supported_entities=["IBAN_CODE"], name="IbanCodeRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        results = []
        for m in _IBAN_CANDIDATE.finditer(text):
            value = m.group(0)
            while len(value) >= 15:
                if iban_valid(value.replace(" ", "").replace("-", "")):
                    results.append(RecognizerResult("IBAN_CODE", m.start(), m.start() + len(value), 1.0))
                    break
                cut = max(value.rfind(" "), value.rfind("-"))
                value = value[:cut] if cut > 0 else ""
        return results


_IPV4_TRIGGER = re.compile(r"\d\.\d{1,3}\.\d")
_IPV6_TRIGGER = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}")
_VERSION_BEFORE = re.compile(r"(?i)\b(?:v|version|release|build|ver\.?)\s*$")


class GatedIpRecognizer(IpRecognizer):
    """Presidio's IP recogniser (pattern + ``ipaddress`` validation), skipping version numbers."""

    def analyze(self, text, entities, nlp_artifacts=None, regex_flags=None):  # noqa: D102
        if not (_IPV4_TRIGGER.search(text) or ("::" in text or _IPV6_TRIGGER.search(text))):
            return []
        results = super().analyze(text, entities, nlp_artifacts, regex_flags)
        kept = []
        for r in results:
            if _VERSION_BEFORE.search(text, max(0, r.start - 10), r.start):
                continue
            r.score = max(r.score, 0.6)
            kept.append(r)
        return kept


_NHS_CONTEXT = re.compile(r"(?i)\bnhs\b")
_NHS_CHECK = NhsRecognizer()


class NhsNumberRecognizer(LocalRecognizer):
    """UK NHS numbers: 10 digits passing mod 11, *and* "NHS" within 60 characters before."""

    PATTERN = re.compile(r"(?<![\d-])(\d{3})([ -]?)(\d{3})\2(\d{4})(?![\d-])")

    def __init__(self) -> None:
        super().__init__(supported_entities=["UK_NHS"], name="NhsNumberRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        if "nhs" not in text.lower():
            return []
        results = []
        for m in self.PATTERN.finditer(text):
            if _NHS_CHECK.validate_result(m.group(0)) and _context_before(text, m.start(), _NHS_CONTEXT, 60):
                results.append(RecognizerResult("UK_NHS", m.start(), m.end(), 0.85))
        return results


_SSN_CONTEXT = re.compile(r"(?i)\bssn|social[ -]security|\bsocial\b|\bss#")
_SSN_CHECK = UsSsnRecognizer()


class SsnRecognizer(LocalRecognizer):
    """US SSNs: ``123-45-6789`` / ``123 45 6789`` anywhere, bare nine digits only after "SSN" or "social security"."""

    GROUPED = re.compile(r"(?<![\d-])\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
    BARE = re.compile(r"(?<![\d-])\d{9}(?![\d-])")

    def __init__(self) -> None:
        super().__init__(supported_entities=["US_SSN"], name="SsnRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        results = []
        for m in self.GROUPED.finditer(text):
            if not _SSN_CHECK.invalidate_result(m.group(0)):
                score = 0.85 if _context_before(text, m.start(), _SSN_CONTEXT, 60) else 0.6
                results.append(RecognizerResult("US_SSN", m.start(), m.end(), score))
        for m in self.BARE.finditer(text):
            if not _SSN_CHECK.invalidate_result(m.group(0)) and _context_before(text, m.start(), _SSN_CONTEXT, 40):
                results.append(RecognizerResult("US_SSN", m.start(), m.end(), 0.8))
        return results


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes of the card networks (Visa, Mastercard, Amex, Discover, JCB
# including its old 2131/1800 ranges, Diners, Maestro including UK 0604,
# UnionPay, Mir): a Luhn-valid number elsewhere is most
# likely an order or tracking number.
_ISSUER = re.compile(r"^(?:4|5[0-8]|2[2-7]|3[4-9]|30|6|220[0-4]|2131|1800|0604)")
_CARD_CONTEXT = re.compile(r"(?i)card|visa|master|amex|credit|debit|maestro|discover|jcb|diners|\bcc\b|charged|payment")


class CreditCardNumberRecognizer(LocalRecognizer):
    """Card numbers: 12-19 digits in groups, Luhn-valid, with a card network's prefix."""

    PATTERN = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){11,18}(?![\d])")

    def __init__(self) -> None:
        super().__init__(supported_entities=["CREDIT_CARD"], name="CreditCardNumberRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        results = []
        for m in self.PATTERN.finditer(text):
            value = m.group(0)
            if value[-1] in " -":
                continue
            digits = value.replace(" ", "").replace("-", "")
            separators = {c for c in value if c in " -"}
            if len(separators) > 1 or not _ISSUER.match(digits) or not luhn_valid(digits):
                continue
            if len(set(digits)) < 2:
                continue
            score = 0.95 if _context_before(text, m.start(), _CARD_CONTEXT, 60) else 0.8
            results.append(RecognizerResult("CREDIT_CARD", m.start(), m.end(), score))
        return results


_PHONE_CONTEXT = re.compile(
    r"(?i)phone|mobile|\bcell|\btel\b|tel\.|\bcall|\bring\b|\btext\b|whats ?app|\bfax|hotline|contact|reach|voicemail|sms"
)


# Dates (2024-05-01, 01.05.2024, 5/1/24) and dotted quads (IPs, versions).
_NOT_A_PHONE = re.compile(
    r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}|\d{1,3}(?:\.\d{1,3}){2,3})$"
)


_PUNCTUATION = re.compile(r"[\s().\-/]")
_DIGIT_GROUPS = re.compile(r"\d+")


@functools.lru_cache(maxsize=65536)
def _valid_phone(candidate: str, regions: tuple[str, ...]) -> bool:
    """Whether ``candidate`` (punctuation removed) is a valid number, internationally or in one of ``regions``."""
    if candidate.startswith(("+", "00")):
        try:
            number = phonenumbers.parse("+" + candidate[2:] if candidate.startswith("00") else candidate, None)
        except phonenumbers.NumberParseException:
            return False
        return phonenumbers.is_valid_number(number)
    for region in regions:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(candidate, region)):
                return True
        except phonenumbers.NumberParseException:
            continue
    return False


class PhoneNumberRecognizer(LocalRecognizer):
    """Phone numbers: one regex for candidates, ``phonenumbers`` to validate each.

    A number written internationally (``+44 ...``, ``0044 ...``) is validated on
    its own; a national one must be valid in one of ``regions``. A bare run of
    digits counts only with a phone-ish word shortly before it, since order
    numbers and the like are otherwise indistinguishable.

    Args:
        regions: Regions tried for numbers written without a country code.
    """

    DEFAULT_REGIONS = ("US", "GB", "DE", "FR", "IN", "ES", "IT", "NL", "BR", "PL", "CA", "AU", "IE", "CH", "AT", "BE")
    CANDIDATE = re.compile(
        r"(?<![\w+/.-])(?:\+|00)?\(?\d[\d ()./-]{5,20}\d(?:\s*(?:x|ext\.?)\s*\d{1,5})?(?![\w/-]|\.\d)"
    )

    def __init__(self, regions: tuple[str, ...] = DEFAULT_REGIONS) -> None:
        self.regions = regions
        super().__init__(supported_entities=["PHONE_NUMBER"], name="PhoneNumberRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def _valid(self, candidate: str) -> bool:
        digits = sum(c.isdigit() for c in candidate)
        if digits < 7 or digits > 16:
            return False
        return _valid_phone(_PUNCTUATION.sub("", candidate), self.regions)

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        results = []
        # Validating a national number tries every region; bound that work on
        # digit-dense text (tables, dumps). Numbers after a phone word are always checked.
        budget = 64 + len(text) // 64
        for m in self.CANDIDATE.finditer(text):
            value = m.group(0)
            if value.count("(") != value.count(")") or value.count(".") > 4 or _NOT_A_PHONE.match(value):
                continue
            groups = _DIGIT_GROUPS.findall(value)
            # Phones are written in a few groups, mostly of two or more digits (a
            # short country, trunk or area code aside: "+33 (0)4 22 60 06 69");
            # "1 2 3 4 5 6 7" is a list, not a number.
            if len(groups) > 8 or sum(len(g) == 1 for g in groups) > 2:
                continue
            context = _context_before(text, m.start(), _PHONE_CONTEXT, 50)
            grouped = value.startswith(("+", "(")) or any(c in value for c in " -.()")
            if not grouped and not context:
                continue
            if _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
                continue
            if not context:
                if budget <= 0:
                    continue
                budget -= 1
            if not self._valid(value):
                continue
            results.append(RecognizerResult("PHONE_NUMBER", m.start(), m.end(), 0.8 if context else 0.6))
        return results


def build_pii_recognizers() -> list[LocalRecognizer]:
    """Fresh instances of every pattern-based PII recogniser."""
    return [
        OfflineEmailRecognizer(),
        PhoneNumberRecognizer(),
        CreditCardNumberRecognizer(),
        IbanCodeRecognizer(),
        SsnRecognizer(),
        GatedIpRecognizer(),
        NhsNumberRecognizer(),
    ]
