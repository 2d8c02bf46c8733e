"""scripts/deploy_checks/lint.py: hadolint and shellcheck bite."""

from __future__ import annotations

from pathlib import Path

from scripts.deploy_checks.lint import lint_dockerfiles, lint_shell_scripts

ROOT = Path(__file__).resolve().parents[2]


def test_hadolint_rejects_latest_and_unpinned_apt(tmp_path: Path) -> None:
    dockerfile = tmp_path / "bad.Dockerfile"
    dockerfile.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    text = "\n".join(lint_dockerfiles([dockerfile], ROOT / ".hadolint.yaml"))
    assert "DL3007" in text, text  # latest tag
    assert "DL3008" in text, text  # apt-get install without versions


def test_hadolint_config_allows_only_trusted_registries(tmp_path: Path) -> None:
    dockerfile = tmp_path / "registry.Dockerfile"
    dockerfile.write_text('FROM quay.io/someone/python:3.11.11\nCMD ["python"]\n')
    assert "DL3026" in "\n".join(lint_dockerfiles([dockerfile], ROOT / ".hadolint.yaml"))


def test_hadolint_catches_a_regression_in_the_gateway_image(deploy_copy: Path) -> None:
    dockerfile = deploy_copy / "docker" / "gateway.Dockerfile"
    text = dockerfile.read_text()
    assert "pip install --no-cache-dir /src ;;" in text
    dockerfile.write_text(
        text.replace("pip install --no-cache-dir /src ;;", "pip install fastapi ;;")
    )
    problems = "\n".join(lint_dockerfiles([dockerfile], deploy_copy / ".hadolint.yaml"))
    assert "DL3013" in problems, problems


def test_hadolint_needs_a_dockerfile() -> None:
    assert lint_dockerfiles([], None) == ["no Dockerfile to lint"]


def test_shellcheck_rejects_unquoted_expansion(tmp_path: Path) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/usr/bin/env bash\ntarget=$1\nrm -rf $target/*\n")
    assert "SC2086" in "\n".join(lint_shell_scripts([script]))
