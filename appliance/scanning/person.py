"""PERSON (and opt-in LOCATION) detection: spaCy NER plus name lists and cue words.

spaCy's small English model is fast enough only if it runs on few texts, and
it misses many names (non-English names above all), so PERSON combines:

1. NER ``PERSON`` spans, minus those with digits or code characters, with
   words that are neither capitalised nor name particles (``Jira to
   Snowflake``), and lone dictionary words (the model tags ``Platform`` now
   and then).
2. Runs of capitalised words that look like a full name: a known given name
   followed by more capitalised words (``Maria Kowalczyk``), or a known
   surname after a word that is not an English dictionary word.
3. NER spans of other labels (``FAC``, ``GPE``, ``NORP``...) made only of
   two or more capitalised non-dictionary words (``Britt Meijer`` as FAC).
4. One capitalised word after a cue: an honorific (``Dr.``, ``Ms``, ``Herr``),
   a greeting or sign-off (``Hi``, ``Dear``, ``Thanks,``, ``Regards,``) or
   ``my name is`` / ``I'm`` / ``this is``, if it is a known given name or not
   an English word (``Dear Customer`` is not a name).
5. A lone known given name that is not a common English word (``ask James``);
   places named like people (``Georgia``) are the price.
6. One capitalised word that is a known name or not an English word in a
   context that takes a person: after a verb or phrase of contact or agency
   (``spoke with``, ``on behalf of``, ``approved by``, ``reply to``,
   ``complaint from``, ``ask``), a role noun (``my manager``, ``the account
   holder is``), or before a verb only people do (``said``, ``asked``,
   ``wants``), a ``who`` or a department (``from accounting``).
7. A lone capitalised word with letters outside ASCII (``Véronique``,
   ``Błażej``) that is no English word and that the model does not call a
   place or an organisation.

Then context decides, not capitalisation alone: a candidate in the context of a
thing rather than a person (``project X``, ``codename X``, ``the X team``,
``X 4.2``, ``X Pro``, ``the X cluster``, ``migrated from X to Y``, ``X's SDK``,
or anywhere after ``codename`` in its sentence) is not a person unless a
person cue says otherwise (an honorific, a greeting, the rule 6 contexts). A
single word that is both a name and an everyday word (``Willow``, ``Hunter``,
``Carter``, ``Aurora``, ``Delta``: ``data/name_words.txt``) needs a person cue
too. Company names (``Kessler Dynamics``, ``Lindgren & Voss``), a name between an
article and a noun (``the Otto refund flow``) and a name a definition calls a
thing (``Matilda is the backup job``) are things too. Such candidates keep a
low score (:attr:`NerRecognizer.THING_SCORE`, under every shipped threshold) so
that reports can still show them as dropped. Within one scan a name has one
meaning: a name context showed to be a thing is a thing wherever nothing says
otherwise (:meth:`appliance.scanning.engine.Scanner.iter_scan`).

NER only runs on texts that contain a *name-like* word: capitalised, not
CamelCase, and a known given name or not an English dictionary word. Texts
whose capitalised words are all dictionary words (``Please``, ``Finance``,
``Monday``) skip it, and elsewhere only a window of a few words around each
name-like word goes through the model. That is most of the speed-up over
running NER on everything. The price: a product or tool name the model calls
a person (``Grafana``) is reported as PERSON with a low score (0.65).

The name lists are the US Census 1990 given names and surnames (see
``data/README.md``); the dictionary is the WordNet-derived lemma index shipped
in the spaCy model's lemmatizer tables, plus spaCy's stop words.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import appliance.scanning._presidio  # noqa: F401, I001 - first: presidio without transformers
from presidio_analyzer import LocalRecognizer, RecognizerResult

logger = logging.getLogger(__name__)

_DATA = Path(__file__).resolve().parent / "data"

#: spaCy OntoNotes labels reported as LOCATION.
LOCATION_LABELS = frozenset({"GPE", "LOC", "FAC"})
#: NER labels that mislabelled names often get from the small model.
_MISLABEL_LABELS = frozenset({"FAC", "GPE", "LOC", "NORP", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE"})

# Lower-case words that may sit between capitalised parts of one name.
_PARTICLES = frozenset(
    {"van", "von", "der", "den", "de", "del", "della", "da", "di", "du", "dos", "das", "do", "la", "le", "ten", "ter", "bin", "ibn", "al", "y", "e"}
)

# Letters, with inner apostrophes and hyphens (O'Brien, Klaus-Jürgen) but not a possessive 's.
_WORD = re.compile(r"[^\W\d_]+(?:(?:['’](?!s\b)|-)[^\W\d_]+)*")
# A word standing on its own, not a fragment of a token, key, path or address.
_FREE_WORD = re.compile(r"(?<![\w/+=.@:-])[^\W\d_]+(?:(?:['’](?!s\b)|-)[^\W\d_]+)*(?![\w/+=@-]|[.:]\w)")
# CamelCase is code or a brand (PutObject, HubSpot); names with inner capitals are Mc/Mac/O'/De... forms.
_CAMEL = re.compile(r"^[A-Z][a-z]+[A-Z]")
_CAMEL_NAME = re.compile(r"^(?:Mc|Mac|O'|D'|De|Di|Da|Du|La|Le|Van|Von)[A-Z][a-z]+$")
_HONORIFIC = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Mx|Dr|Prof|Sr|Sra|Srta|Sig|Sig\.ra|Mme|Mlle|Herr|Frau|Hr|Fr|Dott|Dott\.ssa|Ing|Pan|Pani|Shri|Smt)\.?)\s+$"
)
_CUE = re.compile(
    r"(?i)(?:\b(?:hi|hello|hey|dear|thanks|thank you|cheers|regards|best|sincerely|greetings|attn|cc|"
    r"my name is|name is|i am|i'm|this is|call me|signed)[,:!.]?)\s+$"
)


# Rule 6: what comes right before a name. Lists of general English usage, not of any corpus.
_CONTACT_VERBS = (
    "spoke|speak|speaking|talked|talk|talking|met|meet|meeting|call|calls|chat|chatted|sync|synced|"
    "catch up|caught up|check|checked|discussed|discuss|agreed|work|worked|working|along|together"
)
_AGENT_VERBS = (
    "approved|signed|signed for|reported|requested|raised|opened|submitted|reviewed|written|sent|created|"
    "assigned|authori[sz]ed|handled|escalated|confirmed|placed|ordered|booked|paid|issued|filed|prepared|"
    "presented|hosted|led|managed|owned|received|accepted|rejected|checked|verified|delivered"
)
_TO_VERBS = (
    "assigned|escalated|forwarded|forward|reach out|reached out|talk|talked|speak|spoke|reply|replied|"
    "respond|responded|write|wrote|send it|sent it|give it|gave it|hand it|handed it|handed over|"
    "addressed|introduce me|introduced me|note|letter|message|email|e-mail|thanks|apologies|apologise|"
    "apologize|belongs|married|engaged|report|reports|reporting|goes|went"
)
_FROM_NOUNS = (
    "complaint|message|email|e-mail|letter|note|request|call|feedback|reply|response|invoice|order|"
    "greetings|regards|word|approval|visit|question|update|signature|go-ahead|standup|stand-up|notes|minutes|"
    "summary|recap|status|handover|handoff|comments|input|answer|thoughts|ok|okay|sign-off"
)
_ROLE_NOUNS = (
    "manager|colleague|boss|supervisor|co-?worker|teammate|assistant|lawyer|attorney|doctor|landlord|"
    "accountant|director|client|contact|friend|wife|husband|partner|son|daughter|mother|father|brother|"
    "sister|driver|courier|nurse|agent|advisor|adviser|consultant|intern|lead|team lead|new hire|hire|"
    "employee|engineer|developer|technician|representative|neighbour|neighbor|tenant|guest|customer|"
    "caller|patient|student|teacher|coach|ceo|cfo|cto|founder|owner|recruiter|candidate"
)
_HOLDER_NOUNS = (
    "holder|owner|contact|assignee|requester|requestor|sender|recipient|approver|reviewer|customer|"
    "applicant|patient|employee|tenant|beneficiary|signatory|representative|caller|user|buyer|seller|"
    "driver|courier|author|name|account name|guarantor|witness|policyholder|cardholder"
)
_PERSON_OBJECT_VERBS = (
    "ask|asked|tell|told|contact|contacted|ping|pinged|email|emailed|thank|thanked|cc|bcc|invite|invited|"
    "remind|reminded|inform|informed|notify|notified|called|phone|phoned|congratulate|congratulated|"
    "welcome|welcomed|introduce|introduced|hire|hired|pay|paid|refund|refunded|visit|visited|copy|"
    "promote|promoted|interview|interviewed|message|messaged|text|texted|let"
)
_CONTEXT_BEFORE = re.compile(
    rf"(?i)(?:\b(?:(?:{_CONTACT_VERBS})\s+with|on behalf of|according to|in the name of|care of|c/o|"
    rf"attention of|(?:{_AGENT_VERBS})\s+by|(?:{_TO_VERBS})\s+to|(?:{_FROM_NOUNS})\s+from|"
    rf"(?:{_HOLDER_NOUNS})\s+(?:is|was)|(?:{_PERSON_OBJECT_VERBS})|"
    rf"(?:my|our|your|his|her|their|new)\s+(?:{_ROLE_NOUNS}))[,:]?)\s+$"
)
# ...and what comes right after it: a verb only people do, or a department.
_HUMAN_VERBS = (
    "said|says|asked|asks|wants|wanted|wrote|writes|told|tells|thinks|thought|agreed|agrees|promised|"
    "explained|suggested|complained|complains|mentioned|insisted|replied|apologi[sz]ed|believes|feels|"
    "felt|hopes|prefers|recommended|decided|will present|is on leave|was on leave|is out|joined us|"
    "called|emailed|phoned|texted|signed off|approved|reported|confirmed|requested|noticed|tried|tries|"
    "attempted|forgot|remembered|logged in|resigned|retired|is on holiday|is travelling|is traveling|"
    "works remotely|who|whom"
)
_DEPARTMENTS = (
    "accounting|finance|procurement|purchasing|sales|marketing|legal|hr|human resources|support|it|"
    "engineering|security|operations|ops|payroll|billing|logistics|compliance|facilities|customer service|"
    "accounts payable|accounts receivable|treasury|tax|audit|reception|admissions|customs|product|design|"
    "research|quality|qa|devops|it support|the warehouse|the front desk|head office|"
    "the \\w+ team|our \\w+ team"
)
_CONTEXT_AFTER = re.compile(rf"(?i),?\s+(?:(?:{_HUMAN_VERBS})\b|(?:from|in|at) (?:{_DEPARTMENTS})\b)")

# Contexts of a thing (a product, project, codename, system, company, place), not a person. Right
# before the name...
_THING_NOUNS = (
    "project|codename|code name|code-named|codenamed|product|release|version|edition|feature|module|component|"
    "service|platform|app|application|tool|plugin|library|framework|programme|program|initiative|operation|"
    "cluster|server|tier|plan|package|brand|repo|repository|branch|environment|sku|model|system|engine|"
    "workstream|pipeline|dashboard|console|gateway|database|instance|region|stack|suite|api|sdk|queue"
)
_OF_NOUNS = (
    "demo|trial|version|release|instance|copy|licen[cs]e|upgrade|rollout|launch|migration|deployment|roadmap|"
    "pilot|beta|build|edition|tier|sunset|deprecation|support|adoption|customers|users|owners?"
)
_THING_BEFORE = re.compile(rf"(?i)(?:\b(?:{_THING_NOUNS})|\b(?:{_OF_NOUNS})\s+(?:of|for|on))\s+$")
# A single word where things are: "the servers in Austin", "hosted at Sierra" (not "loop in Kenji").
_PLACE_BEFORE = re.compile(
    r"(?i)\b(?:based|located|hosted|deployed|running|runs|stored|office|offices|site|sites|region|data ?cent(?:er|re)|"
    r"warehouse|cluster|servers?|lives?|living|headquartered|headquarters|hq|store|stores|plant|factory|depot|"
    r"branch|campus|conference|summit|event)\s+(?:in|at)\s+$"
)
# ...a move between systems: "migrated to Y", "switched from X to Y" (not "send the migration plan to Aisha").
_MOVE_VERBS = (r"migrat(?:e|ed|es|ing)|switch(?:ed|es|ing)?|upgrad(?:e|ed|es|ing)|transition(?:ed|s|ing)?|cut over|"
               r"fail(?:ed|s|ing)? over|replicat(?:e|ed|es|ing)")
_MOVE_BEFORE = re.compile(
    rf"(?i)\b(?:(?:{_MOVE_VERBS})\s+(?:[\w-]+\s+){{0,3}}?(?:from|to|onto|into)|"
    rf"(?:{_MOVE_VERBS}|mov(?:e|ed|es|ing)|replac(?:e|ed|es|ing)|roll(?:ed|s|ing)? back)\s+(?:[\w-]+\s+){{0,3}}?"
    rf"from\s+(?:[\w.'’-]+\s+){{1,4}}?to)\s+$"
)
# ...or after it: what a thing has and a person does not, a version number, an edition, what systems do.
_THING_AFTER_NOUNS = (
    "team|squad|migration|rollout|launch|integration|bucket|build|deployment|env|licen[cs]e|roadmap|backlog|"
    "codebase|outage|incident|failover|upgrade|backend|frontend|rewrite|docs|documentation|spec|schema|beta|"
    "alpha|pro|enterprise|plus|lite|max|mini|ultra|cloud|edge|mobile|desktop|results|metrics|alerts?|logs?|"
    "jobs?|workers?|nodes?|pods?|shards?|replicas?|tickets?|config|configuration|settings|traffic|usage|"
    "capacity|quota|pricing|renewal|pilot|demo|trial|feature flags?|endpoints?|release notes|changelog|"
    "v?\\d+(?:\\.\\d+)*[a-z]?|in q[1-4]"
)
# What systems do and people hardly ever ("Maria restarted the server" is a person: not listed).
_SYSTEM_VERBS = (
    "(?:goes|went|is going) (?:read-only|live|down|offline|online|dark|ga)|"
    "(?:is|was|are|were) (?:down|live|offline|online|deprecated|read-only|degraded|unhealthy|"
    "deployed|sunset|decommissioned|throttled|rate-limited|at \\d+%)|crashed|crashes|"
    "fail(?:ed|s)? over|throws|timed out|times out"
)
_THING_AFTER = re.compile(rf"(?i)\s+(?:(?:{_THING_NOUNS}|{_THING_AFTER_NOUNS})s?\b|(?:{_SYSTEM_VERBS})\b)")
# "Matilda is the backup job for Florence", "Solomon is our internal cost tracker".
_DEFINED_AS_THING = re.compile(
    rf"(?i)\s+(?:is|was|are|were|remains)\s+(?:the|our|an?|their|your|its)\s+(?:[\w-]+\s+){{0,3}}?"
    rf"(?:{_THING_NOUNS}|job|tracker|sandbox|store|cache|bot|scheduler|runner|index|warehouse|lake|"
    r"feature store|backup|replica|mirror|proxy|worker|daemon|cron|script|integration|connector|portal|"
    r"website|site|page|form|report|template|workflow|agent|assistant|chatbot|model|codename|code name|"
    r"internal name|project name|product name)s?"
    r"(?=\s*(?:[,.;:!?)]|$)|\s+(?:for|of|in|on|at|that|which|and|with|from|to|behind|under)\b)"  # the head noun
)
# A determiner before a name and a word after it: "the Otto refund flow", "our Harper consumers".
# Not "that": "the complaint that Eric sent".
_DETERMINER_BEFORE = re.compile(r"(?i)\b(?:the|our|their|its|your|every|each)\s+$")
# The lower-case word right after a name (a possessive is no such word).
_NEXT_WORD = re.compile(r"\s+([a-z][a-z-]*[a-z])\b(?!['’])")

#: :meth:`NerRecognizer.person_context` verdicts, kept in a PERSON result's ``recognition_metadata``.
PERSON_CONTEXT = "person_context"
PERSON_CUE, THING, NAME_WORD, NO_SIGN = "person", "thing", "name-word", "none"

# "X and Y share the same engine": the name coordinated with another before what systems do.
_COORDINATED = re.compile(r"\s+(?:and|or|&)\s+[A-Z][\w'’-]*(?:\s+[A-Z][\w'’-]*){0,2}")
_THING_POSSESSIVE = re.compile(
    rf"(?i)['’]s\s+(?:{_THING_NOUNS}|roadmap|backlog|codebase|licen[cs]e|pricing|docs|documentation|uptime|"
    r"latency|changelog|release notes|endpoints?|schema|config|configuration|logs|metrics|dependencies)\b"
)
# Companies: a name ending in (or followed by) one of these is an organisation.
_COMPANY_WORDS = (
    "inc|ltd|llc|llp|gmbh|ag|sa|sas|srl|bv|nv|plc|corp|corporation|co|company|group|holdings|partners|"
    "capital|logistics|dynamics|foods|retail|health|healthcare|analytics|traders|trading|marine|systems|"
    "technologies|technology|tech|labs|solutions|industries|consulting|bank|insurance|energy|motors|pharma|"
    "media|ventures|studios|software|networks|airlines|hotels|foundation|institute|university|associates|"
    "enterprises|international|global|manufacturing|engineering|construction|logistik|freight|shipping|"
    "telecom|mobility|robotics|biotech|therapeutics|financial|finance|securities|investments|realty|"
    "properties|brands|outfitters|supply|supplies|distribution|services|digital|data|cloud|dairy|farms?|"
    "works|werke|apparel|furniture|textiles|electric|electronics|power|water|paper|printing|packaging|"
    "steel|metals|mining|oil|gas|chemicals|plastics|glass|timber|builders|homes|housing|coffee|bakery|"
    "brewing|brewery|wines|beverages|kitchens|fashion|sports|toys|games|books|travel|tours|transport|"
    "trucking|fleet|cargo|express|couriers|clinics?|dental|medical|pharmacy|care|fitness|beauty|cosmetics|"
    "optics|design|architects|law|legal|accounting|consultancy|advisors|agency|marketing|cleaning|catering|"
    "events|hospitality|restaurants|resorts|aviation|aerospace|automotive|auto|garage|rail|solar|wind|"
    "tiles|bikes|outdoor|organics|naturals|pharmaceuticals|laboratories|diagnostics|instruments|controls|"
    "automation|components|materials|minerals|resources|utilities|renewables|imports|exports|wholesale|"
    "markets|stores|shops|mart|bancorp|credit|lending|mortgage|assurance|re|mutual|trust|fund|funds"
)
# Capitalised, as in a company's name ("Kessler Dynamics", "Lindgren & Voss"); "Kalina works remotely" is no company.
_COMPANY_WORD = re.compile(rf"^(?i:{_COMPANY_WORDS})\.?$")
_COMPANY_AFTER = re.compile(rf"(?:,?\s+|\s*&\s*\w+\s+)(?=[A-Z])(?i:{_COMPANY_WORDS})\b")
_CAPITALISED_BEFORE = re.compile(r"[A-Z][\w'’-]*\s+$")  # "Meridian" before a span that is only "Health"
# ...or the sentence named things before it: "The codename of project Harbor is Velvet Anchor."
_NAMING_SENTENCE = re.compile(
    r"(?i)\b(?:code ?names?|code-named|codenamed|internal name|project name|product name|release name)\b"
    r"(?!\s+(?:was|were)\s+(?:chosen|picked|proposed|suggested)\s+by)"
)


class NerSpan(NamedTuple):
    """An entity span from the NER model, in the scanned text's offsets."""

    start: int
    end: int
    label: str


