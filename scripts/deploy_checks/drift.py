"""The ``drift`` check: the deployment files against the code.

Every ``IVVAE_*`` name is a field of ``ivvae.config.Settings`` and every value and default
parses as one; ports, Triton model names and probe paths agree everywhere; ``.dockerignore``
lets through what the images copy and keeps weights out. One function per aspect; each
returns its problems in the order the files are read.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .common import K8sObject, Layout, dump_yaml_documents, load_yaml
from .compose import Interpolation, load_compose
from .dockerfiles import check_dockerignore, exposed_ports
from .k8s import (
    COMPONENT_LABEL,
    configmap_data,
    container_env,
    container_ports,
    find_container,
    find_workload,
    object_name,
    probe_path,
    render_kustomization,
)

# -- facts the deployment must agree with, each stated once ------------------------------------
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
REDIS_PORT = 6379
GATEWAY_LIVENESS_PATH = "/healthz"
GATEWAY_READINESS_PATH = "/readyz"
TRITON_READY_PATH = "/v2/health/ready"
IVVAE_NAME_RE = re.compile(r"\bIVVAE_[A-Z][A-Z0-9_]*\b")
MODEL_NAME_RE = re.compile(r"\bivvae_[a-z0-9_]*(?:encoder|decoder)\b")


@dataclass
class DriftReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Problems(list[str]):
    """Problem messages, each prefixed with ``prefix`` (the file they are about)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            self.add(message)

    def add(self, message: str) -> None:
        self.append(f"{self.prefix}{message}")


def check_drift(layout: Layout) -> DriftReport:
    gateway = Gateway.from_settings(load_settings_class(layout.root))
    report = DriftReport(problems=drift_default_ports(gateway))
    files = DeployFiles.read(layout)
    report.problems += [f"{layout.rel(p)} is missing" for p in layout.docs if not p.is_file()]
    report.problems += drift_variable_names(files, gateway)
    report.problems += drift_tool_variables(package_folder(layout.root), gateway.tool_variables,
                                            "\n".join(files.docs_text.values()))
    report.problems += drift_compose(files, gateway)
    for source, objects in files.rendered.items():
        report.problems += drift_k8s(objects, source, gateway)
    report.problems += drift_images(layout, files, gateway)
    report.problems += check_dockerignore(layout)
    names, origin = model_names(layout)
    report.notes.append(f"Triton model names checked against {origin}")
    report.problems += drift_model_names(files, gateway, names, origin)
    return report


# -- the code's side: Settings ---------------------------------------------------------------------


def load_settings_class(root: Path) -> type[Any]:
    """``ivvae.config.Settings``: the installed package's, else the checkout's (``root/service``
    on the path; the module needs pydantic, not torch)."""
    try:
        from ivvae.config import Settings
    except ImportError:
        sys.path.insert(0, str(root / "service"))
        from ivvae.config import Settings
    settings: type[Any] = Settings
    return settings


def settings_variables(settings: type[Any]) -> dict[str, str]:
    """``IVVAE_<FIELD>`` -> field name, for every field of Settings (named as its module,
    ``ivvae.config``, names them)."""
    variable = sys.modules[settings.__module__].variable
    return {variable(name): name for name in settings.model_fields}


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


@dataclass(frozen=True)
class Gateway:
    """What the code says of the gateway: its Settings class and the ports it defaults to."""

    settings: type[Any]
    variables: dict[str, str]  # IVVAE_* -> Settings field
    http_port: int
    grpc_port: int
    # IVVAE_* variables that are not gateway settings (ivvae.config says which): the
    # command-line tools' and the Triton python models'.
    tool_variables: frozenset[str] = frozenset()
    model_side_variables: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: type[Any]) -> Gateway:
        config = sys.modules[settings.__module__]
        return cls(
            settings=settings,
            variables=settings_variables(settings),
            http_port=settings_default(settings, "IVVAE_PORT"),
            grpc_port=settings_default(settings, "IVVAE_GRPC_PORT"),
            tool_variables=frozenset(config.TOOL_VARIABLES),
            model_side_variables=frozenset(config.MODEL_SIDE_VARIABLES),
        )

    @property
    def ports(self) -> dict[str, int]:
        return {"http": self.http_port, "grpc": self.grpc_port}

    @property
    def port_variables(self) -> tuple[tuple[str, int], ...]:
        """The settings that name the ports, each with the port it must agree with."""
        return (("IVVAE_PORT", self.http_port), ("IVVAE_GRPC_PORT", self.grpc_port))


