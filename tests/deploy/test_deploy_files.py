"""The deployment files pass scripts/validate_deploy.py, and every check bites.

The first half runs each check on the real files. The second half breaks a scratch copy in
one way per check and asserts that the check reports exactly that.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_deploy.py"
CHECK_NAMES = ("hadolint", "shellcheck", "compose", "k8s", "drift")


@pytest.fixture(scope="module")
def results(vd: ModuleType) -> dict[str, Any]:
    """Every check once on the real repository."""
    return {r.name: r for r in vd.run_checks(vd.Layout.from_root(ROOT))}


@pytest.fixture(scope="module")
def rendered(vd: ModuleType) -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: vd.render_kustomization(path)
        for path in vd.Layout.from_root(ROOT).kustomizations
    }


def _joined(problems: list[str]) -> str:
    return "\n".join(problems)


# -- the real files pass ---------------------------------------------------------------------


def test_the_script_knows_every_check(vd: ModuleType) -> None:
    assert tuple(vd.CHECKS) == CHECK_NAMES


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_check_passes_on_the_repository(results: dict[str, Any], name: str) -> None:
    assert results[name].ok, f"{name} failed:\n{_joined(results[name].problems)}"


def test_model_names_come_from_the_model_repository(vd: ModuleType) -> None:
    layout = vd.Layout.from_root(ROOT)
    names, origin = vd.model_names(layout)
    committed = {p.parent.name for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    if committed:
        assert names == committed
        assert {"ivvae_encoder", "ivvae_decoder"} <= names, (
            f"model_repository/ holds {sorted(names)}; the gateway's Settings defaults name "
            "ivvae_encoder and ivvae_decoder"
        )
    else:
        assert names == {"ivvae_encoder", "ivvae_decoder"}, (
            "model_repository/ has no */config.pbtxt yet, so the deployment files are checked "
            f"against the fixed names ivvae_encoder and ivvae_decoder (got {origin})"
        )


def test_both_renderings_hold_the_expected_objects(rendered: dict[str, Any]) -> None:
    expected = {
        ("Namespace", "ivvae"),
        ("Deployment", "ivvae-gateway"),
        ("Deployment", "ivvae-triton"),
        ("StatefulSet", "ivvae-redis"),
        ("Service", "ivvae-gateway"),
        ("Service", "ivvae-triton"),
        ("Service", "ivvae-triton-headless"),
        ("Service", "ivvae-redis"),
        ("HorizontalPodAutoscaler", "ivvae-gateway"),
        ("PodDisruptionBudget", "ivvae-gateway"),
        ("PodDisruptionBudget", "ivvae-triton"),
        ("NetworkPolicy", "ivvae-default-deny-ingress"),
    }
    for name, objects in rendered.items():
        present = {(o["kind"], o["metadata"]["name"]) for o in objects}
        assert expected <= present, f"{name} lacks {sorted(expected - present)}"
        assert not any(o["kind"] == "Secret" for o in objects), "Secrets are never committed"


def test_cli_reports_and_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "hadolint", "--check", "shellcheck"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok   hadolint" in result.stdout


def test_cli_exits_nonzero_and_says_what_failed(tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "bad.Dockerfile").write_text(
        "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n"
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tmp_path), "--check", "hadolint"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    assert "FAIL hadolint" in result.stdout
    assert "DL3007" in result.stdout and "DL3008" in result.stdout


# -- (a) hadolint and shellcheck bite --------------------------------------------------------


def test_hadolint_rejects_latest_and_unpinned_apt(vd: ModuleType, tmp_path: Path) -> None:
    dockerfile = tmp_path / "bad.Dockerfile"
    dockerfile.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    problems = vd.lint_dockerfiles([dockerfile], ROOT / ".hadolint.yaml")
    text = _joined(problems)
    assert "DL3007" in text, text  # latest tag
    assert "DL3008" in text, text  # apt-get install without versions


def test_hadolint_config_allows_only_trusted_registries(vd: ModuleType, tmp_path: Path) -> None:
    dockerfile = tmp_path / "registry.Dockerfile"
    dockerfile.write_text('FROM quay.io/someone/python:3.11.11\nCMD ["python"]\n')
    assert "DL3026" in _joined(vd.lint_dockerfiles([dockerfile], ROOT / ".hadolint.yaml"))


def test_hadolint_catches_a_regression_in_the_gateway_image(
    vd: ModuleType, deploy_copy: Path
) -> None:
    dockerfile = deploy_copy / "docker" / "gateway.Dockerfile"
    text = dockerfile.read_text()
    assert "pip install --no-cache-dir /src ;;" in text
    dockerfile.write_text(
        text.replace("pip install --no-cache-dir /src ;;", "pip install fastapi ;;")
    )
    problems = _joined(vd.lint_dockerfiles([dockerfile], deploy_copy / ".hadolint.yaml"))
    assert "DL3013" in problems, problems


def test_shellcheck_rejects_unquoted_expansion(vd: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/usr/bin/env bash\ntarget=$1\nrm -rf $target/*\n")
    assert "SC2086" in _joined(vd.lint_shell_scripts([script]))


# -- (b) the compose schema bites ------------------------------------------------------------


def _edit_compose(root: Path, edit: Any) -> Path:
    path = root / "docker-compose.yml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_compose_schema_rejects_unknown_keys_and_wrong_types(
    vd: ModuleType, deploy_copy: Path
) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["services"]["gateway"]["helthcheck"] = {}
        devices = data["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
        devices[0]["capabilities"] = "gpu"

    problems = _joined(vd.validate_compose(_edit_compose(deploy_copy, edit)))
    assert "helthcheck" in problems, problems
    assert "capabilities" in problems and "array" in problems, problems


def test_compose_interpolation_follows_compose_rules(vd: ModuleType) -> None:
    interpolation = vd.Interpolation({"SET": "x", "EMPTY": ""})
    assert interpolation.expand("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}") == "x/d/d/"
    assert interpolation.expand("$$HOME ${SET:+alt} ${UNSET:+alt}") == "$HOME alt "
    assert interpolation.expand("${NEEDED:?set it}") == "<required NEEDED>"
    assert interpolation.required == {"NEEDED"}


# -- (c) kustomize + Kubernetes schemas bite ---------------------------------------------------


def test_k8s_schema_rejects_a_wrong_field_type(vd: ModuleType, rendered: dict[str, Any]) -> None:
    deployment = copy.deepcopy(
        next(
            o
            for o in rendered["base"]
            if o["metadata"]["name"] == "ivvae-gateway" and o["kind"] == "Deployment"
        )
    )
    deployment["spec"]["replicas"] = "two"
    problems = _joined(vd.validate_k8s_schemas([deployment], "broken"))
    assert "spec.replicas" in problems and "'two'" in problems, problems


def test_k8s_schema_is_strict_about_unknown_fields(
    vd: ModuleType, rendered: dict[str, Any]
) -> None:
    deployment = copy.deepcopy(next(o for o in rendered["base"] if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    problems = _joined(vd.validate_k8s_schemas([deployment], "broken"))
    assert "livenesProbe" in problems, problems


def test_schema_check_agrees_with_kubernetes_validate(
    vd: ModuleType, rendered: dict[str, Any]
) -> None:
    """The cached validators use kubernetes-validate's files the way its validate() does."""
    import kubernetes_validate

    objects = [o for o in rendered["gpu"] if o["kind"] in {"Deployment", "NetworkPolicy"}]
    for obj in objects:
        kubernetes_validate.validate(obj, vd.KUBERNETES_VERSIONS[-1], strict=True)
    broken = copy.deepcopy(objects[0])
    broken["spec"]["revisionHistoryLimit"] = "five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, vd.KUBERNETES_VERSIONS[-1], strict=True)
    assert "spec.revisionHistoryLimit" in _joined(vd.validate_k8s_schemas([broken], "broken"))