_CALENDAR = frozenset(
    "monday tuesday wednesday thursday friday saturday sunday january february march april may june july "
    "august september october november december".split()
)
# Openers and addressee words that are capitalised at the start of a sentence
# or after a greeting but are not names.
_OPENERS = frozenset(
    "hi hello hey dear thanks thank cheers regards best sincerely welcome congratulations please sorry yes no ok "
    "okay good morning afternoon evening kind warm team all everyone colleagues colleague friends friend sir "
    "madam customer customers support user users client clients partner partners manager admin world there "
    "folks guys".split()
)


@dataclass(frozen=True)
class NameLexicon:
    """Name lists and English vocabulary.

    Attributes:
        given: Given names, title-case (calendar words such as ``May`` removed).
        surnames: Surnames, title-case.
        english: Lower-case dictionary words (WordNet lemmas, which include
            many proper nouns, plus stop words and calendar words).
        common: Lower-case words that are not proper nouns: stop words, verbs,
            adjectives, adverbs, calendar words and openers (``thanks``, ``dear``).
        name_words: Title-case names that are everyday words too (``Willow``,
            ``Hunter``): a PERSON on their own only with a person cue.
        places: Countries, states and cities, lower case without accents
            (``sao paulo``): as a whole candidate, a PERSON only with a person cue.
    """

    given: frozenset[str]
    surnames: frozenset[str]
    english: frozenset[str]
    common: frozenset[str]
    name_words: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()

    def is_place(self, span_text: str) -> bool:
        return fold_place(span_text) in self.places

    @staticmethod
    def is_titlecase(word: str) -> bool:
        return len(word) > 1 and word[0].isupper() and not word.isupper()

    @staticmethod
    def _forms(lower: str) -> tuple[str, ...]:
        for clitic in ("'s", "'m", "'re", "'ll", "'ve", "'d", "n't", "’s", "’m", "’re", "’ll", "’ve", "’d"):
            if lower.endswith(clitic):
                lower = lower[: -len(clitic)]
                break
        forms = [lower]
        if lower.endswith("ies"):
            forms.append(lower[:-3] + "y")
        if lower.endswith("es"):
            forms.append(lower[:-2])
        if lower.endswith("s"):
            forms.append(lower[:-1])
        if lower.endswith("ed"):
            forms += [lower[:-2], lower[:-1]]
        if lower.endswith("ing"):
            forms += [lower[:-3], lower[:-3] + "e"]
        return tuple(forms)

    def is_given(self, word: str) -> bool:
        """Whether ``word`` is a known given name (for hyphenated ones, its first part)."""
        return word in self.given or ("-" in word and word.split("-", 1)[0] in self.given)

    def in_dictionary(self, word: str) -> bool:
        """Whether ``word`` (or a regular inflection of it) is a dictionary word."""
        return any(f in self.english for f in self._forms(word.lower()))

    def is_common(self, word: str) -> bool:
        """Whether ``word`` is a common (non-proper) English word."""
        lower = word.lower()
        if lower in self.english:  # a word in its own right: no inflection guessing ("James" is not "jam")
            return lower in self.common
        return any(f in self.common for f in self._forms(lower))

    def name_like(self, word: str, mid_sentence: bool = False) -> bool:
        """Capitalised, and a known given name or not a dictionary word at all.

        Such a word is worth running NER for; a text without one is not. A given
        name that is also a common word (``Will``, ``Julian``, ``Mark``) counts
        only in the middle of a sentence, where the capital says it is a name.
        """
        if not self.is_titlecase(word):
            return False
        if word in self.given:
            return mid_sentence or not self.is_common(word)
        if len(word) < 3 or (_CAMEL.match(word) and not _CAMEL_NAME.match(word)):
            return False
        return not self.in_dictionary(word)


