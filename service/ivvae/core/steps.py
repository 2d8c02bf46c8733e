"""The step protocol and the one step engine that runs it.

A video streams through the encoder (or decoder) as steps: the first step takes frame 0
(latent frame 0), each later step ``4k`` frames (``k`` latent frames) and the feature cache
the previous step returned. :class:`Steps` is that protocol for one direction, batched
over independent videos; it is implemented by the eager model
(``ivvae.model.steps.EagerSteps``) and by the exported artifacts
(``ivvae.model.artifacts.TorchScriptSteps`` / ``OnnxSteps``).

:class:`SequenceTable` is the engine: it holds one feature cache per sequence (one video,
keyed by a correlation id), checks each request on its own, runs the valid ones grouped by
(first or next, input shape) as one batch each, and stores each sequence's new cache. The
local backend runs it in-process over eager steps; the Triton python models run it over the
exported artifacts. One failure policy for both: a request that is wrong fails alone
before anything runs; when a batch fails, each member is retried alone, so only the member
that fails on its own fails.

Array contracts (numpy; batch = independent videos):

* encoder input ``(B, T, H, W, 3)`` uint8, H and W multiples of 8, ``T = 1`` first, ``4k``
  next; outputs ``mu, logvar`` float32 ``(B, z, 1 or k, H/8, W/8)``.
* decoder input ``(B, z, n, h, w)`` float32, ``n = 1`` first; output ``frames``
  ``(B, 1 or 4n, 8h, 8w, 3)`` in the step's ``frames_dtype``: ``uint8`` (rounded and
  clamped, what video files hold; the default) or ``float32`` (the decoder's own values,
  about [-1, 1] and not clamped, for callers that compare with or train against the model).
  One layout for both, so everything downstream crops and trims frames the same way.
"""

from __future__ import annotations

import abc
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from .geometry import GROUP, SPACE_COMPRESSION

log = logging.getLogger("ivvae.steps")

Direction = Literal["encoder", "decoder"]
Cache = list[Any]  # per slot: a torch tensor or a numpy array, batch first
FramesDtype = Literal["uint8", "float32"]
FRAMES_DTYPES: tuple[FramesDtype, ...] = get_args(FramesDtype)


class Steps(abc.ABC):
    """One direction's step functions over a batch of independent streams."""

    direction: Direction
    z_dim: int

    @abc.abstractmethod
    def first(self, x: np.ndarray, frames_dtype: FramesDtype = "uint8"
              ) -> tuple[list[np.ndarray], Cache]:
        """The first step of ``B`` streams: (outputs, the streams' cache).
        ``frames_dtype``: the decoder's frames (the encoder has only float32 moments)."""

    @abc.abstractmethod
    def next(self, x: np.ndarray, cache: Cache, frames_dtype: FramesDtype = "uint8"
             ) -> tuple[list[np.ndarray], Cache]:
        """A later step of ``B`` streams with their stacked cache: (outputs, new cache)."""

    @abc.abstractmethod
    def concat(self, caches: Sequence[Cache]) -> Cache:
        """Caches of several streams stacked along the batch dimension."""

    @abc.abstractmethod
    def split(self, cache: Cache, n: int) -> list[Cache]:
        """Inverse of ``concat`` for ``n`` streams of batch 1 (copies, not views)."""


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request is wrong -> INVALID_ARGUMENT / 4xx
    LOST = "lost"  # the sequence's state is gone -> UNAVAILABLE / 503
    INTERNAL = "internal"  # the step failed -> INTERNAL / 500


@dataclass
class StepRequest:
    corrid: int
    start: bool = False
    end: bool = False
    release: bool = False  # free the sequence's state; no step
    array: np.ndarray | None = None  # the data input, batch dimension 1
    frames_dtype: FramesDtype = "uint8"  # of the decoder's frames


@dataclass
class StepResult:
    outputs: list[np.ndarray] = field(default_factory=list)  # batch dimension 1
    error: str = ""
    kind: ErrorKind | None = None

    @classmethod
    def failed(cls, kind: ErrorKind, message: str) -> StepResult:
        return cls(error=message, kind=kind)


@dataclass
class _State:
    cache: Cache
    size: tuple[int, int]  # spatial size of the data input: (H, W) frames or (h, w) latents
    last_step: float


def input_size(direction: Direction, x: np.ndarray) -> tuple[int, int]:
    """Spatial size of a step input: ``(H, W)`` of frames or ``(h, w)`` of a latent."""
    return (int(x.shape[2]), int(x.shape[3])) if direction == "encoder" else (
        int(x.shape[3]), int(x.shape[4]))