def model_names(layout: Layout) -> tuple[frozenset[str], str]:
    """Triton model names (the model repository's models) and where they came from."""
    found = frozenset(
        config.parent.name for config in layout.model_repository.glob("*/config.pbtxt")
    )
    return found, f"{layout.rel(layout.model_repository)}/*/config.pbtxt"


# -- the deployment's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeployFiles:
    """The deployment files the aspects read, each read once; sources are paths from the root."""

    compose_source: str
    compose_text: str
    compose: Any  # as Compose uses it: ${VAR:-default} interpolated with the defaults
    interpolation: Interpolation
    rendered: dict[str, list[K8sObject]]  # kustomization directory -> objects
    rendered_text: dict[str, str]
    dockerfile_text: dict[str, str]
    docs_text: dict[str, str]
    entrypoint_source: str
    entrypoint_text: str

    @classmethod
    def read(cls, layout: Layout) -> DeployFiles:
        compose_text = layout.compose_file.read_text()
        compose, interpolation = load_compose(layout.compose_file)
        rendered = {layout.rel(d): render_kustomization(d) for d in layout.kustomizations}
        return cls(
            compose_source=layout.rel(layout.compose_file),
            compose_text=compose_text,
            compose=compose,
            interpolation=interpolation,
            rendered=rendered,
            rendered_text={s: dump_yaml_documents(objs) for s, objs in rendered.items()},
            dockerfile_text={layout.rel(p): p.read_text() for p in layout.dockerfiles},
            docs_text={layout.rel(p): p.read_text() for p in layout.docs if p.is_file()},
            entrypoint_source=layout.rel(layout.triton_entrypoint),
            entrypoint_text=layout.triton_entrypoint.read_text(),
        )


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


# -- aspects -----------------------------------------------------------------------------------


def drift_default_ports(gateway: Gateway) -> list[str]:
    problems = Problems()
    problems.expect(
        (gateway.http_port, gateway.grpc_port) == (8000, 50051),
        f"Settings defaults changed: port={gateway.http_port}, grpc_port={gateway.grpc_port}; "
        "the deployment files, docs and this script assume 8000 and 50051",
    )
    return problems


def package_folder(root: Path) -> Path:
    """``service/ivvae`` of ``root``, else the installed package's folder."""
    local = root / "service" / "ivvae"
    if local.is_dir():
        return local
    import importlib.util

    spec = importlib.util.find_spec("ivvae")
    assert spec is not None and spec.submodule_search_locations, "ivvae is not importable"
    return Path(next(iter(spec.submodule_search_locations)))


def drift_tool_variables(package: Path, tool_variables: frozenset[str],
                         docs: str = "") -> list[str]:
    """Each tool variable is still read by the package's code, and (with ``docs``, the
    deployment docs' text) documented there."""
    # Not the list itself (ivvae/config.py names them all).
    code = "\n".join(p.read_text() for p in package.rglob("*.py")
                     if p != package / "config.py")
    problems = [f"{name} is listed as a tool variable, and no code in {package.name} reads it"
                for name in sorted(tool_variables) if f'"{name}"' not in code]
    if docs:
        problems += [f"{name} is a tool variable the deployment docs do not name"
                     for name in sorted(tool_variables) if name not in docs]
    return problems


def drift_variable_names(files: DeployFiles, gateway: Gateway) -> list[str]:
    """Every IVVAE_* name in every file is a field of Settings (or a model-side variable)."""
    allowed = set(gateway.variables) | gateway.model_side_variables | gateway.tool_variables
    texts = {files.compose_source: files.compose_text, **files.rendered_text}
    texts.update(files.dockerfile_text)
    texts.update(files.docs_text)
    texts[files.entrypoint_source] = files.entrypoint_text
    problems = []
    for source, text in texts.items():
        for name in sorted(set(IVVAE_NAME_RE.findall(text)) - allowed):
            problems.append(
                f"{source}: {name} is not a field of ivvae.config.Settings "
                "(service/ivvae/config.py; IVVAE_ + upper-cased field name)"
            )
    return problems


