"""deploy/kubernetes: every manifest against the Kubernetes schemas (kubernetes-validate, strict),
the KubeRay RayCluster's structure and pod templates, and the hardening each pod promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.validators import (
    DEPLOY,
    ENGINE_MAX_LORA_RANK,
    MAX_CPU_LORAS,
    VLLM_IMAGE,
    check_appliance_env,
    check_vllm_start_env,
    cli_flags,
    import_validator,
)

K8S_DIR = DEPLOY / "kubernetes"
#: The oldest Kubernetes the manifests are written for.
K8S_VERSION = "1.30"


@pytest.fixture(scope="module")
def kv():
    return import_validator("kubernetes_validate", "kubernetes-validate")


def load_all() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S_DIR.rglob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = load_all()


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def validate_strict(kv, doc: dict[str, Any]) -> None:
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc.get('metadata', {}).get('name')}: {exc.message} at {list(exc.path)}")


def ray_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    templates = [(d["metadata"]["name"], d["spec"]["template"]) for d in by_kind("Deployment") + by_kind("StatefulSet")]
    for cluster in by_kind("RayCluster"):
        templates += [(cluster["metadata"]["name"], t) for t in ray_templates(cluster)]
    return templates


def test_every_manifest_matches_the_kubernetes_schema(kv) -> None:
    kinds = sorted({doc["kind"] for _, doc in DOCS})
    assert kinds == ["Deployment", "Namespace", "NetworkPolicy", "PersistentVolumeClaim", "RayCluster", "Service",
                     "ServiceAccount", "StatefulSet"]
    for _, doc in DOCS:
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a KubeRay CRD: checked below
        validate_strict(kv, doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "appliance", doc["metadata"]["name"]


def test_strict_validation_rejects_an_unknown_field(kv) -> None:
    (deployment,) = by_kind("Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_raycluster(kv) -> None:
    (cluster,) = by_kind("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["namespace"] == "appliance"
    spec = cluster["spec"]
    assert set(spec) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs"}
    assert isinstance(spec["rayVersion"], str)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # ray start flags: KubeRay wants every value as a string.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    # Every Ray pod holds the node key the ranks derive their tunnel ticket from, read-only, owner-only.
    for template in ray_templates(cluster):
        (key,) = [v for v in template["spec"]["volumes"] if v["name"] == "node-key"]
        assert key["secret"] == {"secretName": "appliance-ray-node-key", "defaultMode": 0o400}
        (mount,) = [m for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == "node-key"]
        assert mount == {"name": "node-key", "mountPath": "/run/secrets/appliance-ray-node-key", "readOnly": True}
    # The templates are core PodTemplateSpecs: validate them as such.
    for template in ray_templates(cluster):
        validate_strict(kv, {"apiVersion": "v1", "kind": "PodTemplate",
                             "metadata": {"name": "t", "namespace": "appliance"}, "template": template})


def test_namespace_enforces_restricted_pod_security() -> None:
    (namespace,) = by_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name,template", pod_templates(), ids=[n for n, _ in pod_templates()])
def test_pods_are_hardened(name: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in spec["containers"]:
        ctx = container["securityContext"]
        assert ctx == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                       "capabilities": {"drop": ["ALL"]}}, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]


def test_appliance_pod_serves_adapters_through_vllm_beside_it() -> None:
    (deployment,) = by_kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    appliance, vllm = containers["appliance"], containers["vllm"]
    env = {e["name"]: e["value"] for e in appliance["env"] if "value" in e}
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in appliance["env"] if "valueFrom" in e}
    assert vllm["image"] == VLLM_IMAGE
    # The database URL carries the password: it comes from the Secret deploy/README.md creates.
    assert secret_env == {"APPLIANCE_DATABASE_URL": {"name": "appliance-database", "key": "url"}}
    check_appliance_env({**env, "APPLIANCE_DATABASE_URL": "postgresql+psycopg://appliance:pw@postgres:5432/appliance"},
                        "20-appliance.yaml")
    assert env["APPLIANCE_SERVING_ENGINE"] == "vllm"
    args = cli_flags(vllm["args"])
    assert "enable-lora" in args and env["APPLIANCE_VLLM_URL"] == f"http://{args['host']}:{args['port']}"
    assert int(args["max-lora-rank"]) == ENGINE_MAX_LORA_RANK
    assert args["max-cpu-loras"] == env["APPLIANCE_MAX_RESIDENT_ADAPTERS"]
    assert int(args["max-cpu-loras"]) <= MAX_CPU_LORAS
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    # Same memory-backed /dev/shm: the appliance writes adapters there, vLLM reads them.
    shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    for container in (appliance, vllm):
        assert any(m["mountPath"] == "/dev/shm" and m["name"] in shm for m in container["volumeMounts"])
    # vLLM sees the base models read-only and nothing else of the home (no keys, blobs, tokens).
    vllm_home = [m for m in vllm["volumeMounts"] if m["name"] == "home"]
    assert vllm_home == [{"name": "home", "mountPath": "/var/lib/appliance/models", "subPath": "models",
                          "readOnly": True}]
    assert not any(m["name"] == "keys" for m in vllm["volumeMounts"])
    assert Path(vllm["args"][0]).parent == Path("/var/lib/appliance/models")
    # Explicit GPUs for training and for serving.
    assert appliance["resources"]["limits"]["nvidia.com/gpu"] == vllm["resources"]["limits"]["nvidia.com/gpu"] == 1


def _appliance_pod() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    (deployment,) = by_kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    return spec, {c["name"]: c for c in spec["containers"]}


def test_vllm_and_the_appliance_share_one_api_key() -> None:
    spec, containers = _appliance_pod()
    appliance, vllm = containers["appliance"], containers["vllm"]
    # vLLM: VLLM_API_KEY from the Secret, and nowhere else (no literal, no --api-key).
    (key_env,) = [e for e in vllm["env"] if e["name"] == "VLLM_API_KEY"]
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert "value" not in key_env and not ref.get("optional")
    assert not any(a.startswith("--api-key") for a in vllm["args"])
    # The appliance: the same Secret's key as a file, where APPLIANCE_VLLM_API_KEY_FILE says.
    key_file = Path(next(e["value"] for e in appliance["env"] if e["name"] == "APPLIANCE_VLLM_API_KEY_FILE"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in appliance["volumeMounts"] if Path(m["mountPath"]) == key_file.parent]
    secret = volumes[mount["name"]]["secret"]
    assert mount.get("readOnly") is True and secret["secretName"] == ref["name"]
    paths = {item["key"]: item["path"] for item in secret.get("items", [])} or {ref["key"]: ref["key"]}
    assert paths[ref["key"]] == key_file.name
    # vLLM does not get the file as well: the key reaches it once.
    assert not any(m["name"] == mount["name"] for m in vllm["volumeMounts"])


def test_vllm_starts_as_a_uid_without_a_name() -> None:
    spec, containers = _appliance_pod()
    vllm = containers["vllm"]
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in vllm["volumeMounts"] if m["name"] in empty_dirs and not m.get("readOnly")]
    check_vllm_start_env({e["name"]: e.get("value", "") for e in vllm["env"]}, writable, "20-appliance.yaml")


def test_network_is_denied_unless_allowed() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind("NetworkPolicy")}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # The appliance (and the workers inside it) may reach PostgreSQL and DNS, nothing else.
    ports = sorted(p["port"] for rule in policies["appliance"]["egress"] for p in rule["ports"])
    assert ports == [53, 53, 5432]


def test_services_select_pods() -> None:
    labels = [t["metadata"]["labels"] for _, t in pod_templates()]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= pod.items() for pod in labels), service["metadata"]["name"]
