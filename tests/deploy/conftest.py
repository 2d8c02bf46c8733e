"""Shared fixtures for the deployment-file tests: rendered manifests and scratch copies."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from scripts.deploy_checks.common import K8sObject, Layout
from scripts.deploy_checks.k8s import render_kustomization

ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = ROOT / "docker"

# What a deployment copy needs: everything the validator reads.
DEPLOY_PATHS = (
    "docker",
    "k8s",
    "docs",
    "docker-compose.yml",
    ".hadolint.yaml",
    ".dockerignore",
    "model_repository",
)


def load_module(name: str, path: Path) -> ModuleType:
    """Import a file that is not on sys.path (docker/)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[K8sObject]]:
    """k8s/base and k8s/overlays/gpu rendered by kustomize, by directory name (copy to edit)."""
    return {path.name: render_kustomization(path) for path in Layout.from_root(ROOT).kustomizations}


@pytest.fixture(scope="session")
def prepare() -> ModuleType:
    """docker/triton_prepare.py as a module."""
    return load_module("triton_prepare", DOCKER_DIR / "triton_prepare.py")


@pytest.fixture(scope="session")
def healthcheck() -> ModuleType:
    """docker/healthcheck.py as a module."""
    return load_module("ivvae_healthcheck", DOCKER_DIR / "healthcheck.py")


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Iterator[Path]:
    """A scratch copy of the deployment files, to break on purpose."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in DEPLOY_PATHS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            shutil.copy2(source, root / name)
    yield root
