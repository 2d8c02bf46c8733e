"""The geometry of IV-VAE: compression, latent sizes, padding, and how a video is stepped.

Compression: 4x in time, 8x8 in space. Frame 0 is encoded alone (like an image); each
later group of ``GROUP`` = 4 frames becomes one latent frame, so a video of ``T`` frames has
``1 + ceil((T - 1) / 4)`` latent frames of ``ceil(H / 8) x ceil(W / 8)``.

Padding policy (``PADDING_POLICY``, recorded in every latent file): time repeats the last
frame up to ``1 + 4N`` frames; space replicates the right column and bottom row up to a
multiple of 8 (at least 8). Decoding crops back to the recorded size.

Steps: a stream is stepped as frame 0 alone, then steps of ``groups_per_step`` groups (the
last one shorter); latents likewise as latent frame 0, then ``groups_per_step`` latent
frames per step. :class:`FrameStepper` cuts frames that arrive in chunks that way;
:func:`decode_plan` is the plan for latent frames.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar

import numpy as np

# Encoder stages that halve time (the decoder mirrors them): none in stage 0, then two.
TEMPORAL_DOWNSAMPLE = (False, True, True)
TIME_COMPRESSION = 2 ** sum(TEMPORAL_DOWNSAMPLE)  # 4
SPACE_COMPRESSION = 8  # three stride-2 downsamplers
GROUP = TIME_COMPRESSION  # frames per GCConv group at the full frame rate

PADDING_POLICY = "time:repeat-last-to-1+4n;space:replicate-right-bottom-to-multiple-of-8"


def latent_frames(num_frames: int) -> int:
    """Latent frames of a ``num_frames``-frame video (after time padding)."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return 1 + math.ceil((num_frames - 1) / TIME_COMPRESSION)


def padded_frames(num_frames: int) -> int:
    """Frames after time padding: ``1 + 4N``."""
    return 1 + TIME_COMPRESSION * (latent_frames(num_frames) - 1)


def latent_size(pixels: int) -> int:
    """Latent rows (or columns) of ``pixels`` rows (or columns), after space padding."""
    if pixels < 1:
        raise ValueError(f"a frame side must be >= 1 pixel, got {pixels}")
    return max(1, math.ceil(pixels / SPACE_COMPRESSION))


def latent_shape(z_dim: int, num_frames: int, height: int, width: int,
                 batch: int = 1) -> tuple[int, int, int, int, int]:
    """``(B, z, n, h, w)`` of the latent of a ``num_frames x height x width`` video."""
    return (batch, z_dim, latent_frames(num_frames), latent_size(height), latent_size(width))


def pad_frames(frames: np.ndarray) -> np.ndarray:
    """``(n, H, W, 3)`` uint8 -> ``(1, n, H8, W8, 3)``: the space padding of the policy."""
    _, h, w, _ = frames.shape
    ph = latent_size(h) * SPACE_COMPRESSION - h
    pw = latent_size(w) * SPACE_COMPRESSION - w
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)[None]


def decode_plan(num_latent_frames: int, groups_per_step: int) -> Iterator[tuple[int, int]]:
    """Latent-frame ranges ``[a, b)``, one per decoder step."""
    if groups_per_step < 1:
        raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
    if num_latent_frames < 1:
        raise ValueError("a latent needs at least one frame")
    yield 0, 1
    for a in range(1, num_latent_frames, groups_per_step):
        yield a, min(num_latent_frames, a + groups_per_step)


def fill_to_group(count: int) -> int:
    """Frames to repeat after the last of ``count`` frames (after frame 0) to end a group."""
    return -count % GROUP


Array = TypeVar("Array")


def to_latent(s: Array, scale_factor: float, shift_factor: float) -> Array:
    """Posterior mean (or sample) -> diffusion latent: ``scale * (s - shift)``.

    Works on numpy arrays and torch tensors alike (plain arithmetic).
    """
    return scale_factor * (s - shift_factor)  # type: ignore[operator,return-value]


def from_latent(latent: Array, scale_factor: float, shift_factor: float) -> Array:
    """Inverse of :func:`to_latent`."""
    return latent / scale_factor + shift_factor  # type: ignore[operator,return-value]


def moments_to_latent(mu: np.ndarray, logvar: np.ndarray, scale_factor: float,
                      shift_factor: float, *, sample: bool, seed: int | None) -> np.ndarray:
    """The diffusion latent of posterior moments, float32, same shape as ``mu``.

    ``sample``: ``s = mu + exp(logvar / 2) * eps`` with ``eps`` from numpy's PCG64 seeded
    with ``seed`` (the same on every backend and machine, so a (video, seed) pair always
    gives the same latent); else ``s = mu``.
    """
    s = mu
    if sample:
        eps = np.random.default_rng(seed).standard_normal(mu.shape, dtype=np.float32)
        s = mu + np.exp(0.5 * logvar) * eps
    return np.asarray(to_latent(s, scale_factor, shift_factor), dtype=np.float32)


class FrameStepper:
    """Cuts frames arriving in chunks of any size into encoder steps.

    :meth:`push` takes ``(n, H, W, 3)`` frames and returns the steps that are complete:
    ``(first, frames)`` with frame 0 alone first, then ``GROUP * groups_per_step`` frames
    per step. :meth:`flush` returns the last, shorter step, its last group filled by
    repeating the last frame (the time padding of ``PADDING_POLICY``). Frames stay as they
    came (no space padding); memory is bounded by one step.
    """

    def __init__(self, groups_per_step: int) -> None:
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {groups_per_step}")
        self.step = GROUP * groups_per_step
        self.count = 0  # frames pushed
        self._pending: list[np.ndarray] = []
        self._pending_frames = 0

    def push(self, chunk: np.ndarray) -> list[tuple[bool, np.ndarray]]:
        if not len(chunk):
            return []
        out: list[tuple[bool, np.ndarray]] = []
        if self.count == 0:  # frame 0 is its own step (the image path)
            out.append((True, chunk[:1]))
            chunk = chunk[1:]
            self.count = 1
        self.count += len(chunk)
        if len(chunk):
            self._pending.append(chunk)
            self._pending_frames += len(chunk)
        while self._pending_frames >= self.step:
            out.append((False, self._take(self.step)))
        return out

    def flush(self) -> list[tuple[bool, np.ndarray]]:
        if not self._pending_frames:
            return []
        frames = self._take(self._pending_frames)
        fill = fill_to_group(len(frames))
        if fill:
            frames = np.concatenate([frames, np.repeat(frames[-1:], fill, axis=0)])
        return [(False, frames)]

    def _take(self, n: int) -> np.ndarray:
        buf = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        taken, rest = buf[:n], buf[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_frames = len(rest)
        return taken
