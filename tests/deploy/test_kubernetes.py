"""deploy/kubernetes: `kubectl kustomize` renders the base; every object it renders passes the
Kubernetes API schemas (kubernetes-validate, strict: an unknown field fails) or, for the
ServiceMonitor and ScaledObject, the CRD schema subsets in crds/; and the objects agree with
each other, with config.toml and with the Dockerfile."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from poller.config import DaemonConfig, parse_config
from tests.deploy.tools import DEPLOY, ROOT, require, run

BASE = DEPLOY / "kubernetes"
CRDS = Path(__file__).parent / "crds"
CRD_SCHEMAS = {
    "ServiceMonitor": CRDS / "servicemonitor.yaml",
    "ScaledObject": CRDS / "scaledobject.yaml",
}
# The newest Kubernetes the kubernetes-validate release knows, and one a couple of years older
# for clusters that lag behind.
K8S_VERSIONS = ("1.30.0", latest_version())
MIB = 1024 * 1024


@cache
def rendered() -> tuple[dict[str, Any], ...]:
    kubectl = require("kubectl")
    result = run(kubectl, "kustomize", BASE)
    assert result.returncode == 0, f"kubectl kustomize {BASE} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (found,) = objects(kind)
    return found


def container() -> dict[str, Any]:
    (found,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return found


def configured() -> Any:
    """The poller config the ConfigMap carries, parsed by poller itself."""
    text = one("ConfigMap")["data"]["config.toml"]
    return parse_config(tomllib.loads(text), "ConfigMap poller-config config.toml")


def quantity_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", value)
    assert match, f"memory quantity {value!r}: write it as N, NKi, NMi or NGi"
    return int(match[1]) * {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}[match[2]]


def test_the_base_renders_every_object() -> None:
    kinds = sorted(doc["kind"] for doc in rendered())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceMonitor",
            "PodDisruptionBudget",
            "ScaledObject",
        ]
    )


def test_every_file_in_the_base_is_used() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    used = set(kustomization["resources"]) | {
        name for generator in kustomization["configMapGenerator"] for name in generator["files"]
    }
    present = {p.name for p in BASE.iterdir()} - {"kustomization.yaml"}
    assert present == used, "files that kubectl apply -k would not apply (or that are missing)"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_objects_pass_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for doc in rendered():
        if doc["kind"] in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): "
                f"{exc.message} at {'.'.join(map(str, exc.path))}"
            )
        checked += 1
    assert checked == 4


def crd_errors(doc: dict[str, Any]) -> Iterator[str]:
    schema = yaml.safe_load(CRD_SCHEMAS[doc["kind"]].read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for error in validator.iter_errors(doc):
        yield f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"


@pytest.mark.parametrize("kind", sorted(CRD_SCHEMAS))
def test_custom_resources_pass_their_crd_schemas(kind: str) -> None:
    errors = list(crd_errors(one(kind)))
    assert not errors, f"{kind}:\n" + "\n".join(errors)


def test_crd_schema_subsets_refuse_what_the_api_server_refuses() -> None:
    """The hand-written subsets are strict where the real CRDs are."""
    monitor = yaml.safe_load(yaml.safe_dump(one("ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    monitor["spec"]["endpoints"][0]["scheme"] = "tcp"
    assert len(list(crd_errors(monitor))) == 2
    scaled = yaml.safe_load(yaml.safe_dump(one("ScaledObject")))
    trigger = scaled["spec"]["triggers"][0]
    trigger["metadata"]["threshold"] = 100  # KEDA's metadata values are strings
    trigger["metadata"]["serveraddress"] = "http://x"
    scaled["spec"]["minReplicaCount"] = -1
    assert len(list(crd_errors(scaled))) == 3


def test_scaled_object_targets_the_deployment_within_its_bounds() -> None:
    spec = one("ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    # The CRD's CEL rule; and at least one replica, or nobody reports the backlog it scales on.
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    # The ScaledObject owns the replica count: a replicas field would reset it on every apply.
    assert "replicas" not in one("Deployment")["spec"]


def test_selectors_find_their_objects() -> None:
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one("Service")
    for selector in (
        one("Deployment")["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = one("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The alerts and the dashboard select job="poller": the label's value names the job.
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "poller"
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= ports
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {
        p["name"] for p in container()["ports"]
    }


def test_probes_and_port_match_the_daemon() -> None:
    config = configured()
    host, port = config.daemon.http_host_port
    assert host == "0.0.0.0", "the kubelet and Prometheus reach the pod from outside it"
    c = container()
    assert [p["containerPort"] for p in c["ports"]] == [port]
    probes = {
        name: c[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert {p["port"] for p in probes.values()} == {c["ports"][0]["name"]}


def test_termination_grace_exceeds_the_drain() -> None:
    grace = max(configured().daemon.shutdown_grace_s, DaemonConfig().shutdown_grace_s)
    period = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert period >= grace + 10, (
        f"terminationGracePeriodSeconds {period} leaves less than 10 s past "
        f"shutdown_grace_s={grace:g}: the kubelet would SIGKILL a drain that is on time"
    )


def test_memory_follows_the_budget() -> None:
    config = configured()
    assert "memory_mb" in tomllib.loads(one("ConfigMap")["data"]["config.toml"])["daemon"], (
        "set [daemon] memory_mb: its default comes from the node's RAM, not the pod's limit"
    )
    resources = container()["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert limit >= (config.daemon.memory_mb + 256) * MIB, (
        f"memory limit {resources['limits']['memory']} leaves under 256 MiB for the daemon "
        f"beside the {config.daemon.memory_mb} MB budget"
    )
    assert quantity_bytes(resources["requests"]["memory"]) == limit
    assert all(f.memory_mb <= config.daemon.memory_mb for f in config.functions)


def test_pod_is_locked_down_and_writes_only_to_empty_dirs() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container()
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile's USER must be numeric uid:gid"
    assert (security["runAsUser"], security["runAsGroup"]) == (int(user[1]), int(user[2]))
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"] and "emptyDir" in mounts["/var/lib/poller"]
    config_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/poller")
    assert config_mount.get("readOnly") is True
    assert (
        volumes[config_mount["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    )
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.M)
    assert entrypoint, "the Dockerfile needs an ENTRYPOINT in JSON form"
    command = [*json.loads(entrypoint[1]), *c["args"]]
    assert command[-4:] == ["poller", "run", "--config", "/etc/poller/config.toml"], command


def test_credentials_come_from_a_secret() -> None:
    refs = [source["secretRef"]["name"] for source in container()["envFrom"]]
    assert refs == ["poller-credentials"]
    text = one("ConfigMap")["data"]["config.toml"]
    assert not re.search(r"(?i)(password|secret|token)\s*=\s*\"[^\"]*[^A-Z_\"]", text), (
        "a secret value in the ConfigMap; name its environment variable instead"
    )