def drift_compose(files: DeployFiles, gateway: Gateway) -> list[str]:
    """The compose gateway's settings parse and default to Settings' defaults; its endpoints
    name real services and ports; the triton service is health-checked and gets the weights."""
    services = files.compose.get("services", {}) or {}
    service = services.get("gateway", {}) or {}
    raw_service = (load_yaml(files.compose_text).get("services", {}) or {}).get("gateway", {})
    env = {str(k): str(v) for k, v in (service.get("environment") or {}).items()}
    stop = service.get("stop_grace_period")
    return [
        *_compose_gateway_settings(env, raw_service, files.interpolation, gateway),
        *grace_problems(_shutdown_grace(gateway, env),
                        None if stop is None else _seconds(stop), "compose gateway"),
        *_compose_gateway_ports(service, env, gateway),
        *_compose_gateway_wiring(service, env, services),
        *_compose_triton(services.get("triton", {}) or {}),
    ]


def _compose_gateway_settings(
    env: Mapping[str, str],
    raw_service: Mapping[str, Any],
    interpolation: Interpolation,
    gateway: Gateway,
) -> list[str]:
    problems = Problems()
    for key in set(env) & gateway.model_side_variables:
        problems.add(f"compose gateway: {key} belongs to Triton, not the gateway")
    problems += [f"compose gateway environment: {p}" for p in parse_settings(gateway.settings, env)]
    # ${IVVAE_X:-default} as written: the default must mean what Settings' default means.
    variables = gateway.variables
    for key, value in (raw_service.get("environment") or {}).items():
        match = re.fullmatch(r"\$\{(\w+):?-(.*)\}", str(value))
        if match and match[1] == key and key in variables:
            default = settings_default(gateway.settings, key)
            parsed = getattr(
                gateway.settings.model_validate({variables[key]: match[2]}), variables[key]
            )
            problems.expect(
                parsed == default,
                f"compose gateway: {key} defaults to {match[2]!r}, Settings to {default!r}",
            )
    for name in sorted(interpolation.used & set(variables)):
        problems.expect(
            name in env,
            f"compose: ${{{name}}} is interpolated outside the gateway's environment",
        )
    return problems


def _compose_gateway_ports(
    service: Mapping[str, Any], env: Mapping[str, str], gateway: Gateway
) -> list[str]:
    problems = Problems()
    published = {
        int(str(spec).rsplit(":", 1)[-1].split("/")[0]) for spec in service.get("ports", []) or []
    }
    problems.expect(
        published == {gateway.http_port, gateway.grpc_port},
        f"compose gateway publishes container ports {sorted(published)}, "
        f"Settings defaults are {gateway.http_port} and {gateway.grpc_port}",
    )
    for key, expected in gateway.port_variables:
        if key in env:
            problems.expect(
                int(env[key]) == expected,
                f"compose gateway: {key}={env[key]} but the published port is {expected}",
            )
    return problems


def _compose_gateway_wiring(
    service: Mapping[str, Any], env: Mapping[str, str], services: Mapping[str, Any]
) -> list[str]:
    """It talks to Triton and Redis: backend, bind address, endpoints, start order."""
    problems = Problems()
    problems.expect(
        env.get("IVVAE_BACKEND") == "triton", "compose gateway: IVVAE_BACKEND must be triton"
    )
    problems.expect(
        env.get("IVVAE_HOST") == "0.0.0.0", "compose gateway: IVVAE_HOST must be 0.0.0.0"
    )
    for host, port in _triton_endpoints(env.get("IVVAE_TRITON_URL", ":0")):
        problems.expect(
            host in services and port == TRITON_PORTS["grpc"],
            f"compose: IVVAE_TRITON_URL endpoint {host}:{port} is not the triton service's "
            f"gRPC port {TRITON_PORTS['grpc']}",
        )
    redis_url = urlsplit(env.get("IVVAE_REDIS_URL", ""))
    problems.expect(
        redis_url.hostname in services and (redis_url.port or REDIS_PORT) == REDIS_PORT,
        f"compose: IVVAE_REDIS_URL {redis_url.geturl()!r} is not the redis service",
    )
    depends = service.get("depends_on", {}) or {}
    for needed in ("triton", "redis"):
        condition = (
            (depends.get(needed) or {}).get("condition") if isinstance(depends, dict) else None
        )
        problems.expect(
            condition == "service_healthy",
            f"compose gateway: depends_on {needed} must use condition service_healthy",
        )
    return problems


