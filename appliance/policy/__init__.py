"""Data policies: block, redact or allow each entity type; decisions; redaction.

* :func:`parse_policy`, :func:`load_policy`, :func:`load_default_policy` -> :class:`Policy`
  (with its :class:`Retention` periods)
* :func:`decide`, :class:`DecisionBuilder` -> :class:`Decision`
* :func:`redact_record`, :func:`redact_text`
"""

from appliance.policy.decision import Decision, DecisionBuilder, Outcome, decide
from appliance.policy.model import (
    DEFAULT_POLICY_PATH,
    POLICY_VERSION,
    EntityRule,
    Policy,
    PolicyError,
    Retention,
    format_duration,
    load_default_policy,
    load_policy,
    parse_policy,
)
from appliance.policy.redaction import redact_record, redact_text

__all__ = [
    "DEFAULT_POLICY_PATH",
    "POLICY_VERSION",
    "Decision",
    "DecisionBuilder",
    "EntityRule",
    "Outcome",
    "Policy",
    "PolicyError",
    "Retention",
    "decide",
    "format_duration",
    "load_default_policy",
    "load_policy",
    "parse_policy",
    "redact_record",
    "redact_text",
]
