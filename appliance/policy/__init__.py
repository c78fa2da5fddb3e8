"""Data policies: block, redact or allow each entity type; decisions; redaction.

* :func:`parse_policy`, :func:`load_policy`, :func:`load_default_policy` -> :class:`Policy`
  (with its :class:`Retention` periods); the shipped default is ``default.yaml``, package
  data of ``policies`` read through importlib.resources (:func:`default_policy_text`)
* :func:`decide`, :class:`DecisionBuilder` -> :class:`Decision`
* :func:`redact_record`, :func:`redact_text`

The rest of the package is imported by module, not from here (it needs the database,
the blob store or presidio):

* :mod:`appliance.policy.service` - :class:`PolicyService`: which policy applies to a
  project (its own, else the default) merged with its reviewed glossary
* :mod:`appliance.policy.glossary` - :class:`GlossaryService`: the projects' reviewed glossaries
* :mod:`appliance.policy.models` - their tables (``project_policies``, ``project_glossaries``)
* :mod:`appliance.policy.controllers`, :mod:`appliance.policy.schemas` - the
  ``/api/v1/projects/{name}/policy`` and ``.../glossary`` routes and their bodies
* :mod:`appliance.policy.report`, :mod:`appliance.policy.cli` - the dry-run report of a
  file under a policy, ``appliance scan FILE``
"""

from appliance.policy.decision import Decision, DecisionBuilder, Outcome, decide
from appliance.policy.model import (
    DEFAULT_POLICY_PATH,
    POLICY_VERSION,
    EntityRule,
    Policy,
    PolicyError,
    Retention,
    default_policy_text,
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
    "default_policy_text",
    "format_duration",
    "load_default_policy",
    "load_policy",
    "parse_policy",
    "redact_record",
    "redact_text",
]
