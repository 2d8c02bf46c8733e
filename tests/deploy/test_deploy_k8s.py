"""scripts/deploy_checks/k8s.py: kustomize + the Kubernetes schemas, and our rules, bite."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from scripts.deploy_checks.common import Layout
from scripts.deploy_checks.k8s import (
    KUBERNETES_VERSIONS,
    check_gpu_overlay,
    check_k8s,
    check_k8s_hardening,
    validate_k8s_schemas,
)


def _joined(problems: list[str]) -> str:
    return "\n".join(problems)


def _workload(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(
        o
        for o in objects
        if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == name
    )


# -- schemas -----------------------------------------------------------------------------------


def test_k8s_schema_rejects_a_wrong_field_type(rendered: dict[str, Any]) -> None:
    deployment = copy.deepcopy(
        next(
            o
            for o in rendered["base"]
            if o["metadata"]["name"] == "ivvae-gateway" and o["kind"] == "Deployment"
        )
    )
    deployment["spec"]["replicas"] = "two"
    problems = _joined(validate_k8s_schemas([deployment], "broken"))
    assert "spec.replicas" in problems and "'two'" in problems, problems


def test_k8s_schema_is_strict_about_unknown_fields(rendered: dict[str, Any]) -> None:
    deployment = copy.deepcopy(next(o for o in rendered["base"] if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    problems = _joined(validate_k8s_schemas([deployment], "broken"))
    assert "livenesProbe" in problems, problems


def test_schema_check_agrees_with_kubernetes_validate(rendered: dict[str, Any]) -> None:
    """The cached validators use kubernetes-validate's files the way its validate() does."""
    import kubernetes_validate

    objects = [o for o in rendered["gpu"] if o["kind"] in {"Deployment", "NetworkPolicy"}]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(objects[0])
    broken["spec"]["revisionHistoryLimit"] = "five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    assert "spec.revisionHistoryLimit" in _joined(validate_k8s_schemas([broken], "broken"))


def test_k8s_schema_rejects_an_unknown_api_version() -> None:
    obj = {"apiVersion": "apps/v1beta9", "kind": "Deployment", "metadata": {"name": "x"}}
    assert "no schema for apps/v1beta9 Deployment" in _joined(validate_k8s_schemas([obj], "broken"))


def test_k8s_check_renders_and_rejects_a_broken_base(deploy_copy: Path) -> None:
    gateway = deploy_copy / "k8s" / "base" / "gateway.yaml"
    gateway.write_text(gateway.read_text().replace("replicas: 2", 'replicas: "two"', 1))
    problems = _joined(check_k8s(Layout.from_root(deploy_copy)))
    assert "k8s/base: Deployment/ivvae-gateway invalid" in problems, problems
    assert "k8s/overlays/gpu: Deployment/ivvae-gateway invalid" in problems, problems


def test_k8s_check_reports_a_kustomization_that_does_not_build(deploy_copy: Path) -> None:
    kustomization = deploy_copy / "k8s" / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("- redis.yaml", "- rediss.yaml"))
    problems = _joined(check_k8s(Layout.from_root(deploy_copy)))
    assert "kustomize build" in problems and "rediss.yaml" in problems, problems


# -- hardening, network policies, the GPU overlay -----------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda c, s: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
        (lambda c, s: c["securityContext"]["capabilities"].update(drop=[]), "capabilities.drop"),
        (
            lambda c, s: c["securityContext"].update(allowPrivilegeEscalation=True),
            "allowPrivilegeEscalation",
        ),
        (lambda c, s: s["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda c, s: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (lambda c, s: s.pop("enableServiceLinks"), "enableServiceLinks"),
        (lambda c, s: c["resources"].pop("limits"), "memory limit"),
        (lambda c, s: c.pop("readinessProbe"), "readinessProbe"),
        (lambda c, s: c.update(image="ivvae-gateway:latest"), "pinned tag"),
        (lambda c, s: c.update(volumeMounts=[]), "writable /tmp"),
    ],
)
def test_hardening_rules_bite(rendered: dict[str, Any], breakage: Any, expected: str) -> None:
    objects = copy.deepcopy(rendered["base"])
    spec = _workload(objects, "ivvae-gateway")["spec"]["template"]["spec"]
    breakage(spec["containers"][0], spec)
    assert expected in _joined(check_k8s_hardening(objects, "broken"))


def test_hardening_names_the_object_and_container(rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["base"])
    spec = _workload(objects, "ivvae-gateway")["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["privileged"] = True
    spec.pop("automountServiceAccountToken")
    assert check_k8s_hardening(objects, "broken") == [
        "broken: Deployment/ivvae-gateway: automountServiceAccountToken must be false "
        "(no pod talks to the API)",
        "broken: Deployment/ivvae-gateway: container gateway: must not be privileged",
    ]


def test_triton_needs_memory_backed_dev_shm(rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["gpu"])
    spec = _workload(objects, "ivvae-triton")["spec"]["template"]["spec"]
    next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"].pop("medium")
    assert "/dev/shm" in _joined(check_k8s_hardening(objects, "broken"))


def test_network_policies_keep_triton_and_redis_private(rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["base"])
    policy = next(o for o in objects if o["metadata"]["name"] == "ivvae-redis-ingress")
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    triton = next(o for o in objects if o["metadata"]["name"] == "ivvae-triton-ingress")
    triton["spec"]["ingress"][0].pop("from")
    objects = [o for o in objects if o["metadata"]["name"] != "ivvae-default-deny-ingress"]
    problems = _joined(check_k8s_hardening(objects, "broken"))
    assert "non-gateway peer reach redis" in problems, problems
    assert "lets anyone reach triton" in problems, problems
    assert "no default-deny ingress" in problems, problems


def test_a_deployment_needs_network_policies_an_example_does_not(
    rendered: dict[str, Any],
) -> None:
    objects = [o for o in copy.deepcopy(rendered["base"]) if o["kind"] != "NetworkPolicy"]
    assert check_k8s_hardening(objects, "broken") == ["broken: no NetworkPolicy"]
    assert check_k8s_hardening(objects, "broken", network_policies=False) == []


def test_gpu_overlay_rules_bite(rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["gpu"])
    assert check_gpu_overlay(objects, "gpu") == []
    container = _workload(objects, "ivvae-triton")["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"].pop("nvidia.com/gpu")
    for obj in objects:
        if obj["kind"] == "ConfigMap" and "INSTANCE_KIND" in obj.get("data", {}):
            obj["data"]["INSTANCE_KIND"] = "KIND_CPU"
    problems = _joined(check_gpu_overlay(objects, "gpu"))
    assert "nvidia.com/gpu" in problems and "KIND_GPU" in problems, problems
