"""The use cases, one way through: encode a video to a latent file, decode one to frames.

HTTP, gRPC and the CLI all call ``Pipeline``. It owns the order of things: limits, the
result cache, video decoding (PyAV, on worker threads), splitting into GCConv frame groups
(frame 0 alone, then ``groups_per_step`` groups of 4 per step), driving a backend session,
and building the latent file. Memory stays bounded: frames are decoded a step at a time and
only the (small) latent moments are kept; the size of a step comes from the memory budget
(``ivvae.memory``), and a request waits for its share of the budget before it runs.

Cache policy: entries are the posterior moments keyed by content hash, model, weights and
encode precision. Sampling and the output dtype are applied after the cache, so
deterministic and seeded-sample requests share an entry. An entry is written only after
the whole video encoded successfully.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from .backends.base import Backend, EncodeSession
from .cache import CachedMoments, Expected, ResultCache, cache_key
from .config import Settings
from .core import strict
from .core.geometry import (
    PADDING_POLICY,
    SPACE_COMPRESSION,
    TIME_COMPRESSION,
    FrameStepper,
    decode_plan,
    latent_frames,
    latent_size,
    moments_to_latent,
    pad_frames,
)
from .core.model_info import ModelInfo
from .core.names import PRECISIONS
from .core.steps import FRAMES_DTYPES, FramesDtype
from .core.tasks import aclose_all, finish, within
from .errors import (
    CorruptMedia,
    DeadlineExceeded,
    InvalidInput,
    InvalidLatent,
    Overloaded,
    TooLarge,
    UnknownModel,
)
from .latents import (
    ENCODE_PRECISION_KEY,
    SAR_KEY,
    LatentInfo,
    decode_latent_file,
    encode_latent_file,
    served_model_for,
)
from .memory import BODY_SHARE, MB, HeldBodies, MemoryBudget, Plan, default_budget_mb, plan_steps
from .metrics import Metrics
from .video import (
    DEFAULT_FPS,
    Preprocess,
    VideoLimits,
    VideoReader,
    exact_rate,
    open_frames,
    open_video,
)
from .wire import DecodeTarget

log = logging.getLogger("ivvae.pipeline")

# v2: an anamorphic clip's entry holds its SAR, and a resized one is no longer squeezed.
# v3: start_frame with fps starts there (it was ignored), and fps windows round as the clip.
MOMENTS_VERSION = "moments-v3"


@dataclass(frozen=True)
class EncodeOptions:
    model: str = ""  # empty: the default model
    sample: bool = False  # False: the posterior mean (deterministic)
    seed: int | None = None  # for sample; drawn and recorded when absent
    dtype: str = "float32"  # one of PRECISIONS
    include_moments: bool = False  # also store mu and logvar in the file
    preprocess: Preprocess = field(default_factory=Preprocess)  # resize, crop, window, rate

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise InvalidInput(f"dtype must be one of {list(PRECISIONS)}, got {self.dtype!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput("seed must be in [0, 2**63)")
        if self.seed is not None and not self.sample:
            raise InvalidInput("seed is only meaningful with sample=true")

    def for_item(self, index: int) -> EncodeOptions:
        """The options of item ``index`` of a batch sent in one request: a seeded sample
        draws its own noise for each item (one seed for all would add the same noise to
        every video, as no generator over a batch does). Item 0 keeps the seed, so a batch
        of one is the request alone; every latent records the seed it was drawn with."""
        if index == 0 or self.seed is None:
            return self
        digest = hashlib.sha256(f"{self.seed}|batch item {index}".encode()).digest()
        return replace(self, seed=int.from_bytes(digest[:8], "big") >> 1)


@dataclass(frozen=True)
class EncodeResult:
    data: bytes  # the latent .safetensors file
    info: LatentInfo
    cache_hit: bool
    seconds: float

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.info.latent_shape


@dataclass(frozen=True)
class FramesUpload:
    """Frames sent as a tensor instead of a file: ``(T, H, W, 3)`` uint8 RGB at ``fps``."""

    frames: np.ndarray
    fps: float = DEFAULT_FPS


Source = bytes | Path | FramesUpload


def sha256_of(source: Source) -> str:
    h = hashlib.sha256()
    if isinstance(source, FramesUpload):
        # The tensor's own identity: its layout and rate as well as its bytes.
        h.update(f"frames|{list(source.frames.shape)}|{source.frames.dtype}|"
                 f"{_fps_string(source.fps)}|".encode())
        h.update(np.ascontiguousarray(source.frames).tobytes())
    elif isinstance(source, bytes):
        h.update(source)
    else:
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Pipeline:
    def __init__(self, settings: Settings, backend: Backend, cache: ResultCache,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.cache = cache
        self.metrics = metrics
        self._slots = asyncio.Semaphore(settings.max_concurrent_requests)
        self.budget_mb = settings.memory_budget_mb or default_budget_mb()
        self._budget: MemoryBudget | None = None
        self._bodies: HeldBodies | None = None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of ``max_concurrent_requests``, waited for as long as a share of the memory
        budget (``admission_timeout_s``), then 503: a queue without a bound kept requests
        waiting many request timeouts behind a slow backend."""
        s = self.settings
        try:
            await within(self._slots.acquire(), s.admission_timeout_s)
        except TimeoutError:
            raise Overloaded(f"{s.max_concurrent_requests} requests were in flight for "
                             f"{s.admission_timeout_s:g} s; retry later",
                             retry_after_s=1.0) from None
        try:
            yield
        finally:
            self._slots.release()

    # -- memory ----------------------------------------------------------------------------

    def start_budget(self, baseline_bytes: int) -> MemoryBudget:
        """Requests share the budget less ``baseline_bytes`` (the process at rest: weights,
        runtime, the in-memory cache at its cap): ``BODY_SHARE`` of it for bodies held in
        memory (``bodies``), the rest for model steps and held answers. ``Service.start``
        measures the baseline."""
        share = self.budget_mb * MB - baseline_bytes
        self._bodies = HeldBodies(int(share * BODY_SHARE))
        self._budget = MemoryBudget(share - self._bodies.capacity,
                                    timeout_s=self.settings.admission_timeout_s,
                                    budget_mb=self.budget_mb)
        log.info("memory budget %d MB: %d MB for requests, %d MB of it for request bodies",
                 self.budget_mb, share // MB, self._bodies.capacity // MB)
        if self._bodies.capacity < self.settings.max_upload_bytes:
            log.warning("request bodies held in memory may take %d MB together, less than "
                        "one upload of IVVAE_MAX_UPLOAD_BYTES (%d MB): a /decode, /frames, "
                        "raw tensor or gRPC upload larger than that is refused (413); raise "
                        "IVVAE_MEMORY_BUDGET_MB or lower IVVAE_MAX_UPLOAD_BYTES",
                        self._bodies.capacity // MB, self.settings.max_upload_bytes // MB)
        return self._budget

    @property
    def budget(self) -> MemoryBudget:
        if self._budget is None:  # used without Service.start (a bare pipeline): no baseline
            self.start_budget(0)
        assert self._budget is not None
        return self._budget

    @property
    def bodies(self) -> HeldBodies:
        """Request bodies held in memory (transports count them as they arrive); started
        with the budget."""
        _ = self.budget
        assert self._bodies is not None
        return self._bodies

    def plan(self, model: ModelInfo, direction: str, width: int, height: int, *,
             still: bool) -> Plan:
        """Steps of a request at ``width x height`` that fit the budget, or TooLarge."""
        return plan_steps(self.backend.step_cost(model.name, direction),  # type: ignore[arg-type]
                          width=width, height=height, still=still,
                          max_groups=self.settings.groups_per_step,
                          available=self.budget.capacity, budget_mb=self.budget_mb)

    # -- models ----------------------------------------------------------------------------

    def model(self, name: str = "") -> ModelInfo:
        name = name or self.backend.default_model
        models = self.backend.models
        if name not in models:
            raise UnknownModel(f"unknown model {name!r}; served: {sorted(models)}")
        return models[name]

    # -- encode ----------------------------------------------------------------------------

    async def encode(self, source: Source, options: EncodeOptions = EncodeOptions(),
                     *, on_frames: Callable[[int], None] | None = None) -> EncodeResult:
        """Encode a video (bytes of a file, a path, or frames) to a latent file, after the
        preprocessing ``options.preprocess`` asks for.

        ``on_frames(n)`` is called as frames are consumed (progress bars).
        """
        async with self._slot():
            try:
                return await within(self._encode(source, options, on_frames),
                                              self.settings.request_timeout_s)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"encoding took longer than {self.settings.request_timeout_s:g} s"
                ) from None

    async def _encode(self, source: Source, options: EncodeOptions,
                      on_frames: Callable[[int], None] | None) -> EncodeResult:
        start = time.perf_counter()
        model = self.model(options.model)
        content = await asyncio.to_thread(sha256_of, source)
        preprocess = options.preprocess.canonical()
        key = cache_key(content, model.name, model.weights_sha256,
                        self.settings.encode_precision, MOMENTS_VERSION, preprocess)
        cached = await self.cache.get(
            key, Expected(model.z_dim, model.scale_factor, model.shift_factor))
        self.metrics.cache.labels("hit" if cached else "miss").inc()
        if cached is None:
            mu, logvar, meta = await self._encode_video(source, model, options.preprocess,
                                                        on_frames)
            stored = await self.cache.put(key, CachedMoments(mu, logvar, meta))
            self.metrics.cache.labels("write" if stored else "write_skipped").inc()
            seconds = time.perf_counter() - start
            frames = int(meta["num_frames"])
            self.metrics.frames.labels("encode").inc(frames)
            self.metrics.frames_per_second.labels("encode").set(frames / max(seconds, 1e-9))
        else:
            mu, logvar, meta = cached.mu, cached.logvar, dict(cached.meta)
        seed = options.seed
        if options.sample and seed is None:
            seed = secrets.randbits(63)
        latent = moments_to_latent(mu, logvar, model.scale_factor, model.shift_factor,
                                   sample=options.sample, seed=seed)
        info = LatentInfo(
            model_name=model.name, weights_sha256=model.weights_sha256,
            scale_factor=model.scale_factor, shift_factor=model.shift_factor,
            z_dim=model.z_dim, num_frames=int(meta["num_frames"]), height=int(meta["height"]),
            width=int(meta["width"]), fps=Fraction(meta["fps"]), padding_policy=PADDING_POLICY,
            dtype=options.dtype, content_sha256=content,
            mode="sample" if options.sample else "mean", seed=seed,
            # Sorted: the cache may hand back its metadata in another order, and a hit must
            # give the same bytes as the miss.
            extra={ENCODE_PRECISION_KEY: self.settings.encode_precision} | {
                ("" if k.startswith("preprocess") or k == SAR_KEY else "source_") + k: v
                for k, v in sorted(meta.items())
                if k not in ("num_frames", "height", "width", "fps")},
        )
        data = encode_latent_file(latent, info, mu=mu if options.include_moments else None,
                                  logvar=logvar if options.include_moments else None)
        return EncodeResult(data, info, cached is not None, time.perf_counter() - start)

    async def _encode_video(self, source: Source, model: ModelInfo, preprocess: Preprocess,
                            on_frames: Callable[[int], None] | None = None,
                            ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        s = self.settings
        limits = VideoLimits(max_frames=s.max_frames, max_pixels=s.max_pixels,
                             max_source_pixels=s.max_source_pixels,
                             max_source_seconds=s.max_source_seconds)
        if isinstance(source, FramesUpload):
            reader = await asyncio.to_thread(open_frames, source.frames, fps=source.fps,
                                             limits=limits, preprocess=preprocess)
        else:
            reader = await asyncio.to_thread(open_video, source, limits=limits,
                                             preprocess=preprocess)
        try:
            # The model sees the frames after preprocessing: that size decides the cost.
            steps, single = self._encode_plan(model, reader.plan.width, reader.plan.height,
                                              reader.info.num_frames)
        except BaseException:
            await finish(asyncio.to_thread(reader.close))
            raise
        closes_reader = False  # the session's clean-up has taken the reader over
        try:
            async with self.budget.reserve(steps.reserve_bytes):
                stepper = FrameStepper(steps.groups_per_step)
                session = self.backend.encode_session(model.name)
                self.metrics.active_sessions.labels("encode").inc()
                mus: list[np.ndarray] = []
                logvars: list[np.ndarray] = []

                async def run(steps: list[tuple[bool, np.ndarray]]) -> None:
                    for first, frames in steps:
                        step = session.first if first else session.next
                        mu, logvar = await step(pad_frames(frames))
                        mus.append(mu)
                        logvars.append(logvar)

                # The chunk being decoded: a cancelled await leaves its thread running, and the
                # reader must not be closed under it.
                decoding: asyncio.Future[np.ndarray | None] | None = None

                async def next_chunk() -> np.ndarray | None:
                    nonlocal decoding
                    decoding = asyncio.ensure_future(asyncio.to_thread(_next_chunk, chunks))
                    # Shielded: cancelling the task would not stop the thread, only hide it.
                    return await asyncio.shield(decoding)

                closes_reader = True
                try:
                    chunks = reader.iter_frames(stepper.step)
                    while (chunk := await next_chunk()) is not None:
                        if single is not None and stepper.count + len(chunk) > 1:
                            raise single  # declared a picture, holds more: too big as a video
                        if on_frames is not None:
                            on_frames(len(chunk))
                        await run(stepper.push(chunk))
                    if stepper.count == 0:
                        raise CorruptMedia("the video has no decodable frames")
                    await run(stepper.flush())
                finally:
                    await finish(self._ended("encode", _close_both(session, reader, decoding)))
        except BaseException:
            if not closes_reader:  # cancelled while waiting for the budget
                await finish(asyncio.to_thread(reader.close))
            raise
        meta = _latent_meta(reader, stepper.count, preprocess)
        return np.concatenate(mus, axis=2), np.concatenate(logvars, axis=2), meta

    def _encode_plan(self, model: ModelInfo, width: int, height: int,
                     declared_frames: int | None) -> tuple[Plan, TooLarge | None]:
        """The plan for a video, and, for a picture only its one frame fits, the error to
        raise if it turns out to hold more frames than it declared."""
        try:
            return self.plan(model, "encoder", width, height, still=False), None
        except TooLarge as as_video:
            if declared_frames != 1:
                raise
            return self.plan(model, "encoder", width, height, still=True), as_video

    # -- decode ----------------------------------------------------------------------------

    def parse_latent(self, data: bytes) -> tuple[np.ndarray, LatentInfo, ModelInfo]:
        """Validate an uploaded latent file against the served models."""
        latent, info = decode_latent_file(data)
        model = served_model_for(info, self.backend.models)
        # Found by its weights under another name: answers name the model that decodes it.
        info = replace(info, model_name=model.name)
        frames = info.num_frames * info.height * info.width
        if info.num_frames > self.settings.max_frames or frames > (
                self.settings.max_frames * self.settings.max_pixels):
            raise TooLarge(f"decoding {info.num_frames} frames of {info.width}x{info.height} "
                           f"exceeds the server's limits (max_frames "
                           f"{self.settings.max_frames}, max_pixels {self.settings.max_pixels})")
        if info.height * info.width > self.settings.max_pixels:
            raise TooLarge(f"a {info.width}x{info.height} frame exceeds max_pixels "
                           f"({self.settings.max_pixels})")
        return latent, info, model

    def parse_bare_latent(self, latent: np.ndarray, dtype: str, target: DecodeTarget,
                          ) -> tuple[np.ndarray, LatentInfo, ModelInfo]:
        """Validate a bare latent ``(B, z, t, h, w)`` float32 (what a sampler generates, in
        ``target.latent_space``) against a served model and the limits: the latent in the
        model's scaled space and a ``LatentInfo`` describing one item."""
        model = self.model(target.model)
        b, z, t, h, w = latent.shape
        if 0 in latent.shape:
            raise InvalidLatent(f"the latent {tuple(latent.shape)} is empty: shape is "
                                "(B, z, t, h, w), each at least 1")
        if z != model.z_dim:
            hint = ""
            if b == 1 and t == model.z_dim:  # most likely images (B, z, h, w) sent as 4-D
                hint = ("; a 4-D latent is one video (z, t, h, w): send image latents "
                        "(B, z, h, w) as (B, z, 1, h, w)")
            raise InvalidLatent(f"the latent has {z} channels but model {model.name!r} has "
                                f"z_dim {model.z_dim}: shape is (B, z, t, h, w){hint}")
        num_frames = target.num_frames or 1 + TIME_COMPRESSION * (t - 1)
        height = target.height or h * SPACE_COMPRESSION
        width = target.width or w * SPACE_COMPRESSION
        if latent_frames(num_frames) != t:
            raise InvalidInput(f"num_frames={num_frames} does not come from {t} latent frames "
                               f"(it must be in [{TIME_COMPRESSION * (t - 2) + 2 if t > 1 else 1}"
                               f", {1 + TIME_COMPRESSION * (t - 1)}])")
        if latent_size(height) != h or latent_size(width) != w:
            raise InvalidInput(f"a {width}x{height} frame does not come from a {w}x{h} latent "
                               f"(width in [{SPACE_COMPRESSION * (w - 1) + 1}, "
                               f"{SPACE_COMPRESSION * w}], height in "
                               f"[{SPACE_COMPRESSION * (h - 1) + 1}, {SPACE_COMPRESSION * h}])")
        s = self.settings
        if height * width > s.max_pixels:
            raise TooLarge(f"a {width}x{height} frame exceeds max_pixels ({s.max_pixels})")
        if b * num_frames > s.max_frames:
            raise TooLarge(f"decoding {b} x {num_frames} frames exceeds the server's "
                                f"limit of {s.max_frames}")
        scaled = target.to_model_space(latent, model.scale_factor, model.shift_factor)
        if scaled is not latent and not np.isfinite(scaled).all():
            raise InvalidLatent("parameters 'scaling_factor' / 'shift_factor' make the latent "
                                "non-finite in the model's space")
        info = LatentInfo(
            model_name=model.name, weights_sha256=model.weights_sha256,
            scale_factor=model.scale_factor, shift_factor=model.shift_factor,
            z_dim=model.z_dim, num_frames=num_frames, height=height, width=width,
            fps=target.fps, padding_policy=PADDING_POLICY, dtype=dtype,
            content_sha256="", mode="external",
        )
        return scaled, info, model

    async def decode_bare(self, latent: np.ndarray, dtype: str, target: DecodeTarget,
                          frames_dtype: FramesDtype = "uint8",
                          ) -> tuple[LatentInfo, list[AsyncIterator[np.ndarray]]]:
        """A bare latent batch: ``info`` of one item and, per item in order, an iterator of
        its frames ``(n, H, W, 3)`` (see ``decode_frames``)."""
        _check_frames_dtype(frames_dtype)
        scaled, info, model = self.parse_bare_latent(latent, dtype, target)
        plan = self.plan(model, "decoder", info.width, info.height,
                         still=scaled.shape[2] == 1)
        # Items are decoded one after the other: each takes its share of the budget when
        # it starts, not all of them up front.
        return info, [self._reserving(
            self._decode_iter(np.ascontiguousarray(scaled[i : i + 1]), info, model, plan,
                              frames_dtype),
            plan) for i in range(scaled.shape[0])]

    async def _reserving(self, frames: AsyncIterator[np.ndarray], plan: Plan
                         ) -> AsyncIterator[np.ndarray]:
        async with self.budget.reserve(plan.reserve_bytes):
            try:
                async for part in frames:
                    yield part
            finally:
                await finish(aclose_all(frames))

    async def decode_frames(self, data: bytes, frames_dtype: FramesDtype = "uint8",
                            ) -> tuple[LatentInfo, AsyncIterator[np.ndarray]]:
        """Parse a latent file; the iterator yields its frames, ``(n, H, W, 3)``, in order,
        cropped to the original frame count and size: uint8, or with ``frames_dtype``
        float32 the decoder's own values (about [-1, 1], not clamped: what the uint8 frames
        are rounded from, ``round((x + 1) * 127.5)``)."""
        _check_frames_dtype(frames_dtype)
        latent, info, model = self.parse_latent(data)
        plan = self.plan(model, "decoder", info.width, info.height,
                         still=latent.shape[2] == 1)
        release = await self.budget.acquire(plan.reserve_bytes)
        return info, _Holding(self._decode_iter(latent, info, model, plan, frames_dtype),
                              release)

    async def _ended(self, kind: str, close: Awaitable[None]) -> None:
        """``close`` a session, then count it as ended: the gauge stays up until what the
        session holds (its feature cache behind a running batch) is freed."""
        try:
            await close
        finally:
            self.metrics.active_sessions.labels(kind).dec()

    async def _decode_iter(self, latent: np.ndarray, info: LatentInfo, model: ModelInfo,
                           plan: Plan, frames_dtype: FramesDtype = "uint8",
                           ) -> AsyncIterator[np.ndarray]:
        start = time.perf_counter()
        async with self._slot():
            deadline = start + self.settings.request_timeout_s
            session = self.backend.decode_session(model.name, frames_dtype)
            self.metrics.active_sessions.labels("decode").inc()
            produced = 0
            try:
                for a, b in decode_plan(latent.shape[2], plan.groups_per_step):
                    part = np.ascontiguousarray(latent[:, :, a:b])
                    step = session.first(part) if a == 0 else session.next(part)
                    remaining = deadline - time.perf_counter()
                    try:
                        frames = await within(step, max(remaining, 0.001))
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"decoding took longer than {self.settings.request_timeout_s:g} s"
                        ) from None
                    keep = min(frames.shape[1], info.num_frames - produced)
                    produced += keep
                    yield frames[0, :keep, : info.height, : info.width]
            finally:
                await finish(self._ended("decode", session.close()))
        self.metrics.frames.labels("decode").inc(produced)
        self.metrics.frames_per_second.labels("decode").set(
            produced / max(time.perf_counter() - start, 1e-9))


class _Holding:
    """An async iterator that holds a budget reservation until it is exhausted, fails, is
    closed, or is collected (a transport that drops it must not leak the budget)."""

    def __init__(self, inner: AsyncIterator[np.ndarray], release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release
        self._loop = asyncio.get_running_loop()

    def __aiter__(self) -> _Holding:
        return self

    async def __anext__(self) -> np.ndarray:
        try:
            return await anext(self._inner)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await finish(aclose_all(self._inner))
        finally:
            if release is not None:
                release()

    def __del__(self) -> None:
        if self._release is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._release)


def _check_frames_dtype(frames_dtype: str) -> None:
    if frames_dtype not in FRAMES_DTYPES:
        raise InvalidInput(f"frames_dtype must be one of {', '.join(FRAMES_DTYPES)}, got "
                           f"{frames_dtype!r}")


async def _close_both(session: EncodeSession, reader: VideoReader,
                      decoding: asyncio.Future[np.ndarray | None] | None) -> None:
    try:
        await session.close()
    finally:
        if decoding is not None:
            await asyncio.wait([decoding])
            if not decoding.cancelled():
                decoding.exception()  # the caller saw it, or has gone: retrieved either way
        await asyncio.to_thread(reader.close)


def _next_chunk(chunks: Iterator[np.ndarray]) -> np.ndarray | None:
    return next(chunks, None)


def _latent_meta(reader: VideoReader, count: int,
                 preprocess: Preprocess) -> dict[str, str]:
    """What an encoded video's latent file says of it: the frames the model saw (``count``
    of them, after preprocessing), the source's codec and orientation; with preprocessing,
    what was done to what, and which source frames the latent covers."""
    info, plan = reader.info, reader.plan
    meta = {
        "num_frames": str(count),
        "height": str(plan.height),
        "width": str(plan.width),
        "fps": _fps_string(float(plan.fps)),
        "codec": info.codec,
        "container": info.container,
        "rotation": str(info.rotation),
    }
    if plan.sample_aspect_ratio != 1:
        # Anamorphic frames kept at their stored size (a resize makes square pixels).
        meta[SAR_KEY] = strict.sample_aspect_ratio_text(plan.sample_aspect_ratio)
    if not preprocess.is_identity:
        # A latent says exactly how it was made: what was done, to what.
        meta.update({
            "preprocess": preprocess.canonical(),
            "preprocess_bucket": str(plan.bucket or ""),
            "preprocess_source_width": str(info.width),
            "preprocess_source_height": str(info.height),
            "preprocess_source_fps": _fps_string(info.fps),
            "preprocess_source_frames_declared": str(info.num_frames or ""),
            "preprocess_source_frames_decoded": str(reader.source_frames_read),
        })
        if info.sample_aspect_ratio != 1:
            # The upright source's pixel shape; the size above is its stored one.
            meta["preprocess_source_sample_aspect_ratio"] = (
                strict.sample_aspect_ratio_text(info.sample_aspect_ratio))
        if reader.first_used is not None and reader.last_used is not None:
            # Which source frames the latent covers (index in presentation order, and
            # seconds from the first frame): to line up captions or clips with it.
            meta.update({
                "preprocess_source_first_frame": str(reader.first_used[0]),
                "preprocess_source_last_frame": str(reader.last_used[0]),
                "preprocess_source_first_s": f"{reader.first_used[1]:.6f}",
                "preprocess_source_last_s": f"{reader.last_used[1]:.6f}",
            })
    return meta


def _fps_string(fps: float) -> str:
    rate = exact_rate(fps)
    return f"{rate.numerator}/{rate.denominator}"
