"""Session fixtures for the ivvae Triton models: exported tiny artifacts and a real server.

* ``tiny_exports``: ``ivvae export`` (the command itself, in-process) of the tiny test
  weights, once per format and session, verified on the golden clip.
* ``ivvae_triton``: one ``tritonserver`` from the ``nvidia-pytriton`` wheel serving
  ``ivvae_encoder`` and ``ivvae_decoder`` over the TorchScript export, shared by every test
  that only talks to it (each model instance is a ~230 MiB python stub, and start-up costs
  seconds). Tests that kill a server or need other parameters start their own.

Model instances run one CPU thread each, and exports run on one torch thread: on a small
CI machine the stubs, pytest and the gateway otherwise fight over the cores.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GOLDEN_CLIP = Path(__file__).parent / "data" / "golden" / "golden_z16_dim8_t13_64x64.safetensors"


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class TinyExport:
    weights: Path
    directory: Path
    summary: dict[str, Any]  # what `ivvae export` printed


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyExport]:
    """``get(format)``: the tiny weights exported by ``ivvae export`` (cached per session)."""
    from ivvae.cli import main
    from tests.service_fixtures import write_tiny_weights

    root = tmp_path_factory.mktemp("exports")
    weights = write_tiny_weights(root / "tiny.safetensors")
    done: dict[str, TinyExport] = {}

    def get(fmt: str) -> TinyExport:
        if fmt not in done:
            out = root / fmt
            stdout = io.StringIO()
            with one_torch_thread(), contextlib.redirect_stdout(stdout):
                code = main(["export", "--format", fmt, "--weights", str(weights),
                             "--out", str(out), "--verify-input", str(GOLDEN_CLIP)])
            assert code == 0, stdout.getvalue()
            done[fmt] = TinyExport(weights, out, json.loads(stdout.getvalue()))
        return done[fmt]

    return get


@dataclass(frozen=True)
class IvvaeTriton:
    server: Any  # ivvae.devtools.triton_launcher.TritonServer
    export: TinyExport

    @property
    def weights(self) -> Path:
        return self.export.weights


def start_ivvae_triton(export: TinyExport, workdir: Path, **options: Any) -> Any:
    """A tritonserver serving ``export``; ``options`` go to ``devtools.triton_serve.prepare``."""
    from ivvae.devtools.triton_launcher import start_triton
    from ivvae.devtools.triton_serve import prepare

    options.setdefault("num_threads", 1)
    repository = prepare(export.directory, workdir, **options)
    return start_triton(repository, log_path=workdir / "tritonserver.log", ready_timeout=120)


@pytest.fixture(scope="session")
def ivvae_triton(tiny_exports: Callable[[str], TinyExport],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[IvvaeTriton]:
    try:
        from ivvae.devtools.triton_launcher import find_triton_install

        find_triton_install()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    export = tiny_exports("torchscript")
    server = start_ivvae_triton(export, tmp_path_factory.mktemp("ivvae-triton"))
    try:
        yield IvvaeTriton(server, export)
    finally:
        server.stop()