def test_k8s_schema_rejects_an_unknown_api_version(vd: ModuleType) -> None:
    obj = {"apiVersion": "apps/v1beta9", "kind": "Deployment", "metadata": {"name": "x"}}
    assert "no schema for apps/v1beta9 Deployment" in _joined(
        vd.validate_k8s_schemas([obj], "broken")
    )


def test_k8s_check_renders_and_rejects_a_broken_base(vd: ModuleType, deploy_copy: Path) -> None:
    gateway = deploy_copy / "k8s" / "base" / "gateway.yaml"
    gateway.write_text(gateway.read_text().replace("replicas: 2", 'replicas: "two"', 1))
    layout = vd.Layout.from_root(deploy_copy)
    problems = _joined(vd.check_k8s(layout))
    assert "k8s/base: Deployment/ivvae-gateway invalid" in problems, problems
    assert "k8s/overlays/gpu: Deployment/ivvae-gateway invalid" in problems, problems


def test_k8s_check_reports_a_kustomization_that_does_not_build(
    vd: ModuleType, deploy_copy: Path
) -> None:
    kustomization = deploy_copy / "k8s" / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("- redis.yaml", "- rediss.yaml"))
    problems = _joined(vd.check_k8s(vd.Layout.from_root(deploy_copy)))
    assert "kustomize build" in problems and "rediss.yaml" in problems, problems


