"""``ivvae export``: TorchScript and ONNX step artifacts, checked against the eager model.

The artifacts come from the command itself (the ``tiny_exports`` session fixture runs
``ivvae export --verify-input <golden clip>``). Besides the command's own verification,
these tests run the artifacts with the bare runtimes (``torch.jit.load``, an
``onnxruntime.InferenceSession``), not through ``ivvae.model.artifacts``, and compare them
with the eager model's whole-video ``encode_moments`` / ``decode``: a different code path
from the step functions that were exported.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ivvae.core.artifacts import MANIFEST_NAME, ArtifactError, ExportManifest, read_manifest
from ivvae.model import load_model
from ivvae.model.artifacts import load_steps
from ivvae.model.export import clip_from_golden, export_artifacts
from ivvae.model.steps import DecoderStep, EncoderStep, frames_to_video, video_to_frames
from ivvae.weights import load_weights
from tests.triton_server import GOLDEN_CLIP, TinyExport, one_torch_thread

FORMATS = ("torchscript", "onnx")
ENCODER_SLOTS, DECODER_SLOTS = 13, 19


@pytest.fixture(scope="module", params=FORMATS)
def export(request: pytest.FixtureRequest,
           tiny_exports: Callable[[str], TinyExport]) -> TinyExport:
    return tiny_exports(request.param)


class Bare:
    """The artifacts of one export run by their runtime directly: (outputs..., cache...)."""

    def __init__(self, directory: Path, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "torchscript":
            with warnings.catch_warnings():  # TorchScript is deprecated upstream
                warnings.simplefilter("ignore", DeprecationWarning)
                self.modules = {d: torch.jit.load(str(directory / f"{d}.pt"))
                                for d in ("encoder", "decoder")}
        else:
            self.sessions = {f"{d}_{s}": ort.InferenceSession(
                str(directory / f"{d}_{s}.onnx"), providers=["CPUExecutionProvider"])
                for d in ("encoder", "decoder") for s in ("first", "next")}

    def __call__(self, direction: str, step: str, x: np.ndarray,
                 cache: list[np.ndarray]) -> list[np.ndarray]:
        if self.fmt == "torchscript":
            method = getattr(self.modules[direction], step)
            with torch.no_grad():
                out = method(torch.from_numpy(x), *(torch.from_numpy(c) for c in cache))
            return [t.numpy() for t in out]
        session = self.sessions[f"{direction}_{step}"]
        feed = {session.get_inputs()[0].name: x}
        feed.update({f"cache_{i}": c for i, c in enumerate(cache)})
        return list(session.run(None, feed))


def stream(bare: Bare, direction: str, x: np.ndarray, sizes: tuple[int, ...],
           n_out: int) -> list[np.ndarray]:
    """Run ``x`` through ``first`` (one frame) then ``next`` steps of ``sizes`` in turn,
    along time; return the outputs concatenated along time."""
    axis = 1 if direction == "encoder" else 2
    bounds = [(0, 1)]
    while bounds[-1][1] < x.shape[axis]:
        a = bounds[-1][1]
        bounds.append((a, min(x.shape[axis], a + sizes[(len(bounds) - 1) % len(sizes)])))
    outs: list[list[np.ndarray]] = []
    cache: list[np.ndarray] = []
    for a, b in bounds:
        part = np.ascontiguousarray(np.take(x, range(a, b), axis=axis))
        flat = bare(direction, "first" if a == 0 else "next", part, cache)
        outs.append(flat[:n_out])
        cache = flat[n_out:]
    # along time: moments (B, z, t, ...), frames (B, T, ...), the float video (B, 3, T, ...)
    out_axes = (2, 2) if direction == "encoder" else (1, 2)
    return [np.concatenate(parts, axis=axis)
            for parts, axis in zip(zip(*outs, strict=True), out_axes, strict=False)]


def test_the_command_verified_its_artifacts(export: TinyExport) -> None:
    summary = export.summary
    manifest = read_manifest(export.directory)
    _, info = load_weights(export.weights)
    assert summary["format"] == manifest.format
    assert summary["weights_sha256"] == info.weights_sha256
    assert manifest.model == info.as_dict()
    assert sorted(summary["files"]) == sorted(manifest.files.values())
    assert [len(manifest.cache_slots[d]) for d in ("encoder", "decoder")] == [ENCODER_SLOTS,
                                                                               DECODER_SLOTS]
    report = manifest.verification
    assert report == summary["verification"] and report["passed"]
    assert report["clip"] == [2, 13, 64, 64, 3]  # the golden clip and its mirror image
    assert max(report["max_abs"].values()) <= 1e-4
    # Measured: TorchScript identical to eager; ONNX Runtime moments within 4e-7 and
    # 20-25 of the 319,488 decoded uint8 values one level off.
    frames = report["decoder_frames"]
    assert frames["max_lsb"] <= 1 and frames["mismatched"] <= 1e-3 * frames["total"]


def test_artifacts_match_the_eager_whole_video_path(export: TinyExport) -> None:
    model = load_model(export.weights)
    clip = clip_from_golden(GOLDEN_CLIP)[:1]  # (1, 13, 64, 64, 3) uint8
    bare = Bare(export.directory, read_manifest(export.directory).format)
    with one_torch_thread(), torch.no_grad():
        mu, logvar = model.encode_moments(frames_to_video(torch.from_numpy(clip)))
        got_mu, got_logvar = stream(bare, "encoder", clip, (8, 4), 2)
        assert np.abs(got_mu - mu.numpy()).max() <= 1e-4
        assert np.abs(got_logvar - logvar.numpy()).max() <= 1e-4

        latent = model.moments_to_latent(mu, logvar)
        decoded = model.decode(latent)
        expected = video_to_frames(decoded).numpy()
        frames, video = stream(bare, "decoder", latent.numpy(), (2, 1), 2)
    assert frames.shape == expected.shape == (1, 13, 64, 64, 3)
    # the graphs' float output is the decoder's own, unclamped, within the golden tolerance
    assert video.shape == (1, 3, 13, 64, 64)
    assert np.abs(video - decoded.numpy()).max() <= 1e-4
    diff = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    # The eager whole-video decode runs other step sizes than the artifacts here: float
    # sums in another order, so a rounding boundary may tip either way.
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size


def test_batch_time_and_size_are_dynamic(export: TinyExport) -> None:
    """Other batch, frame size and step length than the trace examples (2, 16x24, 8):
    3 videos of 8x32 (one latent row), 12 frames in one step."""
    model = load_model(export.weights)
    enc = load_steps(export.directory, "encoder")
    dec = load_steps(export.directory, "decoder")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 13, 8, 32, 3), dtype=torch.uint8, generator=g)
    with one_torch_thread(), torch.no_grad():
        mu0, _, cache = EncoderStep(model).first(x[:, :1])
        mu1, _, _ = EncoderStep(model).next(x[:, 1:], cache)
        (got0, _), art_cache = enc.first(x[:, :1].numpy())
        (got1, _), _ = enc.next(x[:, 1:].numpy(), art_cache)
        assert got1.shape == (3, 4, 3, 1, 4)
        assert np.abs(got0 - mu0.numpy()).max() <= 1e-4
        assert np.abs(got1 - mu1.numpy()).max() <= 1e-4

        z = torch.randn(1, 4, 4, 1, 4, generator=g)
        f0, _, dcache = DecoderStep(model).first(z[:, :, :1])
        f1, v1, _ = DecoderStep(model).next(z[:, :, 1:], dcache)
        (g0,), art_dcache = dec.first(z[:, :, :1].numpy())
        (g1,), _ = dec.next(z[:, :, 1:].numpy(), art_dcache)
        (h1,), _ = dec.next(z[:, :, 1:].numpy(), art_dcache, "float32")
    assert g1.shape == h1.shape == (1, 12, 8, 32, 3) and h1.dtype == np.float32
    for ref, got in ((f0, g0), (f1, g1)):
        assert np.abs(ref.numpy().astype(np.int16) - got.astype(np.int16)).max() <= 1
    # float32 frames: the decoder's video channels-last, not rounded
    assert np.abs(h1 - v1.permute(0, 2, 3, 4, 1).numpy()).max() <= 1e-4
    assert np.abs(h1 - np.round(h1 * 127.5) / 127.5).max() > 1e-3


def test_onnx_graphs_declare_dynamic_axes(tiny_exports: Callable[[str], TinyExport]) -> None:
    directory = tiny_exports("onnx").directory
    dims = {}
    for name in ("encoder_first", "encoder_next", "decoder_first", "decoder_next"):
        graph = onnx.load(str(directory / f"{name}.onnx"), load_external_data=False).graph
        dims[name] = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                      for v in (*graph.input, *graph.output)}
    assert dims["encoder_first"]["frames"] == ["batch", 1, "height", "width", 3]
    assert dims["encoder_next"]["frames"] == ["batch", "time", "height", "width", 3]
    assert dims["decoder_next"]["latent"] == ["batch", 4, "time", "height", "width"]
    assert dims["decoder_next"]["frames"][0] == "batch"
    assert dims["encoder_next"]["cache_0"][0] == "batch"
    assert len([n for n in dims["decoder_next"] if n.startswith("new_cache_")]) == DECODER_SLOTS


def test_failed_verification_leaves_no_manifest(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ivvae.model import export as export_module

    def fake_trace(vae: Any, direction: str, path: Path) -> None:
        path.write_bytes(b"not really")

    monkeypatch.setattr(export_module, "_export_torchscript", fake_trace)
    monkeypatch.setattr(export_module, "verify_artifacts",
                        lambda *a, **k: {"passed": False, "max_abs": {"encoder_mu": 0.5}})
    model = load_model(_tiny_state())
    out = tmp_path / "out"
    (out).mkdir()
    (out / MANIFEST_NAME).write_text("{}")  # a previous export's manifest goes first
    with pytest.raises(export_module.ExportError, match="differ from the eager model"), (
            one_torch_thread()):
        export_artifacts(model, out, "torchscript", {"name": "x"})
    assert not (out / MANIFEST_NAME).exists()
    assert model.encode_dtype == torch.float32


def _tiny_state() -> dict[str, torch.Tensor]:
    from ivvae.model import IVVAE, IVVAEConfig, official_state_dict

    torch.manual_seed(0)
    return dict(official_state_dict(IVVAE(IVVAEConfig(z_dim=4, dim=4))))


def test_read_manifest_refuses_incomplete_or_foreign_directories(
        tiny_exports: Callable[[str], TinyExport], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="export with `ivvae export`"):
        read_manifest(tmp_path)
    source = tiny_exports("torchscript").directory
    manifest = ExportManifest.from_json((source / MANIFEST_NAME).read_text())
    manifest.write(tmp_path)
    with pytest.raises(ArtifactError, match=r"missing artifact files \['decoder.pt', "
                                            r"'encoder.pt'\]"):
        read_manifest(tmp_path)
    raw = json.loads((source / MANIFEST_NAME).read_text())
    raw["export_version"] = 0
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="export again"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{")
    with pytest.raises(ArtifactError, match="malformed"):
        read_manifest(tmp_path)
