"""Exported step artifacts: the manifest that describes them, and runners that execute them.

``ivvae export`` (``ivvae.model.export``) writes the four serving step graphs of
``ivvae.model.steps`` (encoder first/next, decoder first/next) as standalone artifacts with
explicit cache tensors in and out, plus ``export_manifest.json``. The Triton python models
and the export verification run them through :func:`load_steps`, so both execute exactly
the same code path.

Formats and files (names are relative to the artifact directory):

* ``torchscript``: ``encoder.pt`` and ``decoder.pt``, each a traced module with two methods,
  ``first(x)`` and ``next(x, *cache)``, returning a flat tuple (outputs, then the cache).
* ``onnx``: ``encoder_first.onnx``, ``encoder_next.onnx``, ``decoder_first.onnx``,
  ``decoder_next.onnx``. Inputs ``frames`` or ``latent`` then ``cache_0 .. cache_N``;
  outputs ``mu, logvar`` or ``frames`` then ``new_cache_0 .. new_cache_N``. Batch, height and
  width are dynamic everywhere; time is dynamic in the ``next`` graphs (``first`` takes one
  frame / one latent frame).

Array contracts (numpy at this boundary; batch = independent videos):

* encoder: ``frames`` ``(B, T, H, W, 3)`` uint8, H and W multiples of 8; ``first``: T = 1;
  ``next``: T = 4k. Outputs ``mu, logvar`` float32 ``(B, z, k or 1, H/8, W/8)``.
* decoder: ``latent`` ``(B, z, n, h, w)`` float32; ``first``: n = 1. Output ``frames``
  ``(B, 1 or 4n, 8h, 8w, 3)`` uint8.
* cache slot ``i``: ``(B, C_i, 1, H / d_i, W / d_i)`` float (``H`` = frame height) with
  ``C_i, d_i`` listed in the manifest. Caches stay in the runner's native type (torch
  tensors on the model's device, or numpy arrays for ONNX Runtime) between steps.
"""

from __future__ import annotations

import abc
import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

MANIFEST_NAME = "export_manifest.json"
# Bump when the artifact contract (names, signatures, layout) changes: artifacts exported
# by an older contract are then stale.
EXPORT_VERSION = 1
FORMATS = ("torchscript", "onnx")
PRECISIONS = ("float32", "bfloat16", "float16")
Direction = Literal["encoder", "decoder"]
DIRECTIONS: tuple[Direction, ...] = ("encoder", "decoder")
STEPS = ("first", "next")

Cache = list[Any]  # torch tensors (TorchScript) or numpy arrays (ONNX Runtime)

# ONNX tensor names; the TorchScript methods take and return the same tensors positionally.
ONNX_INPUT = {"encoder": "frames", "decoder": "latent"}
ONNX_OUTPUTS = {"encoder": ("mu", "logvar"), "decoder": ("frames",)}


def cache_input_name(i: int) -> str:
    return f"cache_{i}"


def cache_output_name(i: int) -> str:
    return f"new_cache_{i}"


def artifact_files(fmt: str) -> dict[str, str]:
    """Logical artifact name -> file name for a format."""
    if fmt == "torchscript":
        return {d: f"{d}.pt" for d in DIRECTIONS}
    if fmt == "onnx":
        return {f"{d}_{s}": f"{d}_{s}.onnx" for d in DIRECTIONS for s in STEPS}
    raise ValueError(f"artifact format must be one of {FORMATS}, got {fmt!r}")


class ArtifactError(ValueError):
    """Artifacts that are missing, incomplete, stale or inconsistent."""


@dataclass(frozen=True)
class CacheSlot:
    """Cache slot shape: ``(B, channels, 1, H / divisor, W / divisor)``."""

    channels: int
    divisor: int