def _vocabulary(model: str) -> tuple[frozenset[str], frozenset[str]]:
    """(dictionary words, common words) from the spaCy model's lemmatizer tables and stop words."""
    from spacy.lang.en.stop_words import STOP_WORDS
    from spacy.lookups import Lookups
    from spacy.strings import get_string_id

    english: set[str] = set(STOP_WORDS) | _CALENDAR
    common: set[str] = set(STOP_WORDS) | _CALENDAR | _OPENERS
    package = Path(importlib.import_module(model).__file__).parent
    tables = sorted(package.glob("*/lemmatizer/lookups"))
    if not tables:
        logger.warning("spaCy model has no lemmatizer tables; PERSON detection relies on NER", extra={"model": model})
        return frozenset(english), frozenset(common)
    lookups = Lookups().from_disk(tables[0])
    index = lookups.get_table("lemma_index") if "lemma_index" in lookups.tables else {}
    exceptions = lookups.get_table("lemma_exc") if "lemma_exc" in lookups.tables else {}
    for pos in ("noun", "verb", "adj", "adv"):
        words = {w for w in index.get(get_string_id(pos), []) if "_" not in w}
        inflected = set(exceptions.get(get_string_id(pos), {}).keys())
        english.update(words | inflected)
        if pos != "noun":
            common.update(words)
            # Irregular inflections ("went", "better") are common words too, but the table
            # also has forms such as "oliver" (olive) that are far more often names.
            common.update(w for w in inflected if w.title() not in _given_names())
    return frozenset(english), frozenset(common)


