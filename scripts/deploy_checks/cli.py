"""Run the checks by name and print, per check, ``ok`` or ``FAIL`` and what failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .common import ROOT, Layout, ToolError
from .compose import validate_compose
from .drift import check_drift
from .k8s import check_k8s
from .lint import lint_dockerfiles, lint_shell_scripts

DESCRIPTION = "Validate the deployment files offline: Dockerfiles, docker-compose.yml and k8s/."


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
    parser = argparse.ArgumentParser(description=DESCRIPTION)
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
