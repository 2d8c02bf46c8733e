"""The house rules of docs/architecture.md, checked: layers, no cycles, one home per fact.

The layer table is read from docs/architecture.md itself, so the page and the code cannot
drift apart. Every ``import`` statement of the package (module level or inside a function)
counts: a lazy import still makes the importing module depend on the imported one.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "ivvae"
DOC = ROOT / "docs" / "architecture.md"
GENERATED = PACKAGE / "api" / "grpc" / "gen"


def layers() -> dict[str, int]:
    """``{module prefix: layer}`` from the table in docs/architecture.md."""
    found: dict[str, int] = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for name in re.findall(r"`(ivvae(?:\.\w+)*)`", match.group(2)):
                found[name] = int(match.group(1))
    assert found, f"no layer table in {DOC}"
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, table: dict[str, int]) -> int:
    best = max((p for p in table if module == p or module.startswith(p + ".")), key=len,
               default=None)
    assert best is not None, f"{module} is in no layer of {DOC.name}: add it to the table"
    return table[best]


def imports(path: Path) -> set[str]:
    """The ivvae modules that ``path`` imports (resolved to module names)."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ivvae")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ivvae":
                continue
            # ``from pkg import mod`` imports a module when ``mod`` is one
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if module_exists(sub) else target)
    return found


def module_exists(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if GENERATED not in p.parents]


def test_every_import_goes_down_or_sideways() -> None:
    table = layers()
    wrong = []
    for path in sources():
        mine = module_name(path)
        for target in imports(path):
            if layer_of(target, table) > layer_of(mine, table):
                wrong.append(f"{mine} (layer {layer_of(mine, table)}) imports {target} "
                             f"(layer {layer_of(target, table)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = {module_name(p): {t for t in imports(p) if module_exists(t)} for p in sources()}
    # a package's __init__ that re-exports its submodules is not a cycle with them
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_torch_free_layers_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; "
            "import ivvae.core, ivvae.latents, ivvae.backends.triton, ivvae.client, "
            "ivvae.devtools.repository, ivvae.outputs; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_docker_prepare_imports_the_core_instead_of_copying_names() -> None:
    text = (ROOT / "docker" / "triton_prepare.py").read_text()
    assert "from ivvae.core" in text and "from ivvae.devtools.repository" in text
    assert '"export_manifest.json"' not in text and '"bfloat16"' not in text


# Each fact: a pattern that defines or restates it, and the one file allowed to.
ONE_HOME = {
    "time compression": (r"^\s*TIME_COMPRESSION\s*(:\s*\w+\s*)?=", "core/geometry.py"),
    "space compression": (r"^\s*SPACE_COMPRESSION\s*(:\s*\w+\s*)?=", "core/geometry.py"),
    "frames per group": (r"^\s*GROUP\s*(:\s*\w+\s*)?=", "core/geometry.py"),
    "padding policy": (r"time:repeat-last-to-1\+4n", "core/geometry.py"),
    "precision list": (r"""["']float32["'],\s*["']bfloat16["'],\s*["']float16["']""",
                       "core/names.py"),
    "artifact formats": (r"""["']torchscript["'],\s*["']onnx["']""", "core/artifacts.py"),
    "export manifest name": (r"export_manifest\.json[\"']", "core/artifacts.py"),
    "ModelInfo fields": (r"""["']num_params["']""", "core/model_info.py"),
    "ModelInfo class": (r"^class ModelInfo\b", "core/model_info.py"),
    "default crf": (r"(DEFAULT_CRF\s*=|crf\b[^=\n]*=\s*18\b)", "core/names.py"),
    "package version": (r"^__version__\s*=", "core/version.py"),
    "Triton model names": (r"""["']ivvae_(en|de)coder["']""", "triton/contract.py"),
    "Triton models' gauges": (r"""["']ivvae_(open|evicted)_sequences["']""",
                              "triton/contract.py"),
    "error codes": (r"""["'](internal_error|invalid_input|overloaded|deadline_exceeded|"""
                    r"""backend_unavailable|too_large|cancelled)["']""", "errors.py"),
}


@pytest.mark.parametrize("fact", sorted(ONE_HOME))
def test_each_fact_is_defined_once(fact: str) -> None:
    pattern, home = ONE_HOME[fact]
    where = [str(p.relative_to(PACKAGE)) for p in sources()
             if re.search(pattern, p.read_text(), re.M)]
    assert where == [home], f"{fact} is defined in {where}; its one home is {home}"


def test_the_dataset_package_offers_what_its_one_module_did() -> None:
    # ivvae.dataset was one module: its parts' public names stay importable from it.
    import importlib

    import ivvae.dataset as package

    for part in ("job", "sources", "encoders", "parts", "state", "clips", "run", "command"):
        module = importlib.import_module(f"ivvae.dataset.{part}")
        tree = ast.parse(Path(module.__file__ or "").read_text())
        defined = {n.name for n in tree.body
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Name)}
        missing = {name for name in defined if not name.startswith("_") and name != "log"
                   } - set(package.__all__)
        assert not missing, f"ivvae.dataset.{part}: {sorted(missing)} not in ivvae.dataset"