def _workload(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(
        o
        for o in objects
        if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == name
    )


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
def test_hardening_rules_bite(
    vd: ModuleType, rendered: dict[str, Any], breakage: Any, expected: str
) -> None:
    objects = copy.deepcopy(rendered["base"])
    spec = _workload(objects, "ivvae-gateway")["spec"]["template"]["spec"]
    breakage(spec["containers"][0], spec)
    assert expected in _joined(vd.check_k8s_hardening(objects, "broken"))


def test_triton_needs_memory_backed_dev_shm(vd: ModuleType, rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["gpu"])
    spec = _workload(objects, "ivvae-triton")["spec"]["template"]["spec"]
    next(v for v in spec["volumes"] if v["name"] == "dshm")["emptyDir"].pop("medium")
    assert "/dev/shm" in _joined(vd.check_k8s_hardening(objects, "broken"))


def test_network_policies_keep_triton_and_redis_private(
    vd: ModuleType, rendered: dict[str, Any]
) -> None:
    objects = copy.deepcopy(rendered["base"])
    policy = next(o for o in objects if o["metadata"]["name"] == "ivvae-redis-ingress")
    policy["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    triton = next(o for o in objects if o["metadata"]["name"] == "ivvae-triton-ingress")
    triton["spec"]["ingress"][0].pop("from")
    objects = [o for o in objects if o["metadata"]["name"] != "ivvae-default-deny-ingress"]
    problems = _joined(vd.check_k8s_hardening(objects, "broken"))
    assert "non-gateway peer reach redis" in problems, problems
    assert "lets anyone reach triton" in problems, problems
    assert "no default-deny ingress" in problems, problems


def test_gpu_overlay_rules_bite(vd: ModuleType, rendered: dict[str, Any]) -> None:
    objects = copy.deepcopy(rendered["gpu"])
    assert vd.check_gpu_overlay(objects, "gpu") == []
    container = _workload(objects, "ivvae-triton")["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"].pop("nvidia.com/gpu")
    for obj in objects:
        if obj["kind"] == "ConfigMap" and "INSTANCE_KIND" in obj.get("data", {}):
            obj["data"]["INSTANCE_KIND"] = "KIND_CPU"
    problems = _joined(vd.check_gpu_overlay(objects, "gpu"))
    assert "nvidia.com/gpu" in problems and "KIND_GPU" in problems, problems


# -- (d) no drift between the deployment files and the code ----------------------------------


def _drift(vd: ModuleType, root: Path) -> str:
    return _joined(vd.check_drift(vd.Layout.from_root(root)).problems)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_drift_setting_names_are_settings_fields(vd: ModuleType) -> None:
    from ivvae.config import Settings

    names = vd.settings_variables(Settings)
    assert names["IVVAE_TRITON_URL"] == "triton_url"
    assert names["IVVAE_BATCH_MAX_DELAY_MS"] == "batch_max_delay_ms"
    assert set(names) == {f"IVVAE_{f.upper()}" for f in Settings.model_fields}


def test_drift_catches_misspelt_variables(vd: ModuleType, deploy_copy: Path) -> None:
    _replace(deploy_copy / "docker-compose.yml", "IVVAE_TRITON_URL:", "IVVAE_TRITON_ULR:")
    _replace(deploy_copy / "k8s" / "base" / "gateway.env", "IVVAE_REDIS_URL=", "IVVAE_REDIS_URI=")
    _replace(
        deploy_copy / "docker" / "gateway.Dockerfile",
        "IVVAE_HOST=0.0.0.0",
        "IVVAE_HOSTNAME=0.0.0.0",
    )
    problems = _drift(vd, deploy_copy)
    for where, name in (
        ("docker-compose.yml", "IVVAE_TRITON_ULR"),
        ("k8s/base", "IVVAE_REDIS_URI"),
        ("k8s/overlays/gpu", "IVVAE_REDIS_URI"),
        ("docker/gateway.Dockerfile", "IVVAE_HOSTNAME"),
    ):
        assert f"{where}: {name} is not a field of ivvae.config.Settings" in problems, problems


def test_drift_catches_values_and_defaults_that_disagree_with_settings(
    vd: ModuleType, deploy_copy: Path
) -> None:
    _replace(
        deploy_copy / "k8s" / "base" / "gateway.env",
        "IVVAE_BACKEND=triton",
        "IVVAE_BACKEND=trition",
    )
    _replace(
        deploy_copy / "docker-compose.yml",
        "${IVVAE_BATCH_MAX_SIZE:-8}",
        "${IVVAE_BATCH_MAX_SIZE:-16}",
    )
    problems = _drift(vd, deploy_copy)
    assert "k8s/base: gateway settings" in problems and "backend" in problems, problems
    assert "IVVAE_BATCH_MAX_SIZE defaults to '16', Settings to 8" in problems, problems


def test_drift_catches_wrong_ports(vd: ModuleType, deploy_copy: Path) -> None:
    _replace(deploy_copy / "docker-compose.yml", ':-8000}:8000"', ':-8000}:8080"')
    _replace(
        deploy_copy / "k8s" / "base" / "triton.yaml", "containerPort: 8002", "containerPort: 9002"
    )
    _replace(
        deploy_copy / "docker-compose.yml",
        "IVVAE_TRITON_URL: triton:8001",
        "IVVAE_TRITON_URL: triton:8000",
    )
    _replace(
        deploy_copy / "k8s" / "base" / "gateway.env",
        "dns:///ivvae-triton-headless.ivvae.svc",
        "dns:///ivvae-triton.ivvae.svc",
    )
    problems = _drift(vd, deploy_copy)
    assert "is not the headless Triton Service" in problems, problems
    assert "compose gateway publishes container ports [8080, 50051]" in problems, problems
    assert "triton containerPorts" in problems, problems
    assert "IVVAE_TRITON_URL endpoint triton:8000" in problems, problems


def test_drift_catches_wrong_probe_paths(vd: ModuleType, deploy_copy: Path) -> None:
    _replace(deploy_copy / "k8s" / "base" / "gateway.yaml", "path: /readyz", "path: /ready")
    _replace(
        deploy_copy / "k8s" / "base" / "triton.yaml", "path: /v2/health/ready", "path: /v2/ready"
    )
    _replace(deploy_copy / "docker-compose.yml", "8000/v2/health/ready", "8000/v2/health/live")
    problems = _drift(vd, deploy_copy)
    assert "gateway readinessProbe must GET /readyz" in problems, problems
    assert "triton startupProbe must GET /v2/health/ready" in problems, problems
    assert "compose triton: healthcheck must GET" in problems, problems


def test_drift_catches_an_unknown_model_name(vd: ModuleType, deploy_copy: Path) -> None:
    docs = deploy_copy / "docs" / "deploy.md"
    docs.write_text(docs.read_text() + "\nThe ivvae_video_encoder model.\n")
    assert "Triton model 'ivvae_video_encoder' is not in" in _drift(vd, deploy_copy)


def test_drift_uses_the_model_repository_once_it_exists(vd: ModuleType, deploy_copy: Path) -> None:
    shutil.rmtree(deploy_copy / "model_repository")
    (deploy_copy / "model_repository").mkdir()
    for name in ("ivvae_encoder", "ivvae_decoder_v2"):
        (deploy_copy / "model_repository" / name).mkdir()
        (deploy_copy / "model_repository" / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    problems = _drift(vd, deploy_copy)
    assert re.search(
        r"Settings.triton_decoder_model defaults to 'ivvae_decoder', not a model", problems
    ), problems
    assert "Triton model 'ivvae_decoder' is not in model_repository/*/config.pbtxt" in problems


def test_dockerignore_must_deny_by_default_and_keep_weights_out(
    vd: ModuleType, deploy_copy: Path
) -> None:
    layout = vd.Layout.from_root(deploy_copy)
    assert vd.check_dockerignore(layout) == []
    _replace(deploy_copy / ".dockerignore", "!docker\n", "!weights\n")
    problems = _joined(vd.check_dockerignore(layout))
    assert "'!weights' lets private files into build contexts" in problems, problems
    assert "COPY docker/healthcheck.py is excluded by .dockerignore" in problems, problems
    (deploy_copy / ".dockerignore").write_text("weights\n")
    assert "must start with '*'" in _joined(vd.check_dockerignore(layout))


def test_dockerfile_instructions_join_continuation_lines(vd: ModuleType) -> None:
    text = (
        "FROM x:1\n# note\nCOPY --chmod=0755 a \\\n  # inline comment\n  b /dst/\nEXPOSE 1 2/tcp\n"
    )
    assert vd.dockerfile_instructions(text) == [
        ("FROM", ["x:1"]),
        ("COPY", ["--chmod=0755", "a", "b", "/dst/"]),
        ("EXPOSE", ["1", "2/tcp"]),
    ]
    assert vd._exposed(text) == {1, 2}
