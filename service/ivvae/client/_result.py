"""What the clients return: latent files as bytes, arrays, tensors or files on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.files import TMP_SUFFIX, atomic_write, temp_path
from ..core.model_info import ModelInfo
from ..latents import LatentInfo, decode_latent_file
from ..safetensors_io import SafetensorsError, loads

if TYPE_CHECKING:
    import torch

__all__ = ["TMP_SUFFIX", "LatentResult", "Models", "atomic_write", "temp_path"]


@dataclass(frozen=True)
class LatentResult:
    """A latent file (``.safetensors``) and what its metadata says.

    ``data`` is the file, byte for byte as the server sent it; ``info`` its metadata;
    ``cache_hit`` whether the server had it cached (None when not known).
    """

    data: bytes
    info: LatentInfo
    cache_hit: bool | None = None
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_bytes(cls, data: bytes, cache_hit: bool | None = None) -> LatentResult:
        """Parse and validate ``data`` (raises ``InvalidLatent``)."""
        latent, info = decode_latent_file(data)
        result = cls(data, info, cache_hit)
        result._arrays["latent"] = latent
        return result

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatentResult:
        return cls.from_bytes(Path(path).read_bytes())

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``(1, z, 1 + ceil((T-1)/4), ceil(H/8), ceil(W/8))``."""
        return self.info.latent_shape

    def numpy(self, name: str = "latent") -> np.ndarray:
        """A stored tensor as float32: ``latent`` (``latent_shape``, the diffusion latent
        ``scale * (s - shift)``), or ``mu`` / ``logvar`` (encoded with ``moments=True``).
        A new array at each call: editing one in place changes nothing else."""
        if name not in self._arrays:
            try:
                tensors, _ = loads(self.data)
            except SafetensorsError as exc:  # from_bytes parsed it once already
                raise ValueError(str(exc)) from exc
            if name not in tensors:
                raise KeyError(f"the latent file has no tensor {name!r} (has {sorted(tensors)})")
            self._arrays[name] = tensors[name].as_float32()
        return self._arrays[name].copy()

    def torch(self, name: str = "latent") -> torch.Tensor:
        """A stored tensor as a CPU tensor in its stored dtype (bfloat16 stays bfloat16,
        float16 float16, the moments float32); imports torch on first use."""
        import torch

        try:
            tensors, _ = loads(self.data)
        except SafetensorsError as exc:
            raise ValueError(str(exc)) from exc
        if name not in tensors:
            raise KeyError(f"the latent file has no tensor {name!r} (has {sorted(tensors)})")
        stored = tensors[name]
        if stored.dtype == "BF16":
            # bfloat16 travels as its uint16 bit patterns; torch reinterprets them.
            bits = np.array(stored.array).view(np.int16)
            return torch.from_numpy(bits).view(torch.bfloat16)
        return torch.from_numpy(np.array(stored.array))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the file atomically (a crash never leaves half a latent at ``path``)."""
        return atomic_write(path, self.data)


@dataclass(frozen=True)
class Models:
    """The served models; ``default`` is used when a request names none.
    ``encode_precision``: what the server encodes in (empty: an older server did not say)."""

    default: str
    models: list[ModelInfo]
    encode_precision: str = ""

    def names(self) -> list[str]:
        return [m.name for m in self.models]
