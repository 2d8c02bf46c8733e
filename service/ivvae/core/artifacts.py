"""Exported step artifacts: formats, file and tensor names, and the export manifest.

``ivvae export`` writes the four serving step graphs (encoder first/next, decoder
first/next) as standalone artifacts with explicit cache tensors in and out, plus
``export_manifest.json``. This module is torch-free so that a repository preparer
(``docker/triton_prepare.py``, ``ivvae triton-serve``) reads manifests without torch; the
runners that execute artifacts live in ``ivvae.model.artifacts``.

Formats and files (names are relative to the artifact directory):

* ``torchscript``: ``encoder.pt`` and ``decoder.pt``, each a traced module with two methods,
  ``first(x)`` and ``next(x, *cache)``, returning a flat tuple (outputs, then the cache).
* ``onnx``: ``encoder_first.onnx``, ``encoder_next.onnx``, ``decoder_first.onnx``,
  ``decoder_next.onnx``. Inputs ``frames`` or ``latent`` then ``cache_0 .. cache_N``;
  outputs ``mu, logvar`` or ``frames, video`` (uint8 frames and the float video they are
  rounded from, see ``ivvae.model.steps``) then ``new_cache_0 .. new_cache_N``. Batch, height and
  width are dynamic everywhere; time is dynamic in the ``next`` graphs.

Cache slot ``i``: ``(B, C_i, 1, H / d_i, W / d_i)`` float (``H`` = frame height) with
``C_i, d_i`` listed in the manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .files import atomic_write
from .model_info import ModelInfo

MANIFEST_NAME = "export_manifest.json"
# Bump when the artifact contract (names, signatures, layout) changes: artifacts exported
# by an older contract are then stale.
EXPORT_VERSION = 2  # 2: the decoder also returns its float video
ArtifactFormat = Literal["torchscript", "onnx"]
FORMATS: tuple[ArtifactFormat, ...] = get_args(ArtifactFormat)
DEFAULT_FORMAT: ArtifactFormat = FORMATS[0]
Direction = Literal["encoder", "decoder"]
DIRECTIONS: tuple[Direction, ...] = ("encoder", "decoder")
STEPS = ("first", "next")

# ONNX tensor names; the TorchScript methods take and return the same tensors positionally.
ONNX_INPUT = {"encoder": "frames", "decoder": "latent"}
ONNX_OUTPUTS = {"encoder": ("mu", "logvar"), "decoder": ("frames", "video")}


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

    ``model`` is the served model's :meth:`ModelInfo.as_dict`: the gateway learns it from
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

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo.from_dict(self.model)

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
        return atomic_write(Path(directory) / MANIFEST_NAME, self.to_json())


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