def _seconds(value: Any) -> float | None:
    """A compose duration (``60s``, ``1m30s``, ``90``) in seconds; None when unreadable."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def grace_problems(shutdown_grace_s: float, stop_wait_s: float | None, where: str) -> list[str]:
    """In-flight requests get ``shutdown_grace_s`` after SIGTERM; the orchestrator waits
    ``stop_wait_s`` (after any preStop) before it kills: the grace must end first, or a
    long request is killed without the 503 that tells its client to retry."""
    if stop_wait_s is None:
        return [f"{where}: no stop grace period is set"]
    if shutdown_grace_s + 5 > stop_wait_s:
        return [f"{where}: IVVAE_SHUTDOWN_GRACE_S is {shutdown_grace_s:g} s and the "
                f"orchestrator kills after {stop_wait_s:g} s: keep the setting at least "
                "5 s shorter"]
    return []


def _shutdown_grace(gateway: Gateway, values: Mapping[str, str]) -> float:
    field_name = gateway.variables["IVVAE_SHUTDOWN_GRACE_S"]
    if "IVVAE_SHUTDOWN_GRACE_S" in values:
        try:
            return float(getattr(gateway.settings.model_validate(
                {field_name: values["IVVAE_SHUTDOWN_GRACE_S"]}), field_name))
        except ValueError:
            pass  # parse_settings reports it
    return float(settings_default(gateway.settings, "IVVAE_SHUTDOWN_GRACE_S"))


def _compose_triton(service: Mapping[str, Any]) -> list[str]:
    problems = Problems()
    healthcheck = " ".join(map(str, (service.get("healthcheck") or {}).get("test", [])))
    problems.expect(
        TRITON_READY_PATH in healthcheck and f":{TRITON_PORTS['http']}/" in healthcheck,
        f"compose triton: healthcheck must GET :{TRITON_PORTS['http']}{TRITON_READY_PATH}",
    )
    problems.expect(
        any(str(v).endswith(":/weights:ro") for v in service.get("volumes", []) or []),
        "compose triton: weights must be mounted read-only at /weights",
    )
    return problems


def drift_k8s(objects: Sequence[K8sObject], source: str, gateway: Gateway) -> list[str]:
    """One rendering of k8s/: the gateway's settings, ports and probes, Triton's ports, weights
    and probes, the Services' ports, and the gateway's endpoints, against the code."""
    gateway_deployment = find_workload(objects, "Deployment", "gateway")
    triton_deployment = find_workload(objects, "Deployment", "triton")
    if gateway_deployment is None or triton_deployment is None:
        return [f"{source}: needs a gateway and a triton Deployment (label {COMPONENT_LABEL})"]
    services = [obj for obj in objects if obj.get("kind") == "Service"]
    container = find_container(gateway_deployment, "gateway")
    config = configmap_data(objects, gateway_deployment, "gateway")
    env = {k: v for k, v in container_env(container).items() if v is not None}
    values = {**config, **env}
    namespace = gateway_deployment["metadata"].get("namespace")
    prefix = f"{source}: "
    spec = gateway_deployment["spec"]["template"]["spec"]
    pre_stop = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {})
    command = [str(c) for c in pre_stop.get("command", [])]
    sleeping = float(command[1]) if command[:1] == ["sleep"] and len(command) == 2 else 0.0
    # Kubernetes' default grace is 30 s; the preStop hook's time counts against it.
    wait = float(spec.get("terminationGracePeriodSeconds", 30)) - sleeping
    return [
        *_k8s_gateway(container, config, values, gateway, prefix),
        *grace_problems(_shutdown_grace(gateway, values), wait, f"{source}: gateway"),
        *_k8s_triton(find_container(triton_deployment, "triton"), prefix),
        *_k8s_service_ports(services, gateway, prefix),
        *_k8s_gateway_endpoints(values, services, namespace, prefix),
    ]


def _k8s_gateway(
    container: Mapping[str, Any],
    config: Mapping[str, str],
    values: Mapping[str, str],
    gateway: Gateway,
    prefix: str,
) -> list[str]:
    problems = Problems(prefix)
    secret_names = {
        item["name"]
        for item in container.get("env", []) or []
        if "secretKeyRef" in (item.get("valueFrom") or {})
    }
    problems.expect("IVVAE_API_KEYS" in secret_names, "IVVAE_API_KEYS must come from a Secret")
    problems.expect(
        "IVVAE_API_KEYS" not in config, "IVVAE_API_KEYS must not be in a ConfigMap (use the Secret)"
    )
    for key in (set(values) | secret_names) & gateway.model_side_variables:
        problems.add(f"gateway gets {key}, a Triton-side variable")
    for problem in parse_settings(gateway.settings, values):
        problems.add(f"gateway settings: {problem}")
    problems.expect(values.get("IVVAE_BACKEND") == "triton", "gateway IVVAE_BACKEND must be triton")
    problems.expect(values.get("IVVAE_HOST") == "0.0.0.0", "gateway IVVAE_HOST must be 0.0.0.0")
    ports = container_ports(container)
    problems.expect(
        ports == gateway.ports,
        f"gateway containerPorts {ports}, expected http={gateway.http_port} "
        f"grpc={gateway.grpc_port}",
    )
    for key, expected in gateway.port_variables:
        if key in values:
            problems.expect(
                int(values[key]) == expected, f"gateway {key}={values[key]}, port is {expected}"
            )
    problems.expect(
        probe_path(container, "livenessProbe") == GATEWAY_LIVENESS_PATH,
        f"gateway livenessProbe must GET {GATEWAY_LIVENESS_PATH}",
    )
    problems.expect(
        probe_path(container, "readinessProbe") == GATEWAY_READINESS_PATH,
        f"gateway readinessProbe must GET {GATEWAY_READINESS_PATH}",
    )
    return problems


def _k8s_triton(container: Mapping[str, Any], prefix: str) -> list[str]:
    problems = Problems(prefix)
    ports = container_ports(container)
    problems.expect(
        ports == TRITON_PORTS, f"triton containerPorts {ports}, expected {TRITON_PORTS}"
    )
    weights = [
        m for m in container.get("volumeMounts", []) or [] if m.get("mountPath") == "/weights"
    ]
    problems.expect(
        len(weights) == 1 and weights[0].get("readOnly") is True,
        "triton must mount the weights read-only at /weights",
    )
    for probe in ("readinessProbe", "startupProbe"):
        problems.expect(
            probe_path(container, probe) == TRITON_READY_PATH,
            f"triton {probe} must GET {TRITON_READY_PATH}",
        )
    return problems


def _k8s_service_ports(services: Sequence[K8sObject], gateway: Gateway, prefix: str) -> list[str]:
    """Each Service's ports are those of the component it selects."""
    problems = Problems(prefix)
    expected_by_component = {
        "gateway": gateway.ports,
        "triton": TRITON_PORTS,
        "redis": {"redis": REDIS_PORT},
    }
    for service in services:
        target = service["spec"].get("selector", {}).get(COMPONENT_LABEL)
        expected = expected_by_component.get(str(target), {})
        for port in service["spec"].get("ports", []):
            name = port.get("name")
            problems.expect(
                expected.get(name) == port["port"],
                f"{object_name(service)} port {name}={port['port']}, expected {expected.get(name)}",
            )
    return problems


