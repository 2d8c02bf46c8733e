"""Serving step functions: the unit the gateway batches and Triton runs.

Frames travel as uint8 (4x smaller than float) and are normalised inside; latents travel as
float32 diffusion latents. Feature caches are explicit tensor lists, in and out, with the
batch dimension = independent videos, so steps of several videos at the same size can be
concatenated and run together.

* ``EncoderStep.first(frames)``: frames ``(B, 1, H, W, 3)`` uint8 (frame 0; H, W multiples
  of 8) -> ``mu, logvar`` ``(B, z, 1, H/8, W/8)`` float32 and the cache.
* ``EncoderStep.next(frames, cache)``: frames ``(B, 4k, H, W, 3)`` -> moments of ``k`` latent
  frames and the new cache.
* ``DecoderStep.first(latent)``: latent ``(B, z, 1, h, w)`` -> frames ``(B, 1, 8h, 8w, 3)``
  uint8 (rounded, clamped), the decoder's own ``video`` ``(B, 3, 1, 8h, 8w)`` float32 (not
  clamped) and the cache. Both come out of one step: the uint8 frames are what a video
  file holds, the float video what a caller comparing with the model (or training against
  it) asks for; a runner copies to the host only the one a request wants.
* ``DecoderStep.next(latent, cache)``: latent ``(B, z, k, h, w)`` -> ``(B, 4k, 8h, 8w, 3)``
  frames, ``(B, 3, 4k, 8h, 8w)`` video and the new cache.

:class:`EagerSteps` is these steps as the step protocol (``ivvae.core.steps.Steps``, numpy
in and out), what the local backend's step engine runs; ``ivvae export`` traces the same
modules into the artifacts that the Triton models run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.steps import Cache, Direction, FramesDtype, Steps
from .cache import FeatureCache, concat_slots, split_slots
from .vae import IVVAE


def frames_to_video(frames: Tensor) -> Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float32 in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def video_to_frames(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8, rounded (not truncated)."""
    x = ((video.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


def pick_frames(frames: Tensor, video: Tensor, frames_dtype: FramesDtype) -> Tensor:
    """The decoder output a step was asked for, in the frames layout ``(B, T, H, W, 3)``:
    the uint8 ``frames``, or ``video`` ``(B, 3, T, H, W)`` as float32 channels-last."""
    if frames_dtype == "uint8":
        return frames
    return video.float().permute(0, 2, 3, 4, 1).contiguous()


class EncoderStep(nn.Module):
    def __init__(self, vae: IVVAE) -> None:
        super().__init__()
        self.vae = vae

    def first(self, frames: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        mu, logvar, cache = self.vae.encode_step(frames_to_video(frames), None)
        return mu, logvar, list(cache.tensors)

    def next(self, frames: Tensor, cache: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        mu, logvar, new = self.vae.encode_step(frames_to_video(frames),
                                               FeatureCache(tuple(cache)))
        return mu, logvar, list(new.tensors)


class DecoderStep(nn.Module):
    def __init__(self, vae: IVVAE) -> None:
        super().__init__()
        self.vae = vae

    def first(self, latent: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        video, cache = self.vae.decode_step(latent, None)
        return video_to_frames(video), video.float(), list(cache.tensors)

    def next(self, latent: Tensor, cache: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
        video, new = self.vae.decode_step(latent, FeatureCache(tuple(cache)))
        return video_to_frames(video), video.float(), list(new.tensors)


class EagerSteps(Steps):
    """One direction of an eager :class:`IVVAE` as the step protocol (numpy at the boundary,
    the cache as torch tensors on the model's device)."""

    def __init__(self, vae: IVVAE, direction: Direction) -> None:
        self.direction = direction
        self.z_dim = vae.cfg.z_dim
        self.device = vae.device
        self.module: EncoderStep | DecoderStep = (
            EncoderStep(vae) if direction == "encoder" else DecoderStep(vae))

    def first(self, x: np.ndarray, frames_dtype: FramesDtype = "uint8"
              ) -> tuple[list[np.ndarray], Cache]:
        return self._run(x, None, frames_dtype)

    def next(self, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype = "uint8"
             ) -> tuple[list[np.ndarray], Cache]:
        return self._run(x, cache, frames_dtype)

    def _run(self, x: np.ndarray, cache: Cache | None, frames_dtype: FramesDtype
             ) -> tuple[list[np.ndarray], Cache]:
        inp = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        with torch.inference_mode():
            out = self.module.first(inp) if cache is None else self.module.next(inp, cache)
        *outputs, new = out
        if self.direction == "decoder":
            outputs = [pick_frames(outputs[0], outputs[1], frames_dtype)]
        return [o.cpu().numpy() for o in outputs], new

    def concat(self, caches: Sequence[Cache]) -> Cache:
        return concat_slots(caches)

    def split(self, cache: Cache, n: int) -> list[Cache]:
        return split_slots(cache, n)