@functools.cache
def load_lexicon(model: str) -> NameLexicon:
    """Name lists and vocabulary, loaded once per process."""
    english, common = _vocabulary(model)
    given = frozenset(n for n in _given_names() if n.lower() not in _CALENDAR)
    return NameLexicon(given=given, surnames=_names("surnames.txt"), english=english, common=common,
                       name_words=_names("name_words.txt") | _names("products.txt"), places=_places())


def fold_place(text: str) -> str:
    """A place name as compared: accents removed, lower case, single spaces."""
    decomposed = unicodedata.normalize("NFKD", text)
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).lower().split())


def _places() -> frozenset[str]:
    with open(_DATA / "places.txt", encoding="utf-8") as fh:
        return frozenset(line.strip() for line in fh if line.strip() and not line.startswith("#"))


def _names(file: str) -> frozenset[str]:
    with open(_DATA / file, encoding="utf-8") as fh:
        return frozenset(line.strip().title() for line in fh if line.strip() and not line.startswith("#"))


@functools.cache
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


@functools.cache
def _given_names() -> frozenset[str]:
    return _names("given_names.txt")


#: Characters of context kept on each side of a name-like word for NER.
NER_CONTEXT_CHARS = 32
_SPACE = re.compile(r"\s")

_SENTENCE_OPENERS = frozenset(".!?:;\n\"'(*-•>")


