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
  with ``(1, z, k, h, w)``; each returns frames ``(1, T, 8h, 8w, 3)`` in the session's
  ``frames_dtype``: uint8, or float32 (the decoder's own values; see ``ivvae.core.steps``).
"""

from __future__ import annotations

import abc
from typing import Protocol

import numpy as np

from ..core.model_info import ModelInfo
from ..core.steps import Direction, ErrorKind, FramesDtype, StepResult
from ..errors import BackendUnavailable, InvalidInput, InvalidLatent, IVVAEError
from ..memory import StepCost


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

    def step_cost(self, model: str, direction: Direction) -> StepCost:
        """Peak memory of one step of ``model`` in this process (``ivvae.memory``). Zero
        model cost by default: a remote backend's model runs in another process."""
        return StepCost()

    @abc.abstractmethod
    def encode_session(self, model: str) -> EncodeSession: ...

    @abc.abstractmethod
    def decode_session(self, model: str, frames_dtype: FramesDtype = "uint8"
                       ) -> DecodeSession: ...


class StepSequence(Protocol):
    """One video's pass through one direction of a backend (steps in order)."""

    async def step(self, array: np.ndarray, *, first: bool) -> list[np.ndarray]: ...

    async def close(self) -> None: ...


class _OverSequence:
    """A session's order rules over a backend's sequence: ``first`` once, before any
    ``next`` (it may be retried until it succeeds), nothing after ``close``."""

    def __init__(self, sequence: StepSequence) -> None:
        self.sequence = sequence
        self._started = False
        self._closed = False

    async def _step(self, array: np.ndarray, *, first: bool) -> list[np.ndarray]:
        if self._closed:
            raise RuntimeError("step after close()")
        if first == self._started:
            raise RuntimeError("first() must come once, before next()")
        outputs = await self.sequence.step(array, first=first)
        self._started = True
        return outputs

    async def close(self) -> None:
        self._closed = True
        await self.sequence.close()


class SequenceEncode(_OverSequence, EncodeSession):
    """An encode session over a backend's :class:`StepSequence`."""

    async def first(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = await self._step(frames, first=True)
        return mu, logvar

    async def next(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = await self._step(frames, first=False)
        return mu, logvar


class SequenceDecode(_OverSequence, DecodeSession):
    """A decode session over a backend's :class:`StepSequence` (latents sent as float32)."""

    async def first(self, latent: np.ndarray) -> np.ndarray:
        (frames,) = await self._step(latent.astype(np.float32, copy=False), first=True)
        return frames

    async def next(self, latent: np.ndarray) -> np.ndarray:
        (frames,) = await self._step(latent.astype(np.float32, copy=False), first=False)
        return frames


def step_error(result: StepResult, direction: str) -> IVVAEError:
    """The service error for a failed step of the step engine (one mapping for every
    backend; Triton's status codes carry the same kinds)."""
    if result.kind is ErrorKind.INVALID:
        return (InvalidInput if direction == "encoder" else InvalidLatent)(result.error)
    if result.kind is ErrorKind.LOST:
        return BackendUnavailable(result.error)
    return IVVAEError(result.error)