def _k8s_gateway_endpoints(
    values: Mapping[str, str], services: Sequence[K8sObject], namespace: Any, prefix: str
) -> list[str]:
    """IVVAE_TRITON_URL names the headless Triton Service; IVVAE_REDIS_URL the Redis one."""
    problems = Problems(prefix)
    for host, port in _triton_endpoints(values.get("IVVAE_TRITON_URL", ":0")):
        labels = host.split(".")
        headless: K8sObject | None = next(
            (s for s in services if s["metadata"]["name"] == labels[0]), None
        )
        problems.expect(
            headless is not None
            and headless["spec"].get("clusterIP") == "None"
            and headless["spec"].get("selector", {}).get(COMPONENT_LABEL) == "triton",
            f"IVVAE_TRITON_URL host {host!r} is not the headless Triton Service",
        )
        problems.expect(
            port == TRITON_PORTS["grpc"], f"IVVAE_TRITON_URL port {port} is not Triton's gRPC"
        )
        if len(labels) > 1:
            problems.expect(
                labels[1] == namespace,
                f"IVVAE_TRITON_URL namespace {labels[1]!r} is not the deployment's {namespace!r}",
            )
    redis_url = urlsplit(values.get("IVVAE_REDIS_URL", ""))
    redis_host = (redis_url.hostname or "").split(".")[0]
    problems.expect(
        any(
            s["metadata"]["name"] == redis_host
            and s["spec"].get("selector", {}).get(COMPONENT_LABEL) == "redis"
            for s in services
        )
        and (redis_url.port or REDIS_PORT) == REDIS_PORT,
        f"IVVAE_REDIS_URL {redis_url.geturl()!r} is not the Redis Service",
    )
    return problems