class SequenceTable:
    """Per-sequence caches of one direction, stepped in batches. Thread-safe.

    A sequence's state goes away when it ends (``end``, or a ``release`` request), or after
    ``ttl_s`` seconds without a step.
    """

    def __init__(self, steps: Steps, *, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[str, int, float], None] | None = None) -> None:
        """``on_batch(step, size, seconds)`` is told of each batch that ran (``step``:
        ``first`` or ``next``)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.steps = steps
        self.direction = steps.direction
        self.z_dim = steps.z_dim
        self.ttl_s = ttl_s
        self.clock = clock
        self.on_batch = on_batch
        self._states: dict[int, _State] = {}
        self._lock = threading.Lock()
        self.evicted = 0  # sequences dropped by the time-to-live, in all

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, corrid: int) -> bool:
        return corrid in self._states

    def release(self, corrid: int) -> None:
        with self._lock:
            self._states.pop(corrid, None)

    def evict_expired(self, keep: frozenset[int] = frozenset()) -> list[int]:
        """Drop sequences idle longer than the time-to-live (except ``keep``)."""
        with self._lock:
            return self._evict(self.clock(), keep)

    def _evict(self, now: float, keep: frozenset[int]) -> list[int]:
        expired = [c for c, s in self._states.items()
                   if now - s.last_step > self.ttl_s and c not in keep]
        for corrid in expired:
            del self._states[corrid]
        if expired:
            self.evicted += len(expired)
            log.info("evicted %d %s sequences idle for more than %g s: %s", len(expired),
                     self.direction, self.ttl_s, expired)
        return expired

    def execute(self, requests: Sequence[StepRequest]) -> list[StepResult]:
        """One result per request, in order."""
        results: list[StepResult | None] = [None] * len(requests)
        with self._lock:
            self._evict(self.clock(), frozenset(r.corrid for r in requests))
            # At most one request per sequence runs per round; should two arrive anyway,
            # they run in arrival order.
            pending = list(range(len(requests)))
            while pending:
                seen: set[int] = set()
                this_round: list[int] = []
                later: list[int] = []
                for i in pending:
                    (later if requests[i].corrid in seen else this_round).append(i)
                    seen.add(requests[i].corrid)
                self._round(requests, this_round, results)
                pending = later
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _round(self, requests: Sequence[StepRequest], indices: list[int],
               results: list[StepResult | None]) -> None:
        groups: dict[tuple[bool, tuple[int, ...], FramesDtype], list[int]] = {}
        for i in indices:
            r = requests[i]
            if r.release:
                self._states.pop(r.corrid, None)
                results[i] = StepResult()
                continue
            problem = self._check(r)
            if problem is not None:
                results[i] = problem
                continue
            assert r.array is not None
            groups.setdefault((r.start, tuple(r.array.shape), r.frames_dtype), []).append(i)
        for (first, _, _), members in groups.items():
            self._run(first, [requests[i] for i in members], members, results)

    def _check(self, r: StepRequest) -> StepResult | None:
        def invalid(message: str) -> StepResult:
            return StepResult.failed(ErrorKind.INVALID, f"sequence {r.corrid}: {message}")

        x = r.array
        if x is None:
            return invalid("the step has no input")
        if x.ndim != 5 or x.shape[0] != 1:
            return invalid(f"the input must have 5 dimensions with batch 1 (one video per "
                           f"request), got {x.shape}")
        m = SPACE_COMPRESSION
        if r.frames_dtype not in FRAMES_DTYPES:
            return invalid(f"frames_dtype must be one of {', '.join(FRAMES_DTYPES)}, got "
                           f"{r.frames_dtype!r}")
        if self.direction == "encoder":
            if r.frames_dtype != "uint8":
                return invalid("the encoder returns moments, not frames: frames_dtype is "
                               "for the decoder")
            t, h, w, c = x.shape[1:]
            if x.dtype != np.uint8:
                return invalid(f"frames must be uint8, got {x.dtype}")
            if c != 3 or h < m or w < m or h % m or w % m:
                return invalid(f"frames must be (1, T, H, W, 3) with H and W multiples of "
                               f"{m}, got {x.shape}")
            if r.start and t != 1:
                return invalid(f"the first step takes 1 frame, got {t}")
            if not r.start and (t == 0 or t % GROUP):
                return invalid(f"a step after the first takes a multiple of {GROUP} frames, "
                               f"got {t}")
        else:
            z, n, h, w = x.shape[1:]
            if z != self.z_dim:
                return invalid(f"latent has {z} channels, the model {self.z_dim}")
            if r.start and n != 1:
                return invalid(f"the first step takes 1 latent frame, got {n}")
            if n == 0 or h == 0 or w == 0:
                return invalid(f"empty latent {x.shape}")
            if not np.isfinite(x).all():
                return invalid("latent holds NaN or infinite values")
        if r.start:
            return None
        state = self._states.get(r.corrid)
        if state is None:
            return StepResult.failed(
                ErrorKind.LOST,
                f"sequence {r.corrid} has no state here: it was idle for more than "
                f"{self.ttl_s:g} s, or the model instance restarted; start it again",
            )
        size = input_size(self.direction, x)
        if state.size != size:
            return invalid(f"the size changed mid-sequence from {state.size} to {size}")
        return None

    def _run(self, first: bool, requests: list[StepRequest], indices: list[int],
             results: list[StepResult | None]) -> None:
        began = time.perf_counter()
        try:
            batch = self._step(first, requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("%s step of sequence %d failed", self.direction,
                              requests[0].corrid)
                results[indices[0]] = StepResult.failed(
                    ErrorKind.INTERNAL, f"{self.direction} step failed: {exc}")
                return
            log.warning("%s step of %d sequences failed (%s); retrying each alone",
                        self.direction, len(requests), exc)
            for r, i in zip(requests, indices, strict=True):
                self._run(first, [r], [i], results)
            return
        if self.on_batch is not None:
            self.on_batch("first" if first else "next", len(requests),
                          time.perf_counter() - began)
        outputs, caches = batch
        now = self.clock()
        for b, (r, i) in enumerate(zip(requests, indices, strict=True)):
            assert r.array is not None
            results[i] = StepResult(outputs=[out[b : b + 1] for out in outputs])
            if r.end:
                self._states.pop(r.corrid, None)
            else:
                self._states[r.corrid] = _State(caches[b], input_size(self.direction, r.array),
                                                now)

    def _step(self, first: bool, requests: list[StepRequest]
              ) -> tuple[list[np.ndarray], list[Cache]]:
        x = np.concatenate([r.array for r in requests if r.array is not None])
        dtype = requests[0].frames_dtype  # one per batch: it is part of the group key
        if first:
            outputs, cache = self.steps.first(x, dtype)
        else:
            cache = self.steps.concat([self._states[r.corrid].cache for r in requests])
            outputs, cache = self.steps.next(x, cache, dtype)
        return outputs, self.steps.split(cache, len(requests))
