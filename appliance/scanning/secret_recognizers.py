"""Recognisers for credentials: cloud keys, VCS and chat tokens, keys, JWTs.

Stock presidio finds none of these. Each recogniser is a presidio
:class:`~presidio_analyzer.LocalRecognizer` built from a stdlib regex, an
optional cheap substring trigger (so most texts skip the regex entirely), an
optional context requirement (text that must appear shortly before the match,
for formats that are otherwise just random characters) and an optional value
check (entropy, placeholders).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import appliance.scanning._presidio  # noqa: F401, I001 - first: presidio without transformers
from presidio_analyzer import LocalRecognizer, RecognizerResult

#: Shannon entropy, in bits per character, a ``password=``-style value needs to
#: count as a secret. Random 8+ character passwords and tokens are above it;
#: words, identifiers and most placeholders are below.
GENERIC_SECRET_MIN_ENTROPY = 3.0


def shannon_entropy(value: str) -> float:
    """Bits per character of ``value``'s character distribution (0 for empty)."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


class RegexRecognizer(LocalRecognizer):
    """One entity type from one or more stdlib regexes.

    Args:
        entity: The entity type reported.
        patterns: Compiled regexes; the span reported is ``group`` of each match.
        score: Score of a match that passes every check.
        triggers: Substrings of which at least one must occur in the text for
            the regexes to run at all (case-sensitive); empty means always run.
        itriggers: The same, matched against the lower-cased text.
        context: A regex that must match within ``context_window`` characters
            before the match (case-insensitive); ``None`` means no requirement.
        check: A predicate on the matched value; ``False`` drops the match.
        group: Which regex group is the entity (0 for the whole match).
    """

    def __init__(
        self,
        entity: str,
        patterns: Sequence[re.Pattern[str]],
        score: float,
        *,
        triggers: Sequence[str] = (),
        itriggers: Sequence[str] = (),
        context: re.Pattern[str] | None = None,
        context_window: int = 80,
        check: Callable[[str], bool] | None = None,
        group: int | str = 0,
        name: str | None = None,
    ) -> None:
        self.patterns = list(patterns)
        self.score = score
        self.triggers = tuple(triggers)
        self.itriggers = tuple(itriggers)
        self.context_re = context
        self.context_window = context_window
        self.check = check
        self.group = group
        super().__init__(supported_entities=[entity], name=name or f"{entity.title().replace('_', '')}Recognizer")

    def load(self) -> None:  # noqa: D102 - nothing to load
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list[RecognizerResult]:  # noqa: D102
        if self.triggers and not any(t in text for t in self.triggers):
            return []
        if self.itriggers:
            lowered = text.lower()
            if not any(t in lowered for t in self.itriggers):
                return []
        entity = self.supported_entities[0]
        results = []
        for pattern in self.patterns:
            for match in pattern.finditer(text):
                start, end = match.span(self.group)
                if start < 0 or start == end:
                    continue
                if self.check is not None and not self.check(match.group(self.group)):
                    continue
                if self.context_re is not None and not self.context_re.search(
                    text, max(0, start - self.context_window), start
                ):
                    continue
                results.append(RecognizerResult(entity, start, end, self.score))
        return results


_B64 = r"A-Za-z0-9+/"

# --------------------------------------------------------------------------- AWS

AWS_ACCESS_KEY_ID = RegexRecognizer(
    "AWS_ACCESS_KEY_ID",
    [re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z2-7]{16}(?![A-Za-z0-9])")],
    0.95,
    triggers=("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "ABIA", "ACCA"),
)


def _looks_random_b64(value: str) -> bool:
    mixed_case = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return mixed_case and shannon_entropy(value) >= 4.0


# A secret access key is 40 base64 characters: indistinguishable from any other
# random string without context, so some must precede it.
AWS_SECRET_ACCESS_KEY = RegexRecognizer(
    "AWS_SECRET_ACCESS_KEY",
    [re.compile(rf"(?<![{_B64}])[{_B64}]{{40}}(?![{_B64}=])")],
    0.85,
    context=re.compile(r"(?i)secret[_ -]?access[_ -]?key|aws.{0,30}(?:secret|key)|AKIA|ASIA"),
    context_window=120,
    check=_looks_random_b64,
)

# --------------------------------------------------------------------------- GCP, Azure

GCP_API_KEY = RegexRecognizer(
    "GCP_API_KEY",
    [re.compile(r"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])")],
    0.95,
    triggers=("AIza",),
)

AZURE_STORAGE_KEY = RegexRecognizer(
    "AZURE_STORAGE_KEY",
    [
        # In a connection string: AccountKey=...; or SharedAccessKey=...;
        re.compile(rf"(?i)(?:AccountKey|SharedAccessKey)\s*=\s*([{_B64}]{{30,}}={{0,2}})"),
        # A bare storage account key: 64 random bytes in base64, next to a hint.
        re.compile(rf"(?<![{_B64}])([{_B64}]{{86}}==)(?![{_B64}=])"),
    ],
    0.9,
    context=re.compile(r"(?i)azure|storage|account[_ -]?key|access[_ -]?key|accountkey|sharedaccesskey"),
    context_window=100,
    check=_looks_random_b64,
    group=1,
)

# --------------------------------------------------------------------------- VCS, chat

GITHUB_TOKEN = RegexRecognizer(
    "GITHUB_TOKEN",
    [
        re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9_])"),
        re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{60,251}(?![A-Za-z0-9_])"),
    ],
    0.95,
    triggers=("gh", "github_pat_"),
)

GITLAB_TOKEN = RegexRecognizer(
    "GITLAB_TOKEN",
    [re.compile(r"(?<![A-Za-z0-9_-])gl(?:pat|ptt|dt|rt|oas|cbt|imt|agent|ft)-[A-Za-z0-9_\-.]{20,}")],
    0.95,
    triggers=("gl",),
)

