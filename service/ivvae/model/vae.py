"""IVVAE: the public model. Whole-video encode/decode, step functions, streaming.

Tensor conventions at this boundary:

* ``video``: ``(B, 3, T, H, W)`` float in ``[-1, 1]``, RGB. Any ``T >= 1``, ``H, W >= 1``.
* ``latent``: ``(B, z, 1 + ceil((T-1)/4), ceil(H/8), ceil(W/8))`` float,
  ``latent = scale_factor * (s - shift_factor)`` with ``s = mu`` (default) or a sample.
* ``mu``/``logvar``: same shape as ``latent``: the posterior moments.

Padding policy (``ivvae.core.geometry.PADDING_POLICY``; the official code silently drops
frames and pixels, we don't): time repeats the last frame up to ``T = 1 + 4N``; space
replicates the right and bottom edges up to a multiple of 8 (at least 8);
``decode(latent, num_frames=T, height=H, width=W)`` crops back to exactly ``(T, H, W)``.

Step functions (the unit the service batches and Triton exports), on padded inputs:

* ``encode_step(frames, cache)``: ``cache=None`` starts a stream and ``frames`` holds frame 0
  plus ``4k`` more; with a cache, ``frames`` holds ``4k`` frames. Returns ``(mu, logvar,
  cache)`` for the ``k`` (+1 at the start) completed latent frames.
* ``decode_step(latent, cache)``: the same for latent frames -> video frames (1 for the
  first latent frame, 4 for each later one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.geometry import (
    SPACE_COMPRESSION,
    TIME_COMPRESSION,
    from_latent,
    latent_frames,
    latent_size,
    to_latent,
)
from .cache import FeatureCache
from .config import IVVAEConfig
from .layers import SepConv3d
from .network import Decoder, Encoder
from .precision import torch_dtype


def pad_space(video: Tensor) -> Tensor:
    """Replicate the right column and bottom row up to multiples of 8 (at least 8)."""
    h, w = video.shape[-2:]
    ph = latent_size(h) * SPACE_COMPRESSION - h
    pw = latent_size(w) * SPACE_COMPRESSION - w
    if ph == 0 and pw == 0:
        return video
    b, c, t = video.shape[:3]
    # Fold time into channels: 4-D replicate padding touches only the last two dims.
    flat = F.pad(video.reshape(b, c * t, h, w), (0, pw, 0, ph), mode="replicate")
    return flat.reshape(b, c, t, h + ph, w + pw)


def _check_finite(x: Tensor, what: str) -> None:
    """Refuse NaN and infinities: every conv spreads one over its whole receptive field, so
    they came back as an all-NaN result and no error (the service refuses them too).

    One reduction over the input. Only the eager entry points call this, never the step
    functions that ``ivvae.model.export`` traces, where a branch on tensor values would be
    baked into the graph. Skipped likewise when a caller traces or compiles these entry
    points: under ``torch.compile`` it would cut the graph in two (and fail
    ``fullgraph=True``).
    """
    if x.is_meta or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return  # meta tensors (FLOP counting, shape inference) hold no values
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the {what} holds NaN or infinite values")


def _check_video(video: Tensor) -> None:
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
    if video.shape[0] < 1 or video.shape[3] < 1 or video.shape[4] < 1:
        raise ValueError(f"video must have B, H, W >= 1, got {tuple(video.shape)}")
    _check_finite(video, "video")


def _check_latent(latent: Tensor, z_dim: int) -> None:
    """What a whole latent must be before decoding; without this a batch of 0 failed deep
    in the network (a ZeroDivisionError) and 0 latent frames as "-3 video frames"."""
    shape = tuple(latent.shape)
    if latent.dim() != 5 or latent.shape[1] != z_dim:
        raise ValueError(f"latent must be (B, {z_dim}, n, h, w) for this {z_dim}-channel "
                         f"model, got {shape}")
    b, _, n, h, w = shape
    if b < 1:
        raise ValueError(f"latent holds no video (batch size 0): {shape}")
    if n < 1:
        raise ValueError(f"latent has no latent frames (n = 0), at least 1 is needed: {shape}")
    if h < 1 or w < 1:
        raise ValueError(f"latent must have h, w >= 1, got {shape}")
    _check_finite(latent, "latent")


class IVVAE(nn.Module):
    """The IV-VAE model (KTC split latent, GCConv encoder/decoder).

    Module names differ from the official checkpoint; ``ivvae.model.checkpoint`` maps them.
    Gradients flow through every method when parameters require them (training); models
    from ``load_model`` are frozen, so inference builds no autograd graph.
    """

    def __init__(self, cfg: IVVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder(cfg)
        self.quant_conv = SepConv3d(2 * z, z, 1)  # official 'conv1'
        self.post_quant_conv = SepConv3d(z, z // 2, 1)  # official 'conv2'
        self.decoder = Decoder(cfg)
        self.encode_dtype = torch.float32
        self.decode_dtype = torch.float32
        self.weights_sha256 = ""  # set by the loader
        self.name = ""  # set by the loader

    # -- precision -------------------------------------------------------------------------

    def set_precision(self, *, encode: str | torch.dtype | None = None,
                      decode: str | torch.dtype | None = None) -> None:
        """Compute precision per direction: float32, bfloat16 (CPU and CUDA) or float16
        (CUDA only). Lower precisions run under autocast; outputs stay float32."""
        if encode is not None:
            self.encode_dtype = self._parse_precision(encode)
        if decode is not None:
            self.decode_dtype = self._parse_precision(decode)

    def _parse_precision(self, value: str | torch.dtype) -> torch.dtype:
        dtype = torch_dtype(value) if isinstance(value, str) else value
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"precision must be float32, bfloat16 or float16, got {value!r}")
        if dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("float16 compute is supported on CUDA only; use bfloat16 on CPU")
        return dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _compute(self, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
        if dtype == torch.float32 or dtype == self.param_dtype:
            return contextlib.nullcontext()
        return cast(
            contextlib.AbstractContextManager[None],
            torch.autocast(device_type=self.device.type, dtype=dtype),
        )

    # -- step functions (padded inputs) ----------------------------------------------------

    def _moments(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """Post-encoder conv and the channel reorder: mu = [A[:k], B[:k]], logvar = rest."""
        k = self.cfg.half_z
        a = self.quant_conv.conv_2d(e)
        b = self.quant_conv.conv_3d(e)
        mu = torch.cat([a[:, :k], b[:, :k]], dim=1)
        logvar = torch.cat([a[:, k:], b[:, k:]], dim=1)
        # The networks work channels-last; callers get plain contiguous tensors.
        return mu.float().contiguous(), logvar.float().contiguous()

    def encode_step(
        self, frames: Tensor, cache: FeatureCache | None
    ) -> tuple[Tensor, Tensor, FeatureCache]:
        """One streaming encoder step.

        ``frames``: ``(B, 3, T, H, W)`` float in [-1, 1], H and W multiples of 8. Without a
        cache ``T = 1 + 4k`` (frame 0 starts the stream); with one ``T = 4k``, k >= 1.
        Returns ``mu, logvar`` ``(B, z, k (+1), H/8, W/8)`` float32 and the new cache.
        """
        mu, logvar, slots = self._encode_slots(
            frames, None if cache is None else list(cache.tensors))
        return mu, logvar, FeatureCache(tuple(slots))

    def _encode_slots(
        self, frames: Tensor, slots: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``encode_step`` on a cache slot list that it consumes (``ivvae.model.network``):
        whoever passes its only reference to the old cache frees it slot by slot."""
        t = frames.shape[2]
        x = frames.to(self.param_dtype)
        outs: list[Tensor] = []
        with self._compute(self.encode_dtype):
            if slots is None:
                if (t - 1) % TIME_COMPRESSION:
                    raise ValueError(f"a stream starts with 1 + 4k frames, got {t}")
                e0, slots = self.encoder(x[:, :, :1], [], True)
                outs.append(e0)
                x = x[:, :, 1:]
            elif t == 0 or t % TIME_COMPRESSION:
                raise ValueError(f"a stream continues with 4k frames (k >= 1), got {t}")
            if x.shape[2]:
                e, slots = self.encoder(x, slots, False)
                outs.append(e)
            e_all = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
            mu, logvar = self._moments(e_all)
        return mu, logvar, slots

    def decode_step(
        self, latent: Tensor, cache: FeatureCache | None
    ) -> tuple[Tensor, FeatureCache]:
        """One streaming decoder step.

        ``latent``: ``(B, z, n, h, w)``. Without a cache the first latent frame starts the
        stream. Returns ``video`` ``(B, 3, T, 8h, 8w)`` float32 (not clamped), with
        ``T = 1 + 4(n-1)`` at the start and ``4n`` later, and the new cache.
        """
        video, slots = self._decode_slots(latent, None if cache is None else list(cache.tensors))
        return video, FeatureCache(tuple(slots))

    def _decode_slots(
        self, latent: Tensor, slots: list[Tensor] | None
    ) -> tuple[Tensor, list[Tensor]]:
        """``decode_step`` on a cache slot list that it consumes (see ``_encode_slots``)."""
        cfg = self.cfg
        if latent.dim() != 5 or latent.shape[1] != cfg.z_dim or latent.shape[2] < 1:
            raise ValueError(
                f"latent must be (B, {cfg.z_dim}, n>=1, h, w), got {tuple(latent.shape)}"
            )
        u = from_latent(latent.to(self.param_dtype), cfg.scale_factor, cfg.shift_factor)
        outs: list[Tensor] = []
        with self._compute(self.decode_dtype):
            d = self.post_quant_conv(u, None)  # (B, z, n, h, w): [2D k || 3D k]
            if slots is None:
                o0, slots = self.decoder(d[:, :, :1], [], True)
                outs.append(o0[:, 0:3])  # frame 0: keyframe branch only
                d = d[:, :, 1:]
            n = d.shape[2]
            if n:
                o, slots = self.decoder(d, slots, False)  # (B, 6, 4n, H, W)
                b, _, _, hh, ww = o.shape
                o = o.reshape(b, 6, n, TIME_COMPRESSION, hh, ww)
                # First frame of each group from the keyframe branch, the other three from
                # the temporal branch (used directly as pixels, not as a residual).
                frames = torch.cat([o[:, 0:3, :, :1], o[:, 3:6, :, 1:]], dim=3)
                outs.append(frames.reshape(b, 3, n * TIME_COMPRESSION, hh, ww))
            video = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return video.float().contiguous(), slots

    # -- whole-video API -------------------------------------------------------------------

    def moments_to_latent(self, mu: Tensor, logvar: Tensor, *, sample: bool = False,
                          generator: torch.Generator | None = None) -> Tensor:
        s = mu
        if sample:
            eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
            s = mu + torch.exp(0.5 * logvar) * eps
        return to_latent(s, self.cfg.scale_factor, self.cfg.shift_factor)

    def encode_moments(self, video: Tensor, *, groups_per_step: int = 4) -> tuple[Tensor, Tensor]:
        """Posterior moments of ``video`` (B, 3, T, H, W) in [-1, 1]; see module docstring."""
        enc = StreamEncoder(self, groups_per_step=groups_per_step)
        mus, logvars = [], []
        for mu, logvar in (*enc.push(video), *enc.flush()):
            mus.append(mu)
            logvars.append(logvar)
        return torch.cat(mus, dim=2), torch.cat(logvars, dim=2)

    def encode(self, video: Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Latent of ``video``: ``scale * (mu - shift)``, or of a sample when ``sample``."""
        mu, logvar = self.encode_moments(video)
        return self.moments_to_latent(mu, logvar, sample=sample, generator=generator)

    def decode(self, latent: Tensor, *, num_frames: int | None = None,
               height: int | None = None, width: int | None = None,
               groups_per_step: int = 4) -> Tensor:
        """Video ``(B, 3, T, H, W)`` float32 (not clamped) from ``latent``.

        ``num_frames``, ``height``, ``width`` crop to the original size (defaults: the full
        padded size ``1 + 4(n-1)``, ``8h``, ``8w``).
        """
        _check_latent(latent, self.cfg.z_dim)
        n, h, w = latent.shape[2:]
        full_t = 1 + TIME_COMPRESSION * (n - 1)
        num_frames = full_t if num_frames is None else num_frames
        height = h * SPACE_COMPRESSION if height is None else height
        width = w * SPACE_COMPRESSION if width is None else width
        if latent_frames(num_frames) != n:
            raise ValueError(f"{num_frames} frames do not come from {n} latent frames")
        if latent_size(height) != h or latent_size(width) != w:
            raise ValueError(f"a {height}x{width} frame does not come from a {h}x{w} latent")
        # Each step's frames go straight into the output: the whole video exists once.
        out = torch.empty(latent.shape[0], 3, num_frames, height, width,
                          device=latent.device)
        t = 0
        for video in _decode_chunks(self, latent, groups_per_step):
            take = min(video.shape[2], num_frames - t)
            out[:, :, t : t + take] = video[:, :, :take, :height, :width]
            t += take
        return out


def _decode_chunks(model: IVVAE, latent: Tensor, groups_per_step: int) -> Iterator[Tensor]:
    """Video of each decoder step in order; the step's cache is the only reference to it."""
    slots: list[Tensor] | None = None
    start = 0
    n = latent.shape[2]
    while start < n:
        step = 1 + groups_per_step if slots is None else groups_per_step
        video, slots = model._decode_slots(latent[:, :, start : start + step], slots)
        start += step
        yield video


class StreamEncoder:
    """Push frames in any chunk sizes; get latent moments as soon as groups complete.

    Frames may have any H, W, the same in every push (padded per step, so chunking never
    changes results and a whole video is never copied). Call ``flush()`` at the end: it
    pads the last partial group by repeating the last frame, and ends the stream. Memory is
    bounded by one step (``groups_per_step`` groups) plus the feature cache.
    """

    def __init__(self, model: IVVAE, *, groups_per_step: int = 4) -> None:
        if groups_per_step < 1:
            raise ValueError("groups_per_step must be >= 1")
        self.model = model
        self.groups_per_step = groups_per_step
        self._slots: list[Tensor] | None = None  # the feature cache, consumed by each step
        self._pending: list[Tensor] = []
        self._pending_frames = 0
        self._last: Tensor | None = None
        self._first_shape: tuple[int, ...] | None = None
        self._flushed = False
        self.frames_in = 0

    def push(self, video: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``video`` (B, 3, t, H, W) in [-1, 1], t >= 0, with the B, H and W of the first
        push. Returns completed (mu, logvar)."""
        if self._flushed:
            # flush() padded the last group: frames after it would follow the padding.
            raise RuntimeError("this StreamEncoder was flushed: start a new one for the "
                               "next video")
        _check_video(video)
        shape = tuple(video.shape)
        if self._first_shape is not None and (
                shape[:2] + shape[3:] != self._first_shape[:2] + self._first_shape[3:]):
            raise ValueError(
                f"this push's frames are {shape} but the first push's were "
                f"{self._first_shape}: every push of a stream keeps the batch size B and "
                "the frame size H, W of (B, 3, t, H, W); only t may change")
        if video.shape[2] == 0:
            return []
        self._first_shape = self._first_shape or shape
        self._last = video[:, :, -1:]
        self._pending.append(video)
        self._pending_frames += video.shape[2]
        self.frames_in += video.shape[2]
        return self._drain()

    def flush(self) -> list[tuple[Tensor, Tensor]]:
        """Finish the stream: pad the last group with repeats of the last frame."""
        if self._last is None:
            raise ValueError("no frames were pushed")
        self._flushed = True
        need = (-(self._pending_frames - (1 if self._slots is None else 0))) % TIME_COMPRESSION
        if need:
            self._pending.append(self._last.expand(-1, -1, need, -1, -1))
            self._pending_frames += need
        return self._drain()

    def _drain(self) -> list[tuple[Tensor, Tensor]]:
        # Latent frame 0 is complete as soon as video frame 0 is here; later latent frames
        # when their group of 4 is. Up to ``groups_per_step`` groups go in one step.
        out: list[tuple[Tensor, Tensor]] = []
        while True:
            head = 1 if self._slots is None else 0
            if self._pending_frames < head:
                break
            groups = min((self._pending_frames - head) // TIME_COMPRESSION, self.groups_per_step)
            if head == 0 and groups == 0:
                break
            frames = pad_space(self._take(head + TIME_COMPRESSION * groups))
            mu, logvar, self._slots = self.model._encode_slots(frames, self._slots)
            out.append((mu, logvar))
        return out

    def _take(self, n: int) -> Tensor:
        """The next ``n`` pending frames (a view when they come from one push)."""
        parts = self._pending  # all of one shape but t: push() checks
        buf = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        taken, rest = buf[:, :, :n], buf[:, :, n:]
        self._pending = [rest] if rest.shape[2] else []
        self._pending_frames = rest.shape[2]
        return taken


class StreamDecoder:
    """Push latent frames; get video frames per latent frame (1 for the first, then 4)."""

    def __init__(self, model: IVVAE) -> None:
        self.model = model
        self.cache: FeatureCache | None = None

    def push(self, latent: Tensor) -> Tensor:
        """``latent`` (B, z, n, h, w) -> video (B, 3, T, 8h, 8w) float32, not cropped."""
        _check_latent(latent, self.model.cfg.z_dim)
        video, self.cache = self.model.decode_step(latent, self.cache)
        return video
