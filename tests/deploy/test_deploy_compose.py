"""scripts/deploy_checks/compose.py: the compose schema bites; interpolation is Compose's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from scripts.deploy_checks.compose import Interpolation, validate_compose


def _edit_compose(root: Path, edit: Any) -> Path:
    path = root / "docker-compose.yml"
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_compose_schema_rejects_unknown_keys_and_wrong_types(deploy_copy: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["services"]["gateway"]["helthcheck"] = {}
        devices = data["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
        devices[0]["capabilities"] = "gpu"

    problems = "\n".join(validate_compose(_edit_compose(deploy_copy, edit)))
    assert "helthcheck" in problems, problems
    assert "capabilities" in problems and "array" in problems, problems


def test_compose_file_must_exist_and_be_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "docker-compose.yml"
    assert validate_compose(missing) == [f"{missing} does not exist"]
    missing.write_text("services: [\n")
    assert validate_compose(missing)[0].startswith("docker-compose.yml: not YAML:")


def test_compose_interpolation_follows_compose_rules() -> None:
    interpolation = Interpolation({"SET": "x", "EMPTY": ""})
    assert interpolation.expand("${SET:-d}/${UNSET:-d}/${EMPTY:-d}/${EMPTY-d}") == "x/d/d/"
    assert interpolation.expand("$$HOME ${SET:+alt} ${UNSET:+alt}") == "$HOME alt "
    assert interpolation.expand("${NEEDED:?set it}") == "<required NEEDED>"
    assert interpolation.required == {"NEEDED"}