SLACK_TOKEN = RegexRecognizer(
    "SLACK_TOKEN",
    [
        re.compile(r"(?<![A-Za-z0-9])xox[abposer]-[A-Za-z0-9-]{10,}"),
        re.compile(r"(?<![A-Za-z0-9])xapp-\d-[A-Za-z0-9-]{10,}"),
        re.compile(r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/]{20,}"),
    ],
    0.95,
    triggers=("xox", "xapp-", "hooks.slack.com"),
)

# --------------------------------------------------------------------------- keys, JWT, ours

# Up to the END line, or to the end of the text when the block is cut off.
PRIVATE_KEY = RegexRecognizer(
    "PRIVATE_KEY",
    [
        re.compile(
            r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY((?: BLOCK)?)-----.*?(?:-----END \1PRIVATE KEY\2-----|\Z)",
            re.S,
        ),
        re.compile(r"PuTTY-User-Key-File-\d+:.*?Private-(?:Lines|MAC):[^\n]*", re.S),
    ],
    1.0,
    triggers=("PRIVATE KEY-----", "PRIVATE KEY BLOCK-----", "PuTTY-User-Key-File"),
)

JWT = RegexRecognizer(
    "JWT",
    [re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")],
    0.9,
    triggers=("eyJ",),
)

APPLIANCE_TOKEN = RegexRecognizer(
    "APPLIANCE_TOKEN",
    [re.compile(r"(?<![A-Za-z0-9])apl_[0-9a-f]{12}_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")],
    1.0,
    triggers=("apl_",),
)

# --------------------------------------------------------------------------- generic


_PLACEHOLDER_WORDS = ("example", "changeme", "change_me", "redacted", "placeholder", "your_", "your-", "xxxx", "****")
# ${VAR}, $VAR / $var (one case: "$XqWOlK9..." is a password), {{ var }}, <token>,
# %(name)s, %VAR%: templates, not values.
_TEMPLATE = re.compile(
    r"^(?:\$\{[^}]*\}?|\$[A-Z_][A-Z0-9_]*|\$[a-z_][a-z0-9_]*|\{\{.*|<[^>]*>?|%\(\w+\)[sd]?|%\w+%)$"
)
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:[\[(].*)?$")


def is_high_entropy_secret(value: str) -> bool:
    """Whether a credential-shaped assignment's value looks like a real secret.

    Rejects references (``os.environ[...]``, ``settings.KEY``), templated
    placeholders (``${API_KEY}``, ``<token>``, ``{{secret}}``), obvious dummies
    and low-entropy words; accepts values of at least 8 characters with two or
    more character classes (or 20+ characters) and entropy of at least
    :data:`GENERIC_SECRET_MIN_ENTROPY` bits per character (2.5 with three or
    more classes among lower, upper, digits and symbols).
    """
    value = value.strip("'\"`")
    if len(value) < 8 or _TEMPLATE.match(value):
        return False
    lowered = value.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS):
        return False
    if _REFERENCE.match(value) and not any(c.isdigit() for c in value):
        # settings.KEY, os.environ[...], get_secret(), DB_PASSWORD, refreshToken: code, not
        # a value. A long random mixed-case string can look like an identifier too.
        if any(c in value for c in ".([") or value.isupper() or value.islower() or shannon_entropy(value) < 3.5:
            return False
    classes = sum(
        (
            any(c.islower() for c in value),
            any(c.isupper() for c in value),
            any(c.isdigit() for c in value),
            any(not c.isalnum() for c in value),
        )
    )
    if classes < 2 and len(value) < 20:
        return False
    entropy = shannon_entropy(value)
    # Short random passwords repeat characters by chance, so their measured
    # entropy is low; three or more character classes make up for it.
    return entropy >= GENERIC_SECRET_MIN_ENTROPY or (classes >= 3 and entropy >= 2.5)


_KEYWORDS = (
    r"pass(?:word|wd|phrase)?|pwd|secret|api[_-]?key|apikey|access[_-]?key|auth[_-]?token|access[_-]?token"
    r"|refresh[_-]?token|token|credentials?|private[_-]?key|client[_-]?secret|signing[_-]?key"
)
GENERIC_SECRET = RegexRecognizer(
    "GENERIC_SECRET",
    [
        # key = value, key: value, "key": "value", key => value, key is value
        re.compile(
            rf"(?i)(?<![A-Za-z0-9])(?:[\w.-]{{0,40}}?[_.-])?(?:{_KEYWORDS})[\w.-]{{0,40}}?[\"']?"
            # A trailing "." or ")" stays in the value: passwords end in them too.
            r"(?:\s*(?:[:=]|=>|:=)\s*|\s+(?:is|was)\s+)[\"'`]?(?P<value>[^\s\"'`,;]{8,})"
        ),
        # mysql -p'secret' / -psecret
        re.compile(r"(?:mysql|mysqldump|mariadb|mysqladmin)\b[^\n]*?\s-p([\"']?)(?P<value>[^\s\"']{6,})\1(?=\s|$)"),
    ],
    0.8,
    itriggers=("pass", "pwd", "secret", "key", "token", "credential", "mysql", "mariadb"),
    check=is_high_entropy_secret,
    group="value",
)

SECRET_RECOGNIZERS: list[RegexRecognizer] = [
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    GCP_API_KEY,
    AZURE_STORAGE_KEY,
    GITHUB_TOKEN,
    GITLAB_TOKEN,
    SLACK_TOKEN,
    PRIVATE_KEY,
    JWT,
    APPLIANCE_TOKEN,
    GENERIC_SECRET,
]
