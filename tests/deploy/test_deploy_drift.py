"""scripts/deploy_checks/drift.py: no drift between the deployment files and the code.

Most tests break a scratch copy in one way and run the whole check; the ones on a single
aspect call its function on edited copies of the rendered objects.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripts.deploy_checks.common import Layout
from scripts.deploy_checks.drift import (
    DeployFiles,
    Gateway,
    check_drift,
    drift_images,
    drift_k8s,
    drift_tool_variables,
    model_names,
    settings_variables,
)

from ivvae.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gateway() -> Gateway:
    return Gateway.from_settings(Settings)


@pytest.fixture(scope="module")
def files() -> DeployFiles:
    return DeployFiles.read(Layout.from_root(ROOT))


def _drift(root: Path) -> str:
    return "\n".join(check_drift(Layout.from_root(root)).problems)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def _object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_drift_setting_names_are_settings_fields() -> None:
    names = settings_variables(Settings)
    assert names["IVVAE_TRITON_URL"] == "triton_url"
    assert names["IVVAE_BATCH_MAX_DELAY_MS"] == "batch_max_delay_ms"
    assert set(names) == {f"IVVAE_{f.upper()}" for f in Settings.model_fields}


def test_drift_catches_misspelt_variables(deploy_copy: Path) -> None:
    _replace(deploy_copy / "docker-compose.yml", "IVVAE_TRITON_URL:", "IVVAE_TRITON_ULR:")
    _replace(deploy_copy / "k8s" / "base" / "gateway.env", "IVVAE_REDIS_URL=", "IVVAE_REDIS_URI=")
    _replace(
        deploy_copy / "docker" / "gateway.Dockerfile",
        "IVVAE_HOST=0.0.0.0",
        "IVVAE_HOSTNAME=0.0.0.0",
    )
    problems = _drift(deploy_copy)
    for where, name in (
        ("docker-compose.yml", "IVVAE_TRITON_ULR"),
        ("k8s/base", "IVVAE_REDIS_URI"),
        ("k8s/overlays/gpu", "IVVAE_REDIS_URI"),
        ("docker/gateway.Dockerfile", "IVVAE_HOSTNAME"),
    ):
        assert f"{where}: {name} is not a field of ivvae.config.Settings" in problems, problems


def test_drift_catches_values_and_defaults_that_disagree_with_settings(deploy_copy: Path) -> None:
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
    problems = _drift(deploy_copy)
    assert "k8s/base: gateway settings" in problems and "backend" in problems, problems
    assert "IVVAE_BATCH_MAX_SIZE defaults to '16', Settings to 8" in problems, problems


def test_drift_catches_wrong_ports(deploy_copy: Path) -> None:
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
    problems = _drift(deploy_copy)
    assert "is not the headless Triton Service" in problems, problems
    assert "compose gateway publishes container ports [8080, 50051]" in problems, problems
    assert "triton containerPorts" in problems, problems
    assert "IVVAE_TRITON_URL endpoint triton:8000" in problems, problems


def test_drift_catches_wrong_probe_paths(deploy_copy: Path) -> None:
    _replace(deploy_copy / "k8s" / "base" / "gateway.yaml", "path: /readyz", "path: /ready")
    _replace(
        deploy_copy / "k8s" / "base" / "triton.yaml", "path: /v2/health/ready", "path: /v2/ready"
    )
    _replace(deploy_copy / "docker-compose.yml", "8000/v2/health/ready", "8000/v2/health/live")
    problems = _drift(deploy_copy)
    assert "gateway readinessProbe must GET /readyz" in problems, problems
    assert "triton startupProbe must GET /v2/health/ready" in problems, problems
    assert "compose triton: healthcheck must GET" in problems, problems


def test_drift_catches_compose_start_order_and_writable_weights(deploy_copy: Path) -> None:
    compose = deploy_copy / "docker-compose.yml"
    _replace(compose, "./weights:/weights:ro", "./weights:/weights")
    text = compose.read_text()
    first = text.index("condition: service_healthy")
    compose.write_text(text[:first] + text[first:].replace("healthy", "started", 1))
    problems = _drift(deploy_copy)
    assert "compose gateway: depends_on triton must use condition service_healthy" in problems
    assert "compose triton: weights must be mounted read-only at /weights" in problems, problems


def test_drift_catches_an_unknown_model_name(deploy_copy: Path) -> None:
    docs = deploy_copy / "docs" / "deploy.md"
    docs.write_text(docs.read_text() + "\nThe ivvae_video_encoder model.\n")
    assert "Triton model 'ivvae_video_encoder' is not in" in _drift(deploy_copy)


def test_model_names_are_the_model_repository() -> None:
    names, origin = model_names(Layout.from_root(ROOT))
    committed = {p.parent.name for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    assert names == committed and origin == "model_repository/*/config.pbtxt"
    assert {"ivvae_encoder", "ivvae_decoder"} <= names, (
        f"model_repository/ holds {sorted(names)}; the gateway's Settings defaults name "
        "ivvae_encoder and ivvae_decoder"
    )


def test_drift_follows_the_model_repository(deploy_copy: Path) -> None:
    shutil.rmtree(deploy_copy / "model_repository")
    (deploy_copy / "model_repository").mkdir()
    for name in ("ivvae_encoder", "ivvae_decoder_v2"):
        (deploy_copy / "model_repository" / name).mkdir()
        (deploy_copy / "model_repository" / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    problems = _drift(deploy_copy)
    assert re.search(
        r"Settings.triton_decoder_model defaults to 'ivvae_decoder', not a model", problems
    ), problems
    assert "Triton model 'ivvae_decoder' is not in model_repository/*/config.pbtxt" in problems


def test_drift_needs_a_model_repository_with_models(deploy_copy: Path) -> None:
    shutil.rmtree(deploy_copy / "model_repository")
    (deploy_copy / "model_repository").mkdir()
    assert check_drift(Layout.from_root(deploy_copy)).problems == [
        "model_repository/*/config.pbtxt matches nothing: the Triton models are committed there"
    ]


# -- single aspects ----------------------------------------------------------------------------


def test_k8s_drift_passes_on_both_renderings(rendered: dict[str, Any], gateway: Gateway) -> None:
    for source, objects in rendered.items():
        assert drift_k8s(objects, source, gateway) == []


def test_k8s_drift_catches_keys_namespaces_and_service_ports(
    rendered: dict[str, Any], gateway: Gateway
) -> None:
    objects = copy.deepcopy(rendered["base"])
    config = _object(objects, "Deployment", "ivvae-gateway")["spec"]["template"]["spec"]
    config_name = config["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    data = _object(objects, "ConfigMap", config_name)["data"]
    data["IVVAE_API_KEYS"] = "k"
    data["IVVAE_ARTIFACT_DIR"] = "/artifacts"
    data["IVVAE_TRITON_URL"] = data["IVVAE_TRITON_URL"].replace(".ivvae.", ".other.")
    _object(objects, "Service", "ivvae-redis")["spec"]["ports"][0]["port"] = 6380
    assert drift_k8s(objects, "k8s/base", gateway) == [
        "k8s/base: IVVAE_API_KEYS must not be in a ConfigMap (use the Secret)",
        "k8s/base: gateway gets IVVAE_ARTIFACT_DIR, a Triton-side variable",
        "k8s/base: Service/ivvae-redis port redis=6380, expected 6379",
        "k8s/base: IVVAE_TRITON_URL namespace 'other' is not the deployment's 'ivvae'",
    ]


def test_k8s_drift_needs_both_deployments(rendered: dict[str, Any], gateway: Gateway) -> None:
    objects = [o for o in rendered["base"] if o["metadata"]["name"] != "ivvae-triton"]
    assert drift_k8s(objects, "k8s/base", gateway) == [
        "k8s/base: needs a gateway and a triton Deployment (label app.kubernetes.io/component)"
    ]


def test_image_drift_catches_ports_and_health_checks(
    deploy_copy: Path, files: DeployFiles, gateway: Gateway
) -> None:
    layout = Layout.from_root(deploy_copy)
    assert drift_images(layout, files, gateway) == []
    _replace(layout.gateway_dockerfile, "EXPOSE", "EXPOSE 9999")
    _replace(layout.healthcheck_script, 'DEFAULT_PATH = "/healthz"', 'DEFAULT_PATH = "/"')
    entrypoint = files.entrypoint_text.replace("--grpc-port=8001", "--grpc-port=8011")
    assert drift_images(
        layout, dataclasses.replace(files, entrypoint_text=entrypoint), gateway
    ) == [
        "docker/gateway.Dockerfile: EXPOSE [8000, 9999, 50051], expected 8000 50051",
        "docker/triton-entrypoint.sh: tritonserver needs --grpc-port=8001",
        "docker/healthcheck.py: default path must be /healthz",
    ]


def test_a_tool_variable_no_code_reads_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "cli.py").write_text('DEBUG_ENV = "IVVAE_DEBUG"\n')
    (tmp_path / "config.py").write_text('TOOL_VARIABLES = {"IVVAE_SHARD_COUNT"}\n')  # a list
    problems = drift_tool_variables(tmp_path, frozenset({"IVVAE_DEBUG", "IVVAE_SHARD_COUNT"}),
                                    "IVVAE_DEBUG=1 shows tracebacks")
    assert "IVVAE_SHARD_COUNT is listed as a tool variable, and no code" in " ".join(problems)
    assert "IVVAE_SHARD_COUNT is a tool variable the deployment docs do not name" in problems
    assert not any("IVVAE_DEBUG" in p for p in problems)


def test_drift_catches_a_shutdown_grace_the_orchestrator_cuts_short(deploy_copy: Path) -> None:
    # In-flight requests must get their 503 (retry) before the orchestrator kills the pod.
    _replace(deploy_copy / "k8s" / "base" / "gateway.env", "IVVAE_SHUTDOWN_GRACE_S=110",
             "IVVAE_SHUTDOWN_GRACE_S=118")
    _replace(deploy_copy / "docker-compose.yml", "stop_grace_period: 60s\n\nvolumes:",
             "stop_grace_period: 30s\n\nvolumes:")
    problems = _drift(deploy_copy)
    assert "compose gateway: IVVAE_SHUTDOWN_GRACE_S is 50 s and the orchestrator kills " \
        "after 30 s" in problems
    assert "gateway: IVVAE_SHUTDOWN_GRACE_S is 118 s and the orchestrator kills after 115 s" \
        in problems


def test_settings_come_from_the_checkout_when_ivvae_is_not_installed() -> None:
    """A job that lints the deployment files without installing the package still reads
    Settings: from ``service/`` of the checkout it validates."""
    service = str(ROOT / "service")
    script = f"""
import sys
sys.path[:] = [p for p in sys.path if p != {service!r}]  # the editable install's entry
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from scripts.deploy_checks.drift import load_settings_class, settings_variables
settings = load_settings_class(Path({str(ROOT)!r}))
print(settings.__module__, sys.modules[settings.__module__].__file__)
print(len(settings_variables(settings)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    module, count = done.stdout.split("\n")[:2]
    assert module.split() == ["ivvae.config", str(ROOT / "service" / "ivvae" / "config.py")]
    assert int(count) == len(settings_variables(Settings))
