"""The ``compose`` check: docker-compose.yml against the compose specification.

Also the Compose-style interpolation that the drift check reads the compose file through.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .common import ToolError, load_yaml, run

INTERPOLATION_RE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


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
        result = run(command)
    if result.returncode == 0:
        return []
    if "No module named check_jsonschema" in result.stderr:
        raise ToolError("check-jsonschema not installed: pip install check-jsonschema")
    output = (result.stdout + result.stderr).strip().splitlines()
    return [f"compose-spec: {line}" for line in output if line.strip()]