@dataclass(frozen=True)
class ExportManifest:
    """``export_manifest.json``: what was exported, from which weights, and how it checked.

    ``model`` holds the served model's description (name, z_dim, dim, scale_factor,
    shift_factor, weights_sha256, trained, source, num_params): the gateway learns it from
    Triton's model config, never from the weights.
    """

    format: str
    model: dict[str, Any]
    files: dict[str, str]
    cache_slots: dict[str, list[CacheSlot]]
    ivvae_version: str
    torch_version: str
    export_version: int = EXPORT_VERSION
    precision: str = "float32"  # dtype of the exported weights; compute precision is chosen at load
    verification: dict[str, Any] = field(default_factory=dict)

    @property
    def z_dim(self) -> int:
        return int(self.model["z_dim"])

    @property
    def weights_sha256(self) -> str:
        return str(self.model["weights_sha256"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ExportManifest:
        try:
            raw = json.loads(text)
            slots = {d: [CacheSlot(int(s["channels"]), int(s["divisor"])) for s in v]
                     for d, v in raw["cache_slots"].items()}
            return cls(
                format=str(raw["format"]), model=dict(raw["model"]), files=dict(raw["files"]),
                cache_slots=slots, ivvae_version=str(raw["ivvae_version"]),
                torch_version=str(raw["torch_version"]),
                export_version=int(raw["export_version"]), precision=str(raw["precision"]),
                verification=dict(raw.get("verification", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed {MANIFEST_NAME}: {exc!r}") from exc

    def write(self, directory: Path) -> Path:
        """Write the manifest last and atomically: its presence marks a complete export."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path


def read_manifest(directory: str | Path) -> ExportManifest:
    """The manifest of an artifact directory; checks that every listed file exists."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory} holds no {MANIFEST_NAME}: export with `ivvae export`")
    manifest = ExportManifest.from_json(path.read_text())
    if manifest.export_version != EXPORT_VERSION:
        raise ArtifactError(f"{path}: export version {manifest.export_version}, this code "
                            f"reads {EXPORT_VERSION}; export again")
    if manifest.files != artifact_files(manifest.format):
        raise ArtifactError(f"{path}: unexpected file list {manifest.files}")
    missing = [f for f in manifest.files.values() if not (directory / f).is_file()]
    if missing:
        raise ArtifactError(f"{directory}: missing artifact files {missing}")
    return manifest


# -- runners -------------------------------------------------------------------------------


class ArtifactSteps(abc.ABC):
    """One direction's exported steps. ``first``/``next`` return (outputs, new cache)."""

    def __init__(self, manifest: ExportManifest, direction: Direction) -> None:
        self.manifest = manifest
        self.direction = direction
        self.num_slots = len(manifest.cache_slots[direction])

    def first(self, x: np.ndarray) -> tuple[list[np.ndarray], Cache]:
        return self._run("first", x, [])

    def next(self, x: np.ndarray, cache: Cache) -> tuple[list[np.ndarray], Cache]:
        return self._run("next", x, cache)

    @abc.abstractmethod
    def _run(self, step: str, x: np.ndarray, cache: Cache) -> tuple[list[np.ndarray], Cache]:
        """Run step ``first`` or ``next`` on ``x`` with the streams' cache."""

    @abc.abstractmethod
    def concat(self, caches: Sequence[Cache]) -> Cache:
        """Caches of several streams stacked along the batch dimension."""

    @abc.abstractmethod
    def split(self, cache: Cache, n: int) -> list[Cache]:
        """Inverse of ``concat`` for ``n`` streams of batch size 1 (copies, not views)."""

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
        self._torch = torch
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ArtifactError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "float16" and self.device.type != "cuda":
            raise ArtifactError("float16 compute is supported on CUDA only; use bfloat16")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[precision]
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

    def _run(self, step: str, x: np.ndarray, cache: Cache) -> tuple[list[np.ndarray], Cache]:
        torch = self._torch
        inp = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        with self._mode():
            flat = getattr(self.module, step)(inp, *cache)
        outputs, new = self._outputs(flat)
        return [o.cpu().numpy() for o in outputs], new

    def concat(self, caches: Sequence[Cache]) -> Cache:
        if len(caches) == 1:
            return list(caches[0])
        return [self._torch.cat(slot) for slot in zip(*caches, strict=True)]

    def split(self, cache: Cache, n: int) -> list[Cache]:
        # clone: a view would keep the whole batch's cache alive
        return [[t[b : b + 1].clone() for t in cache] for b in range(n)] if n > 1 else [cache]


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

    def _run(self, step: str, x: np.ndarray, cache: Cache) -> tuple[list[np.ndarray], Cache]:
        feed = {self.input_name: np.ascontiguousarray(x)}
        feed.update({cache_input_name(i): c for i, c in enumerate(cache)})
        return self._outputs(self.sessions[step].run(None, feed))

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