def _mid_sentence(text: str, start: int) -> bool:
    """Whether the word at ``start`` follows other words of its sentence."""
    i = start - 1
    while i >= 0 and text[i] in " \t":
        i -= 1
    return i >= 0 and text[i] not in _SENTENCE_OPENERS


#: NER labels that say a word is not a person (rule 7 defers to them).
_NOT_A_PERSON_LABELS = frozenset({"GPE", "LOC", "FAC", "ORG", "PRODUCT", "NORP", "LANGUAGE"})

_NOT_IN_NAMES = re.compile(r"[\d{}\[\]<>_=/@#$%&*|\\]")


class NerRecognizer(LocalRecognizer):
    """PERSON and LOCATION from NER spans, name lists and cue words (see the module docstring).

    Scores: 0.85 for NER names backed by a name list or of several words, 0.8
    after an honorific, 0.75 for a given name plus surname, 0.7 after a cue,
    0.65 for weaker evidence (a lone capitalised word the NER calls a person,
    two capitalised non-dictionary words, a mislabelled NER span).

    Args:
        lexicon: Name lists and vocabulary (see :func:`load_lexicon`).
    """

    NER_SCORE = 0.85
    HONORIFIC_SCORE = 0.8
    FULL_NAME_SCORE = 0.75
    CUE_SCORE = 0.7
    WEAK_SCORE = 0.65
    LONE_WORD_SCORE = 0.65
    CONTEXT_SCORE = 0.7
    #: A candidate that context says is a thing: kept, under every shipped threshold, for reports.
    THING_SCORE = 0.3

    def __init__(self, lexicon: NameLexicon) -> None:
        self.lexicon = lexicon
        super().__init__(supported_entities=["PERSON", "LOCATION"], name="NerRecognizer")

    def load(self) -> None:  # noqa: D102
        pass

    def needs_ner(self, text: str) -> bool:
        """Whether ``text`` has a name-like word, i.e. whether NER can add anything."""
        return bool(self.ner_windows(text))

    @staticmethod
    def words(text: str) -> list[re.Match[str]]:
        """The free-standing words of ``text`` (not fragments of tokens, keys or addresses)."""
        return list(_FREE_WORD.finditer(text))

    def ner_windows(
        self, text: str, words: list[re.Match[str]] | None = None, context: int = NER_CONTEXT_CHARS
    ) -> list[tuple[int, int]]:
        """The parts of ``text`` worth running NER on: each name-like word with ``context`` characters around it.

        The small model's features reach only a few tokens to either side of a
        word (a 4-layer CNN with window 1, plus a transition parser looking a
        few tokens ahead), so NER on a window of about ten tokens around a word
        labels that word as it would in the whole text. Windows are widened to
        whitespace and merged when they touch.
        """
        name_like = self.lexicon.name_like
        windows: list[tuple[int, int]] = []
        n = len(text)
        for m in _FREE_WORD.finditer(text) if words is None else words:
            if not name_like(m.group(), _mid_sentence(text, m.start())):
                continue
            start = max(0, m.start() - context)
            end = min(n, m.end() + context)
            if start > 0:
                start = max(text.rfind(" ", 0, start), text.rfind("\n", 0, start)) + 1
            if end < n:
                gap = _SPACE.search(text, end)
                end = gap.start() if gap else n
            if windows and start <= windows[-1][1] + 1:
                windows[-1] = (windows[-1][0], max(end, windows[-1][1]))
            else:
                windows.append((start, end))
        return windows

    def analyze(self, text, entities, nlp_artifacts=None):  # noqa: D102
        spans = [NerSpan(e.start_char, e.end_char, e.label_) for e in getattr(nlp_artifacts, "entities", None) or []]
        return self.analyze_spans(text, spans, frozenset(entities))

    def analyze_spans(
        self, text: str, spans: list[NerSpan], wanted: frozenset[str], words: list[re.Match[str]] | None = None
    ) -> list[RecognizerResult]:
        """Findings for the wanted types from ``spans`` and from the text itself (``words`` as from :meth:`words`)."""
        results = []
        for span in spans:
            span_text = text[span.start : span.end]
            if span.label == "PERSON" and "PERSON" in wanted:
                score = self._ner_person_score(span_text)
                if score:
                    results.append(RecognizerResult("PERSON", span.start, span.end, score))
            elif span.label in LOCATION_LABELS and "LOCATION" in wanted:
                results.append(RecognizerResult("LOCATION", span.start, span.end, self.NER_SCORE))
            if span.label in _MISLABEL_LABELS and "PERSON" in wanted and self._all_foreign(span_text):
                results.append(RecognizerResult("PERSON", span.start, span.end, self.WEAK_SCORE))
        if "PERSON" in wanted:
            elsewhere = [(s.start, s.end) for s in spans if s.label in _NOT_A_PERSON_LABELS]
            results.extend(self._lexical(text, self.words(text) if words is None else words, elsewhere))
            for result in results:
                if result.entity_type == "PERSON":
                    context = self.person_context(text, result.start, result.end)
                    result.recognition_metadata = {**(result.recognition_metadata or {}), PERSON_CONTEXT: context}
                    if context in (THING, NAME_WORD):
                        result.score = min(result.score, self.THING_SCORE)
        return results

    def person_context(self, text: str, start: int, end: int) -> str:
        """What surrounds a PERSON candidate says: :data:`PERSON_CUE`, :data:`THING`, :data:`NAME_WORD` or none.

        A company (``Kessler Dynamics``, ``Halvorsen & Co``) is a thing whatever
        surrounds it. Otherwise a person cue (honorific, greeting, rule 6) wins;
        then a thing's context (``project X``, ``X 4.2``, ``the X team``, ``X
        goes read-only``, ``migrated from X to Y``, ``X's SDK``, ``the X
        timeouts``, a sentence about codenames) makes it a thing; a single word
        that is also an everyday word (``Willow``, ``Hunter``) is a name-word.
        """
        words = _WORD.findall(text[start:end])
        lex = self.lexicon
        company_name = (
            len(words) > 1 and words[-1][0].isupper() and _COMPANY_WORD.match(words[-1])
            and not any(w in _PARTICLES for w in words)  # "Bjorn van Tours" is a person...
            and not (lex.is_given(words[0]) and words[-1] in lex.surnames)  # ...and so is "Maria Power"
        )
        company_tail = len(words) == 1 and _COMPANY_WORD.match(words[0]) and _CAPITALISED_BEFORE.search(text, 0, start)
        if company_name or company_tail or _COMPANY_AFTER.match(text, end):
            return THING
        before = text[max(0, start - 80) : start]
        cue_before = before[-24:]
        if _HONORIFIC.search(cue_before) or _CUE.search(cue_before) or _CONTEXT_BEFORE.search(before[-40:]) \
                or _CONTEXT_AFTER.match(text, end):
            return PERSON_CUE
        sentence_start = max(before.rfind(". "), before.rfind("? "), before.rfind("! "), before.rfind("\n"))
        sentence = before[sentence_start + 1 :]  # its part before the candidate
        if (
            _THING_BEFORE.search(before[-30:]) or _THING_AFTER.match(text, end) or _THING_POSSESSIVE.match(text, end)
            or (len(words) == 1 and _PLACE_BEFORE.search(before[-40:])) or _DEFINED_AS_THING.match(text, end)
            or _MOVE_BEFORE.search(sentence) or _NAMING_SENTENCE.search(sentence)
            or ((pair := _COORDINATED.match(text, end)) and _THING_AFTER.match(text, pair.end()))
            or self._qualifies_the_next_word(before, text, end)
        ):
            return THING
        if len(words) > 1 and (_THING_BEFORE.search(words[0] + " ") or _THING_AFTER.match(" " + words[-1])):
            return THING  # a span that holds its thing word: "Project Willow", "Rusty Lantern Pro"
        if (len(words) == 1 and words[0] in lex.name_words) or lex.is_place(text[start:end]):
            return NAME_WORD  # "Willow", "Florence", "Sao Paulo": a person only with a person cue
        return NO_SIGN

    def _qualifies_the_next_word(self, before: str, text: str, end: int) -> bool:
        """Whether the name qualifies the word after it, as systems' names do and people's do not.

        Two signs: a determiner before it and any word but a function word
        after it (``the Otto refund flow``: people's names take no article), or
        a plain noun right after it (``Bruno error rate``). People are followed
        by verbs, adverbs and function words (``Nadia said``, ``Nadia today``).
        """
        match = _NEXT_WORD.match(text, end)
        if match is None:
            return False
        word = match.group(1)
        if _DETERMINER_BEFORE.search(before[-8:]) and word not in _stop_words():
            return True
        return self.lexicon.in_dictionary(word) and not self.lexicon.is_common(word)

    def _ner_person_score(self, span_text: str) -> float:
        """Score of an NER PERSON span; 0 drops it (digits, code, a plain English word)."""
        lex = self.lexicon
        words = _WORD.findall(span_text)
        if not words or _NOT_IN_NAMES.search(span_text) or not any(lex.is_titlecase(w) for w in words):
            return 0.0
        if len(words) == 1:
            word = words[0]
            if word in lex.given or word in lex.surnames:
                return self.NER_SCORE
            return 0.0 if lex.in_dictionary(word) else self.LONE_WORD_SCORE
        if not all(lex.is_titlecase(w) or w in _PARTICLES for w in words):
            return 0.0  # "Jira to Snowflake", "Zentrix API": names are capitalised words
        return self.NER_SCORE

    def _all_foreign(self, span_text: str) -> bool:
        words = _WORD.findall(span_text)
        lex = self.lexicon
        return len(words) >= 2 and all(lex.is_titlecase(w) and not lex.in_dictionary(w) for w in words)

    def _runs(self, text: str, words: list[re.Match[str]]) -> list[list[re.Match[str]]]:
        """Runs of capitalised words separated by single spaces (name particles allowed inside)."""
        is_titlecase = self.lexicon.is_titlecase
        runs: list[list[re.Match[str]]] = []
        current: list[re.Match[str]] = []
        pending: list[re.Match[str]] = []  # particles waiting for a capitalised word
        for m in words:
            word = m.group()
            joined = bool(current) and text[(pending or current)[-1].end() : m.start()] == " "
            if is_titlecase(word):
                if joined:
                    current.extend(pending)
                    current.append(m)
                else:
                    if current:
                        runs.append(current)
                    current = [m]
                pending = []
            elif joined and word in _PARTICLES and len(pending) < 2:
                pending.append(m)
            else:
                if current:
                    runs.append(current)
                current, pending = [], []
        if current:
            runs.append(current)
        return runs

    def _lexical(
        self, text: str, words: list[re.Match[str]], elsewhere: Sequence[tuple[int, int]] = ()
    ) -> list[RecognizerResult]:
        lex = self.lexicon
        results = []
        for run in self._runs(text, words):
            # Leading common words open the sentence or greet ("Thanks", "Please"); they are not the name.
            while run and run[0].group() not in lex.given and lex.is_common(run[0].group()):
                run = run[1:]
            if not run:
                continue
            words = [m.group() for m in run if lex.is_titlecase(m.group())]
            start, end = run[0].start(), run[-1].end()
            before = text[max(0, start - 20) : start]
            if _HONORIFIC.search(before):
                results.append(RecognizerResult("PERSON", start, end, self.HONORIFIC_SCORE))
                continue
            if len(words) >= 2:
                first, last = words[0], words[-1]
                # A given name then a plain word is a thing's name ("Amber Tundra"), not a full name.
                last_is_name = last in lex.surnames or not lex.in_dictionary(last) or lex.is_given(last)
                if (lex.is_given(first) and last_is_name) or (last in lex.surnames and not lex.is_common(first)):
                    results.append(RecognizerResult("PERSON", start, end, self.FULL_NAME_SCORE))
                    continue
                if not any(lex.is_common(w) for w in words) and any(not lex.in_dictionary(w) for w in words):
                    results.append(RecognizerResult("PERSON", start, end, self.WEAK_SCORE))
                    continue
            first = words[0]
            known = lex.is_given(first) or first in lex.surnames
            if _CUE.search(before) and (known or not lex.is_common(first)):
                end = run[0].end() if len(words) > 1 and lex.is_common(words[1]) else end
                results.append(RecognizerResult("PERSON", start, end, self.CUE_SCORE))
            elif len(words) == 1 and lex.is_given(first) and not lex.is_common(first):
                # A lone given name ("ask James"); places named like people (Georgia) are the price.
                results.append(RecognizerResult("PERSON", start, end, self.WEAK_SCORE))
            elif (
                (known or not lex.is_common(first) or (len(words) > 1 and words[-1] in lex.surnames))
                and (len(words) == 1 or lex.is_common(words[1]) or words[-1] in lex.surnames)  # not "Amazon Business"
                and not _CAMEL.match(first)
                and (_CONTEXT_BEFORE.search(before) or _CONTEXT_AFTER.match(text, end))
            ):
                # Rule 6: a person-taking context.
                end = run[0].end() if len(words) > 1 and lex.is_common(words[1]) else end
                results.append(RecognizerResult("PERSON", start, end, self.CONTEXT_SCORE))
            elif (
                len(words) == 1 and not first.isascii() and len(first) > 2 and not lex.in_dictionary(first)
                and not any(s < end and start < e for s, e in elsewhere)
            ):
                # Rule 7: "Véronique", "Błażej"; places with such letters are usually NER places.
                results.append(RecognizerResult("PERSON", start, end, self.WEAK_SCORE))
        return results
