"""scripts/deploy_checks/dockerfiles.py: Dockerfile instructions and .dockerignore."""

from __future__ import annotations

from pathlib import Path

from scripts.deploy_checks.common import Layout
from scripts.deploy_checks.dockerfiles import (
    check_dockerignore,
    dockerfile_instructions,
    exposed_ports,
)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_dockerignore_must_deny_by_default_and_keep_weights_out(deploy_copy: Path) -> None:
    layout = Layout.from_root(deploy_copy)
    assert check_dockerignore(layout) == []
    _replace(deploy_copy / ".dockerignore", "!docker\n", "!weights\n")
    problems = "\n".join(check_dockerignore(layout))
    assert "'!weights' lets private files into build contexts" in problems, problems
    assert "COPY docker/healthcheck.py is excluded by .dockerignore" in problems, problems
    (deploy_copy / ".dockerignore").write_text("weights\n")
    assert "must start with '*'" in "\n".join(check_dockerignore(layout))
    (deploy_copy / ".dockerignore").unlink()
    assert check_dockerignore(layout) == [
        ".dockerignore is missing: the whole repository (weights too) would be sent to builds"
    ]


def test_dockerfile_instructions_join_continuation_lines() -> None:
    text = (
        "FROM x:1\n# note\nCOPY --chmod=0755 a \\\n  # inline comment\n  b /dst/\nEXPOSE 1 2/tcp\n"
    )
    assert dockerfile_instructions(text) == [
        ("FROM", ["x:1"]),
        ("COPY", ["--chmod=0755", "a", "b", "/dst/"]),
        ("EXPOSE", ["1", "2/tcp"]),
    ]
    assert exposed_ports(text) == {1, 2}
