"""Feature caches per sequence and batched steps: the state machine of the Triton models.

The python models (``model_repository/*/1/model.py`` through ``ivvae.triton.python_model``)
turn Triton requests into :class:`StepRequest` objects and results back into responses;
everything else happens here, without Triton, so it is tested directly.

One :class:`SequenceTable` per model instance holds one feature cache per correlation id.
``execute`` checks each request on its own (a bad request fails alone), groups the valid
ones by (first or next step, input shape), runs each group as one batch through the
exported artifacts, and stores each sequence's new cache. A sequence's state goes away when
it ends (``END``, or the gateway's ``RELEASE``), or after ``ttl_s`` seconds without a step.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..model.artifacts import ArtifactSteps, Cache
from .contract import TENSORS

log = logging.getLogger("ivvae.triton.sequences")

FRAME_MULTIPLE = 8
GROUP = 4


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # the request is wrong -> INVALID_ARGUMENT
    LOST = "lost"  # the sequence's state is gone -> UNAVAILABLE
    INTERNAL = "internal"  # the step failed -> INTERNAL


@dataclass
class StepRequest:
    corrid: int
    start: bool = False
    end: bool = False
    release: bool = False
    array: np.ndarray | None = None  # the data input, batch dimension 1


@dataclass
class StepResult:
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
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


class SequenceTable:
    """Per-sequence caches of one direction, stepped in batches. Thread-safe."""

    def __init__(self, steps: ArtifactSteps, *, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.steps = steps
        self.direction = steps.direction
        self.z_dim = steps.manifest.z_dim
        self.ttl_s = ttl_s
        self.clock = clock
        self._input, self._outputs = TENSORS[self.direction]
        self._states: dict[int, _State] = {}
        self._lock = threading.Lock()
        self.evicted = 0  # sequences dropped by the time-to-live, in all

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, corrid: int) -> bool:
        return corrid in self._states

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
            # Triton sends at most one request per sequence at a time; should two arrive
            # anyway, they run in arrival order, one per round.
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
        groups: dict[tuple[bool, tuple[int, ...]], list[int]] = {}
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
            groups.setdefault((r.start, tuple(r.array.shape)), []).append(i)
        for (first, _), members in groups.items():
            self._run(first, [requests[i] for i in members], members, results)

    def _check(self, r: StepRequest) -> StepResult | None:
        def invalid(message: str) -> StepResult:
            return StepResult.failed(ErrorKind.INVALID, f"sequence {r.corrid}: {message}")

        x = r.array
        if x is None:
            return invalid(f"the input {self._input} is missing")
        if x.ndim != 5 or x.shape[0] != 1:
            return invalid(f"{self._input} must have 5 dimensions with batch 1 (one video "
                           f"per request), got {x.shape}")
        if self.direction == "encoder":
            t, h, w, c = x.shape[1:]
            if c != 3 or h < FRAME_MULTIPLE or w < FRAME_MULTIPLE or h % FRAME_MULTIPLE or (
                    w % FRAME_MULTIPLE):
                return invalid(f"frames must be (1, T, H, W, 3) with H and W multiples of "
                               f"{FRAME_MULTIPLE}, got {x.shape}")
            if r.start and t != 1:
                return invalid(f"the first step takes 1 frame, got {t}")
            if not r.start and (t == 0 or t % GROUP):
                return invalid(f"a step after the first takes a multiple of {GROUP} frames, "
                               f"got {t}")
            size = (h, w)
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
            size = (h, w)
        if r.start:
            return None
        state = self._states.get(r.corrid)
        if state is None:
            return StepResult.failed(
                ErrorKind.LOST,
                f"sequence {r.corrid} has no state in this model instance: it was idle for "
                f"more than {self.ttl_s:g} s, or the instance restarted; start it again",
            )
        if state.size != size:
            return invalid(f"the size changed mid-sequence from {state.size} to {size}")
        return None

    def _run(self, first: bool, requests: list[StepRequest], indices: list[int],
             results: list[StepResult | None]) -> None:
        x = np.concatenate([r.array for r in requests if r.array is not None])
        try:
            if first:
                outputs, cache = self.steps.first(x)
            else:
                cache = self.steps.concat([self._states[r.corrid].cache for r in requests])
                outputs, cache = self.steps.next(x, cache)
            caches = self.steps.split(cache, len(requests))
        except Exception as exc:  # the step failed: every request of the batch says so
            log.exception("%s step of %d sequences failed", self.direction, len(requests))
            for i in indices:
                results[i] = StepResult.failed(ErrorKind.INTERNAL,
                                               f"{self.direction} step failed: {exc}")
            return
        now = self.clock()
        size = (int(x.shape[-3]), int(x.shape[-2])) if self.direction == "encoder" else (
            int(x.shape[-2]), int(x.shape[-1]))
        for b, (r, i) in enumerate(zip(requests, indices, strict=True)):
            results[i] = StepResult(outputs={
                name: out[b : b + 1] for name, out in zip(self._outputs, outputs, strict=True)
            })
            if r.end:
                self._states.pop(r.corrid, None)
            else:
                self._states[r.corrid] = _State(caches[b], size, now)
