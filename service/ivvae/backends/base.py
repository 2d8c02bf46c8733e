"""The inference backend interface: per-video sessions of streaming steps.

A session is one video's pass through the encoder or the decoder. Its steps must be sent in
order, one at a time (each carries the feature cache of the previous one). Backends differ
in where the cache lives: in the gateway process (``local``) or in Triton's model instance
(``triton``, keyed by the sequence id).

Array contracts (numpy, batch dimension 1 = this video):

* encode: ``first(frames)`` with frames ``(1, 1, H, W, 3)`` uint8, then ``next(frames)``
  with ``(1, 4k, H, W, 3)``; each returns ``mu, logvar`` float32 ``(1, z, n, H/8, W/8)``.
  H and W are multiples of 8 (the pipeline pads).
* decode: ``first(latent)`` with latent ``(1, z, 1, h, w)`` float32, then ``next(latent)``
  with ``(1, z, k, h, w)``; each returns frames ``(1, T, 8h, 8w, 3)`` uint8.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway knows about a served model (no weights)."""

    name: str
    z_dim: int
    dim: int
    scale_factor: float
    shift_factor: float
    weights_sha256: str
    trained: bool
    source: str  # where the weights came from: a path, "bundled" or "untrained"
    num_params: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "z_dim": self.z_dim, "dim": self.dim,
            "scale_factor": self.scale_factor, "shift_factor": self.shift_factor,
            "weights_sha256": self.weights_sha256, "trained": self.trained,
            "source": self.source, "num_params": self.num_params,
        }


class EncodeSession(abc.ABC):
    @abc.abstractmethod
    async def first(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    async def next(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the session's state (also on failure or cancellation)."""


class DecodeSession(abc.ABC):
    @abc.abstractmethod
    async def first(self, latent: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    async def next(self, latent: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the session's state (also on failure or cancellation)."""


class Backend(abc.ABC):
    name: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Load models / connect. Called once before serving."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz."""

    @property
    @abc.abstractmethod
    def models(self) -> dict[str, ModelInfo]: ...

    @property
    @abc.abstractmethod
    def default_model(self) -> str: ...

    @abc.abstractmethod
    def encode_session(self, model: str) -> EncodeSession: ...

    @abc.abstractmethod
    def decode_session(self, model: str) -> DecodeSession: ...
