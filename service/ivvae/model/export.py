"""Export the serving step functions as standalone TorchScript or ONNX artifacts, and verify
them against the eager model.

The exported unit is ``ivvae.model.steps`` (uint8 frames in, moments out; latents in, uint8
frames out) with the feature cache flattened into explicit tensors: ``first(x)`` returns
``(*outputs, *cache)`` and ``next(x, *cache)`` returns the same. Layouts, file names and the
manifest are described in ``ivvae.core.artifacts``.

Both formats come from ``torch.jit.trace``. Tracing records shapes symbolically but bakes
Python control flow, so the examples are chosen to take the general branch everywhere:
batch 2, two frame groups per ``next`` step (a single group is the special case that the
general graph also covers) and a non-square size. ``first`` graphs take exactly one frame
(encoder) or one latent frame (decoder), which is how the service streams.

Every export is verified before its manifest is written: the artifacts are loaded back the
way Triton loads them (``artifacts.load_steps``) and a whole clip is streamed through them
and through the eager step functions, comparing moments, decoded frames and every cache
tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.artifacts import (
    DIRECTIONS,
    FORMATS,
    MANIFEST_NAME,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    CacheSlot,
    Direction,
    ExportManifest,
    artifact_files,
    cache_input_name,
    cache_output_name,
)
from ..core.geometry import SPACE_COMPRESSION, TIME_COMPRESSION
from ..core.version import __version__
from .artifacts import load_steps
from .checkpoint import nonfinite_parameters
from .steps import DecoderStep, EncoderStep
from .vae import IVVAE

log = logging.getLogger("ivvae.export")

FLOAT_TOLERANCE = 1e-4  # max abs error of moments and caches, as for the golden files
# Decoded frames are rounded to uint8 inside the graph: a float difference of ~1e-6 can move
# a value that sits on a rounding boundary by one level.
FRAME_TOLERANCE_LSB = 1
FRAME_MISMATCH_FRACTION = 1e-3  # at most this share of uint8 values may differ (by 1)
ONNX_OPSET = 17

# Trace examples: batch 2, 16x24 frames (2x3 latents), two groups per `next` step.
_TRACE_BATCH = 2
_TRACE_SIZE = (16, 24)
_TRACE_GROUPS = 2


class ExportError(RuntimeError):
    """The export or its verification failed."""


# -- the exported graphs ---------------------------------------------------------------------


class EncoderGraphs(nn.Module):
    """``first(frames)`` / ``next(frames, *cache)`` -> ``(mu, logvar, *cache)``.

    ``frames`` ``(B, T, H, W, 3)`` uint8; ``mu``, ``logvar`` ``(B, z, T', H/8, W/8)`` float32.
    """

    def __init__(self, vae: IVVAE) -> None:
        super().__init__()
        self.step = EncoderStep(vae)

    def first(self, frames: Tensor) -> tuple[Tensor, ...]:
        mu, logvar, cache = self.step.first(frames)
        return (mu, logvar, *cache)

    def next(self, frames: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        mu, logvar, new = self.step.next(frames, list(cache))
        return (mu, logvar, *new)


class DecoderGraphs(nn.Module):
    """``first(latent)`` / ``next(latent, *cache)`` -> ``(frames, video, *cache)``.

    ``latent`` ``(B, z, n, h, w)`` float32; ``frames`` ``(B, T, 8h, 8w, 3)`` uint8;
    ``video`` ``(B, 3, T, 8h, 8w)`` float32, what the frames are rounded from.
    """

    def __init__(self, vae: IVVAE) -> None:
        super().__init__()
        self.step = DecoderStep(vae)

    def first(self, latent: Tensor) -> tuple[Tensor, ...]:
        frames, video, cache = self.step.first(latent)
        return (frames, video, *cache)

    def next(self, latent: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        frames, video, new = self.step.next(latent, list(cache))
        return (frames, video, *new)


class _Method(nn.Module):
    """One method of a graphs module as ``forward`` (the ONNX exporter traces ``forward``)."""

    def __init__(self, graphs: nn.Module, method: str) -> None:
        super().__init__()
        self.graphs = graphs
        self.method = method

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        result: tuple[Tensor, ...] = getattr(self.graphs, self.method)(*args)
        return result


def _graphs(vae: IVVAE, direction: Direction) -> EncoderGraphs | DecoderGraphs:
    return EncoderGraphs(vae) if direction == "encoder" else DecoderGraphs(vae)


def _examples(vae: IVVAE, direction: Direction) -> dict[str, tuple[Tensor, ...]]:
    """Trace inputs of ``first`` and ``next`` (the latter with a real cache)."""
    g = torch.Generator().manual_seed(0)
    h, w = _TRACE_SIZE
    graphs = _graphs(vae, direction)
    k = len(ONNX_OUTPUTS[direction])
    if direction == "encoder":
        x0 = torch.randint(0, 256, (_TRACE_BATCH, 1, h, w, 3), dtype=torch.uint8, generator=g)
        x1 = torch.randint(0, 256, (_TRACE_BATCH, TIME_COMPRESSION * _TRACE_GROUPS, h, w, 3),
                           dtype=torch.uint8, generator=g)
    else:
        shape = (_TRACE_BATCH, vae.cfg.z_dim, 1, h // SPACE_COMPRESSION, w // SPACE_COMPRESSION)
        x0 = torch.randn(shape, generator=g)
        x1 = torch.randn((*shape[:2], _TRACE_GROUPS, *shape[3:]), generator=g)
    with torch.no_grad():
        cache = graphs.first(x0)[k:]
    return {"first": (x0,), "next": (x1, *cache)}


def cache_slots(vae: IVVAE, direction: Direction) -> list[CacheSlot]:
    """Channels and spatial divisor (relative to the frame size) of every cache slot."""
    cache = _examples(vae, direction)["next"][1:]
    return [CacheSlot(int(t.shape[1]), _TRACE_SIZE[0] // int(t.shape[3])) for t in cache]


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    """Silence the tracer's expected warnings (baked Python ints and bools, deprecations):
    verification, not warnings, decides whether a trace is right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _export_torchscript(vae: IVVAE, direction: Direction, path: Path) -> None:
    examples = _examples(vae, direction)
    with torch.no_grad(), _quiet_tracer():
        traced = torch.jit.trace_module(_graphs(vae, direction), examples, check_trace=False)
    traced.save(str(path))


def _dynamic_axes(direction: Direction, step: str, slots: int) -> dict[str, dict[int, str]]:
    nxt = step == "next"
    axes: dict[str, dict[int, str]] = {}
    if direction == "encoder":
        axes["frames"] = {0: "batch", 2: "height", 3: "width"} | ({1: "time"} if nxt else {})
        for name in ("mu", "logvar"):
            axes[name] = {0: "batch", 3: "latent_height", 4: "latent_width"}
            if nxt:
                axes[name][2] = "latent_time"
    else:
        axes["latent"] = {0: "batch", 3: "height", 4: "width"} | ({2: "time"} if nxt else {})
        axes["frames"] = {0: "batch", 2: "frame_height", 3: "frame_width"}
        axes["video"] = {0: "batch", 3: "frame_height", 4: "frame_width"}
        if nxt:
            axes["frames"][1] = "frame_time"
            axes["video"][2] = "frame_time"
    for i in range(slots):
        dims = {0: "batch", 3: f"cache_{i}_height", 4: f"cache_{i}_width"}
        axes[cache_output_name(i)] = dims
        if nxt:
            axes[cache_input_name(i)] = dims
    return axes


def _export_onnx(vae: IVVAE, direction: Direction, step: str, path: Path) -> None:
    examples = _examples(vae, direction)
    slots = len(examples["next"]) - 1
    args = examples[step]
    inputs = [ONNX_INPUT[direction]]
    if step == "next":
        inputs += [cache_input_name(i) for i in range(slots)]
    outputs = [*ONNX_OUTPUTS[direction], *(cache_output_name(i) for i in range(slots))]
    module = _Method(_graphs(vae, direction), step)
    with torch.no_grad(), _quiet_tracer():
        torch.onnx.export(
            module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
            dynamic_axes=_dynamic_axes(direction, step, slots), opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )


# -- verification ----------------------------------------------------------------------------


def verification_clip(frames: int = 13, size: int = 64) -> np.ndarray:
    """The built-in verification clip: ``(2, frames, size, size, 3)`` uint8, seeded noise
    over a moving gradient (two videos, so batching is verified too)."""
    rng = np.random.default_rng(0)
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    base = (np.stack([x * 3 + t * 5, y * 3 - t * 7, (x + y) * 2 + t * 11], -1) % 256)
    noise = rng.integers(-40, 41, size=(2, frames, size, size, 3))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


def clip_from_golden(path: str | Path) -> np.ndarray:
    """The input video of a golden file as ``(2, T, H, W, 3)`` uint8: the video and its
    mirror image (two videos, so batching is verified too)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        video = f.get_tensor("input.video")  # (1, 3, T, H, W) in [-1, 1]
    frames = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 4, 1).numpy()  # (1, T, H, W, 3)
    return np.ascontiguousarray(np.concatenate([frames, frames[:, :, :, ::-1]]))


def _chunks(n: int, sizes: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """(start, end) of ``first`` (1) and then ``next`` steps cycling through ``sizes``."""
    yield 0, 1
    start, i = 1, 0
    while start < n:
        end = min(n, start + sizes[i % len(sizes)])
        yield start, end
        start, i = end, i + 1


def _numpy(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        return t.detach().float().cpu().numpy()
    return np.asarray(t, np.float32)


def _max_abs(ref: Any, got: Any, *, relative: bool = False) -> float:
    """Max abs difference; ``relative`` divides by ``max(1, max |ref|)``."""
    a, b = _numpy(ref), _numpy(got)
    if a.shape != b.shape:
        return float("inf")
    if not a.size:
        return 0.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")  # a NaN differs from everything, itself included
    err = float(np.abs(a - b).max())
    return err / max(1.0, float(np.abs(a).max())) if relative else err


@dataclass
class _Errors:
    values: dict[str, float]

    def update(self, key: str, value: float) -> None:
        # max() drops a NaN that comes second; one anywhere fails the check
        old = self.values.get(key, 0.0)
        self.values[key] = value if math.isnan(value) or value > old else old


def verify_artifacts(directory: str | Path, vae: IVVAE, frames: np.ndarray,
                     manifest: ExportManifest | None = None) -> dict[str, Any]:
    """Stream ``frames`` ``(B, T, H, W, 3)`` uint8 (T = 1 + 4N, H and W multiples of 8)
    through the artifacts and the eager steps; report the differences.

    Encoder steps take 1, then 8 and 4 frames in turn; decoder steps take 1, then 2 and 1
    latent frames (the eager latents, so each direction is checked on its own). Returns
    max abs errors of ``mu``, ``logvar``, the float video and the caches, and for the uint8
    frames the
    largest difference and the count of differing values; ``passed`` applies the
    tolerances of this module. Moments are compared absolutely (they are the latents);
    caches, whose magnitudes grow with the model, relative to ``max(1, max |eager|)``.
    """
    if frames.ndim != 5 or frames.dtype != np.uint8 or (frames.shape[1] - 1) % TIME_COMPRESSION:
        raise ValueError(f"frames must be (B, 1 + 4N, H, W, 3) uint8, got {frames.shape} "
                         f"{frames.dtype}")
    enc_art = load_steps(directory, "encoder", manifest=manifest)
    dec_art = load_steps(directory, "decoder", manifest=manifest)
    enc, dec = EncoderStep(vae), DecoderStep(vae)
    errors = _Errors({})
    mus: list[Tensor] = []
    with torch.no_grad():
        cache: list[Tensor] = []
        art_cache: list[Any] = []
        for a, b in _chunks(frames.shape[1], (2 * TIME_COMPRESSION, TIME_COMPRESSION)):
            x = frames[:, a:b]
            if a == 0:
                mu, logvar, cache = enc.first(torch.from_numpy(x))
                (amu, alogvar), art_cache = enc_art.first(x)
            else:
                mu, logvar, cache = enc.next(torch.from_numpy(x), cache)
                (amu, alogvar), art_cache = enc_art.next(x, art_cache)
            errors.update("encoder_mu", _max_abs(mu, amu))
            errors.update("encoder_logvar", _max_abs(logvar, alogvar))
            for t, u in zip(cache, art_cache, strict=True):
                errors.update("encoder_cache_rel", _max_abs(t, u, relative=True))
            mus.append(mu)
        cfg = vae.cfg
        latent = (cfg.scale_factor * (torch.cat(mus, dim=2) - cfg.shift_factor)).float()
        mismatched = total = max_lsb = 0
        for a, b in _chunks(latent.shape[2], (2, 1)):
            z = latent[:, :, a:b].contiguous()
            # The artifact's cache moves on with the uint8 step; its float output is taken
            # from a second run of the same step, so both outputs are checked.
            if a == 0:
                out, video, next_cache = dec.first(z)
                (aout,), art_next = dec_art.first(z.numpy())
                (avideo,), _ = dec_art.first(z.numpy(), "float32")
            else:
                out, video, next_cache = dec.next(z, cache)
                (aout,), art_next = dec_art.next(z.numpy(), art_cache)
                (avideo,), _ = dec_art.next(z.numpy(), art_cache, "float32")
            cache, art_cache = next_cache, art_next
            if tuple(out.shape) != aout.shape:
                raise ExportError(f"decoder artifact returned {aout.shape}, eager "
                                  f"{tuple(out.shape)}")
            errors.update("decoder_video", _max_abs(video.permute(0, 2, 3, 4, 1), avideo))
            diff = np.abs(out.numpy().astype(np.int16) - aout.astype(np.int16))
            max_lsb = max(max_lsb, int(diff.max()))
            mismatched += int(np.count_nonzero(diff))
            total += diff.size
            for t, u in zip(cache, art_cache, strict=True):
                errors.update("decoder_cache_rel", _max_abs(t, u, relative=True))
    passed = (all(v <= FLOAT_TOLERANCE for v in errors.values.values())
              and max_lsb <= FRAME_TOLERANCE_LSB
              and mismatched <= FRAME_MISMATCH_FRACTION * total)
    return {
        "clip": list(frames.shape),
        "max_abs": errors.values,
        "decoder_frames": {"max_lsb": max_lsb, "mismatched": mismatched, "total": total},
        "tolerance": {"max_abs": FLOAT_TOLERANCE, "frames_max_lsb": FRAME_TOLERANCE_LSB,
                      "frames_mismatch_fraction": FRAME_MISMATCH_FRACTION},
        "passed": passed,
    }


# -- the export ------------------------------------------------------------------------------


def export_artifacts(vae: IVVAE, out: str | Path, fmt: str, model_info: Mapping[str, Any], *,
                     verify_frames: np.ndarray | None = None) -> ExportManifest:
    """Write the four step graphs of ``vae`` in ``fmt`` to ``out``, verify them, then write
    ``export_manifest.json``.

    ``model_info`` is the served model's ``ModelInfo.as_dict()`` for the manifest.
    ``verify_frames`` (``(B, 1 + 4N, H, W, 3)`` uint8) defaults to :func:`verification_clip`.
    Raises ``ExportError`` when verification fails; the manifest is then not written, so
    the directory never looks like a complete export.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    bad = nonfinite_parameters(vae)
    if bad:
        raise ExportError(f"the weights hold NaN or infinite values ({len(bad)} tensors, e.g. "
                          f"{bad[0]}): a diverged training run? Nothing was exported")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for name in (*artifact_files("torchscript").values(), *artifact_files("onnx").values()):
        (out / name).unlink(missing_ok=True)
    encode_dtype, decode_dtype = vae.encode_dtype, vae.decode_dtype
    vae.set_precision(encode="float32", decode="float32")
    try:
        files = artifact_files(fmt)
        for direction in DIRECTIONS:
            log.info("exporting the %s (%s)", direction, fmt)
            if fmt == "torchscript":
                _export_torchscript(vae, direction, out / files[direction])
            else:
                for step in ("first", "next"):
                    _export_onnx(vae, direction, step, out / files[f"{direction}_{step}"])
        manifest = ExportManifest(
            format=fmt, model=dict(model_info), files=files,
            cache_slots={d: cache_slots(vae, d) for d in DIRECTIONS},
            ivvae_version=__version__, torch_version=torch.__version__,
        )
        frames = verification_clip() if verify_frames is None else verify_frames
        log.info("verifying the %s artifacts on a %s clip", fmt, "x".join(map(str, frames.shape)))
        report = verify_artifacts(out, vae, frames, manifest)
    finally:
        vae.set_precision(encode=encode_dtype, decode=decode_dtype)
    if not report["passed"]:
        raise ExportError(f"the exported {fmt} artifacts differ from the eager model: {report}")
    manifest = dataclasses.replace(manifest, verification=report)
    manifest.write(out)
    return manifest

