"""The deployment files pass scripts/validate_deploy.py, and the command reports what failed.

Each check's own tests (it bites when a scratch copy is broken one way) are in
test_deploy_<module>.py, one per module of scripts/deploy_checks/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripts.deploy_checks.cli import CHECKS, CheckResult, run_checks
from scripts.deploy_checks.common import Layout

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_deploy.py"
CHECK_NAMES = ("hadolint", "shellcheck", "compose", "k8s", "drift")


@pytest.fixture(scope="module")
def results() -> dict[str, CheckResult]:
    """Every check once on the real repository."""
    return {r.name: r for r in run_checks(Layout.from_root(ROOT))}


def test_the_script_knows_every_check() -> None:
    assert tuple(CHECKS) == CHECK_NAMES


@pytest.mark.parametrize("name", CHECK_NAMES)
def test_check_passes_on_the_repository(results: dict[str, CheckResult], name: str) -> None:
    problems = "\n".join(results[name].problems)
    assert results[name].ok, f"{name} failed:\n{problems}"


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


def test_a_check_that_cannot_run_fails_and_says_why(deploy_copy: Path) -> None:
    (deploy_copy / "docker-compose.yml").unlink()
    (drift,) = run_checks(Layout.from_root(deploy_copy), ["drift"])
    assert not drift.ok
    assert drift.problems == [
        f"could not run: FileNotFoundError: [Errno 2] No such file or directory: "
        f"'{deploy_copy / 'docker-compose.yml'}'"
    ]
