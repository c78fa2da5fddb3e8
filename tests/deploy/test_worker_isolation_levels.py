"""Each deploy path states the worker isolation level it gets, and that level can be built there.

The default (``sandbox``) needs bubblewrap and user namespaces; containers under Docker's or
Kubernetes' default seccomp profile and the hardened systemd unit cannot give those, so each path
sets a weaker level explicitly, with the reason beside it (and the scheduler audits it at start-up).
A path that forgot would fail every job closed.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from appliance.jobs.isolation import IsolationLevel
from tests.deploy.test_systemd import UNITS_DIR, environment, parse_unit

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _compose_level() -> str:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    return compose["services"]["appliance"]["environment"]["APPLIANCE_WORKER_ISOLATION"]


def _kubernetes_level() -> str:
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "20-appliance.yaml").read_text()):
        if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if container["name"] == "appliance":
                    return {e["name"]: e.get("value") for e in container["env"]}["APPLIANCE_WORKER_ISOLATION"]
    raise AssertionError("no appliance container in 20-appliance.yaml")


def test_each_deploy_path_names_its_level_and_why():
    levels = {"compose": _compose_level(), "kubernetes": _kubernetes_level(),
              "systemd": environment(parse_unit(UNITS_DIR / "appliance.service"))["APPLIANCE_WORKER_ISOLATION"]}
    assert levels == {"compose": "none", "kubernetes": "none", "systemd": "network-only"}
    assert all(IsolationLevel(v) for v in levels.values())
    for path in ("compose/compose.yaml", "kubernetes/20-appliance.yaml", "systemd/appliance.service"):
        text = (DEPLOY / path).read_text()
        before = text[:text.index("APPLIANCE_WORKER_ISOLATION")]
        assert "bubblewrap" in before[-700:] and "audited" in before[-700:], path


def test_the_systemd_level_fits_the_units_namespaces():
    """network-only makes a user and a network namespace: exactly what RestrictNamespaces= allows."""
    unit = parse_unit(UNITS_DIR / "appliance.service")
    assert unit["RestrictNamespaces"] == ["user net"]
