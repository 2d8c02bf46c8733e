"""Runners that execute exported step artifacts (TorchScript or ONNX Runtime).

Formats, file names and the manifest are in :mod:`ivvae.core.artifacts`. The Triton python
models and the export verification run artifacts through :func:`load_steps`, so both
execute exactly the same code path; each runner is a :class:`~ivvae.core.steps.Steps`, the
protocol that :class:`~ivvae.core.steps.SequenceTable` drives.

Array contracts (numpy at this boundary; batch = independent videos):

* encoder: ``frames`` ``(B, T, H, W, 3)`` uint8, H and W multiples of 8; ``first``: T = 1;
  ``next``: T = 4k. Outputs ``mu, logvar`` float32 ``(B, z, k or 1, H/8, W/8)``.
* decoder: ``latent`` ``(B, z, n, h, w)`` float32; ``first``: n = 1. Output ``frames``
  ``(B, 1 or 4n, 8h, 8w, 3)`` in the step's ``frames_dtype`` (the graphs return both the
  uint8 frames and the float video; only the one asked for leaves the device).

Caches stay in the runner's native type (torch tensors on the model's device, or numpy
arrays for ONNX Runtime) between steps.
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.artifacts import (
    DIRECTIONS,
    ONNX_INPUT,
    ONNX_OUTPUTS,
    STEPS,
    ArtifactError,
    Direction,
    ExportManifest,
    cache_input_name,
    read_manifest,
)
from ..core.names import PRECISIONS
from ..core.steps import Cache, FramesDtype, Steps


class ArtifactSteps(Steps):
    """One direction's exported steps. ``first``/``next`` return (outputs, new cache)."""

    def __init__(self, manifest: ExportManifest, direction: Direction) -> None:
        self.manifest = manifest
        self.direction = direction
        self.z_dim = manifest.z_dim
        self.num_slots = len(manifest.cache_slots[direction])

    def first(self, x: np.ndarray, frames_dtype: FramesDtype = "uint8"
              ) -> tuple[list[np.ndarray], Cache]:
        return self._run("first", x, [], frames_dtype)

    def next(self, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype = "uint8"
             ) -> tuple[list[np.ndarray], Cache]:
        return self._run("next", x, cache, frames_dtype)

    @abc.abstractmethod
    def _run(self, step: str, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype
             ) -> tuple[list[np.ndarray], Cache]:
        """Run step ``first`` or ``next`` on ``x`` with the streams' cache."""

    def _outputs(self, flat: Sequence[Any]) -> tuple[list[Any], Cache]:
        k = len(ONNX_OUTPUTS[self.direction])
        if len(flat) != k + self.num_slots:
            raise ArtifactError(f"{self.direction} artifact returned {len(flat)} tensors, "
                                f"expected {k} + {self.num_slots} cache slots")
        return list(flat[:k]), list(flat[k:])


class TorchScriptSteps(ArtifactSteps):
    """Runs ``<direction>.pt``; the cache stays on the module's device between steps.

    ``precision`` other than float32 runs the float32 graph under ``torch.autocast``, as the
    eager model's ``set_precision`` does.

    The graph runs without the JIT's optimizing executor: it profiles and recompiles the
    first calls of every new input shape (measured: 0.3 s per call for the first two calls
    of each shape, against 0.01-0.07 s after), and a video service sees many sizes, while
    the plain interpreter runs these conv-bound graphs as fast as eager from the first call.
    """

    def __init__(self, directory: Path, manifest: ExportManifest, direction: Direction, *,
                 device: str = "cpu", precision: str = "float32") -> None:
        import torch

        super().__init__(manifest, direction)
        from .device import torch_device

        self._torch = torch
        try:
            self.device = torch_device(device)
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
        if precision not in PRECISIONS:
            raise ArtifactError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "float16" and self.device.type != "cuda":
            raise ArtifactError("float16 compute is supported on CUDA only; use bfloat16")
        from .precision import torch_dtype

        self.dtype = torch_dtype(precision)
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, still works
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(directory / manifest.files[direction]),
                                         map_location=self.device)
        self.module.eval()

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        torch = self._torch
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            if self.dtype == torch.float32:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    yield

    def _run(self, step: str, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype
             ) -> tuple[list[np.ndarray], Cache]:
        from .steps import pick_frames

        torch = self._torch
        inp = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        with self._mode():
            flat = getattr(self.module, step)(inp, *cache)
            outputs, new = self._outputs(flat)
            if self.direction == "decoder":
                outputs = [pick_frames(outputs[0], outputs[1], frames_dtype)]
        return [o.cpu().numpy() for o in outputs], new

    def concat(self, caches: Sequence[Cache]) -> Cache:
        from .cache import concat_slots

        return concat_slots(caches)

    def split(self, cache: Cache, n: int) -> list[Cache]:
        from .cache import split_slots

        return split_slots(cache, n)


class OnnxSteps(ArtifactSteps):
    """Runs ``<direction>_first.onnx`` / ``<direction>_next.onnx`` with ONNX Runtime."""

    def __init__(self, directory: Path, manifest: ExportManifest, direction: Direction, *,
                 device: str = "cpu", precision: str = "float32", threads: int = 0) -> None:
        import onnxruntime as ort

        super().__init__(manifest, direction)
        if precision != "float32":
            raise ArtifactError("ONNX artifacts run in float32 only; use torchscript for "
                                f"{precision}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.sessions = {
            step: ort.InferenceSession(str(directory / manifest.files[f"{direction}_{step}"]),
                                       options, providers=providers)
            for step in STEPS
        }
        self.input_name = ONNX_INPUT[direction]

    def _run(self, step: str, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype
             ) -> tuple[list[np.ndarray], Cache]:
        feed = {self.input_name: np.ascontiguousarray(x)}
        feed.update({cache_input_name(i): c for i, c in enumerate(cache)})
        outputs, new = self._outputs(self.sessions[step].run(None, feed))
        if self.direction == "decoder":
            frames, video = outputs
            outputs = [frames if frames_dtype == "uint8" else np.ascontiguousarray(
                video.transpose(0, 2, 3, 4, 1), dtype=np.float32)]
        return outputs, new

    def concat(self, caches: Sequence[Cache]) -> Cache:
        if len(caches) == 1:
            return list(caches[0])
        return [np.concatenate(slot) for slot in zip(*caches, strict=True)]

    def split(self, cache: Cache, n: int) -> list[Cache]:
        return [[t[b : b + 1].copy() for t in cache] for b in range(n)] if n > 1 else [cache]


def load_steps(directory: str | Path, direction: Direction, *, device: str = "cpu",
               precision: str = "float32", threads: int = 0,
               manifest: ExportManifest | None = None) -> ArtifactSteps:
    """Load one direction's exported steps from an artifact directory.

    ``device``: ``cpu`` or ``cuda[:N]``. ``threads``: intra-op threads (0: the library's
    default; for TorchScript this sets torch's process-wide thread count).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    if manifest.format == "torchscript":
        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchScriptSteps(directory, manifest, direction, device=device,
                                precision=precision)
    return OnnxSteps(directory, manifest, direction, device=device, precision=precision,
                     threads=threads)