def drift_images(layout: Layout, files: DeployFiles, gateway: Gateway) -> list[str]:
    """The images expose and health-check the ports and paths the code serves."""
    problems = Problems()
    gateway_df = layout.gateway_dockerfile.read_text()
    triton_df = layout.triton_dockerfile.read_text()
    gateway_where = layout.rel(layout.gateway_dockerfile)
    triton_where = layout.rel(layout.triton_dockerfile)
    problems.expect(
        exposed_ports(gateway_df) == {gateway.http_port, gateway.grpc_port},
        f"{gateway_where}: EXPOSE {sorted(exposed_ports(gateway_df))}, "
        f"expected {gateway.http_port} {gateway.grpc_port}",
    )
    problems.expect(
        exposed_ports(triton_df) == set(TRITON_PORTS.values()),
        f"{triton_where}: EXPOSE {sorted(exposed_ports(triton_df))}, "
        f"expected {sorted(TRITON_PORTS.values())}",
    )
    for name, port in TRITON_PORTS.items():
        problems.expect(
            f"--{name}-port={port}" in files.entrypoint_text,
            f"{files.entrypoint_source}: tritonserver needs --{name}-port={port}",
        )
    problems.expect(
        "healthcheck.py" in gateway_df and "HEALTHCHECK" in gateway_df,
        f"{gateway_where}: HEALTHCHECK must run healthcheck.py",
    )
    problems.expect(
        f'DEFAULT_PATH = "{GATEWAY_LIVENESS_PATH}"' in layout.healthcheck_script.read_text(),
        f"{layout.rel(layout.healthcheck_script)}: default path must be {GATEWAY_LIVENESS_PATH}",
    )
    problems.expect(
        f":{TRITON_PORTS['http']}{TRITON_READY_PATH}" in triton_df,
        f"{triton_where}: HEALTHCHECK must GET {TRITON_READY_PATH}",
    )
    return problems


def drift_model_names(
    files: DeployFiles, gateway: Gateway, names: frozenset[str], origin: str
) -> list[str]:
    """The Triton models the files name are the repository's; the docs name every one."""
    if not names:
        return [f"{origin} matches nothing: the Triton models are committed there"]
    problems = Problems()
    for field_name in ("triton_encoder_model", "triton_decoder_model"):
        default = gateway.settings.model_fields[field_name].default
        problems.expect(
            default in names,
            f"Settings.{field_name} defaults to {default!r}, not a model in {origin}",
        )
    texts = {files.compose_source: files.compose_text, **files.rendered_text, **files.docs_text}
    texts.update(files.dockerfile_text)
    for source, text in texts.items():
        for name in sorted(set(MODEL_NAME_RE.findall(text)) - names):
            problems.add(f"{source}: Triton model {name!r} is not in {origin}")
    for source, text in files.docs_text.items():
        for name in sorted(names):
            problems.expect(name in text, f"{source} never names the Triton model {name}")
        for path in (GATEWAY_LIVENESS_PATH, GATEWAY_READINESS_PATH, TRITON_READY_PATH):
            problems.expect(path in text, f"{source} never mentions {path}")
    return problems
