"""The memory budget (``IVVAE_MEMORY_BUDGET_MB``): how big a step may be, and who may run.

Why: a model step's peak memory grows with the pixels it holds (about 0.7 KB per pixel per
frame for the small bundled model, four times that for the official ``dim64`` ones), so a
1080p step of 16 frames needs gigabytes, and a few at once take the process down. The
budget bounds the whole process:

* **Cost.** :class:`StepCost` is the peak of one step as ``fixed + per_pixel_frame * frames
  * pixels``, measured per model and direction when the backend starts (the process's peak
  RSS, or CUDA's peak allocation, across a calibration step). Frames, decoder and encoder
  buffers around a step add :data:`IO_BYTES_PER_PIXEL_FRAME` and :data:`IO_BYTES_PER_PIXEL`.
* **Plan.** :func:`plan_steps` picks the largest ``groups_per_step`` (up to the configured
  one) whose step fits what one request may use; when not even one group of 4 frames fits,
  the request is refused before any work with :class:`~ivvae.errors.TooLarge` naming the
  limit and the frame size that would fit.
* **Admission.** :class:`MemoryBudget` hands out reservations of a plan's bytes; requests
  that do not fit next to those running wait in order, and past ``timeout_s`` are refused
  as :class:`~ivvae.errors.Overloaded` (503 with ``Retry-After``).
* **Bodies.** Request bodies held in memory take a share of the budget of their own
  (:class:`HeldBodies`): counted as they arrive, refused at once past it.
* **Give back.** After a large job, :func:`return_memory` asks the allocator to hand freed
  pages back to the OS (glibc keeps them otherwise: 2 GB after one 1080p job).
* **Allocator.** :func:`tune_allocator` (the ``ivvae`` command calls it at start; the
  Triton python stubs keep glibc's defaults) has glibc map every block of 1 MiB or more on
  its own, so a freed feature map goes back to the OS at once instead of fragmenting the
  heap: a whole-video encode of 161 frames then peaks 2 % above one of 17 (10 % without),
  at no measured cost in speed.

What one request may use is the budget less the process's baseline (weights, runtime, and
the in-memory result cache at its cap), measured once after start-up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .core.files import atomic_write, state_dir
from .core.geometry import GROUP, SPACE_COMPRESSION, latent_size
from .core.steps import Steps
from .core.tasks import within
from .errors import Overloaded, TooLarge

log = logging.getLogger("ivvae.memory")

MB = 1 << 20
# Beyond the model: the decoded chunk and its padded copy (uint8, a few per frame), the
# step's input or output arrays, and per pixel of a frame the video decoder's reference
# frames or the H.264 encoder's lookahead (tens of YUV frames).
IO_BYTES_PER_PIXEL_FRAME = 16
IO_BYTES_PER_PIXEL = 128
IO_FIXED_BYTES = 32 * MB
# A measured cost is scaled by this before planning: allocator rounding and fragmentation,
# and batching's concatenated inputs, make real peaks a little higher than one clean step.
SAFETY = 1.25
# A job that reserved more than this gives its memory back to the OS when it ends.
RETURN_AFTER_BYTES = 256 * MB
# Assumed when a cost cannot be measured (no peak-RSS reset): four times the bundled
# model's, about the official dim64 models'.
UNMEASURED_PER_PIXEL_FRAME = 3000.0
# Of the machine's (or the container's) memory, the default budget.
DEFAULT_FRACTION = 0.75
# Of the budget's share for requests, what request bodies held in memory may use together
# (HeldBodies); model steps and held answers get the rest.
BODY_SHARE = 0.25


@dataclass(frozen=True)
class StepCost:
    """Peak bytes of one model step: ``fixed + per_pixel_frame * frames * pixels``.

    ``frames``: the frames a step takes in (encode) or puts out (decode); ``pixels``: per
    frame, after the padding to multiples of 8.
    """

    fixed: int = 0
    per_pixel_frame: float = 0.0

    def peak(self, frames: int, pixels: int) -> int:
        model = self.fixed + self.per_pixel_frame * frames * pixels
        io = IO_FIXED_BYTES + IO_BYTES_PER_PIXEL_FRAME * frames * pixels
        return int(SAFETY * model + io + IO_BYTES_PER_PIXEL * pixels)


@dataclass(frozen=True)
class Plan:
    """How one request runs: ``groups_per_step`` groups of 4 frames per step (frame 0 is
    always a step of its own), reserving ``reserve_bytes`` of the budget."""

    groups_per_step: int
    reserve_bytes: int


def padded_pixels(width: int, height: int) -> int:
    return latent_size(width) * latent_size(height) * 64


def plan_steps(cost: StepCost, *, width: int, height: int, still: bool, max_groups: int,
               available: int, budget_mb: int) -> Plan:
    """The largest plan whose steps fit ``available`` bytes, or ``TooLarge``.

    ``still``: a single picture (only the first step, one frame, ever runs).
    """
    pixels = padded_pixels(width, height)
    first = cost.peak(1, pixels)
    if still:
        if first > available:
            raise _too_large(cost, width, height, 1, first, available, budget_mb)
        return Plan(1, first)
    for groups in range(max_groups, 0, -1):
        need = max(first, cost.peak(GROUP * groups, pixels))
        if need <= available:
            return Plan(groups, need)
    need = max(first, cost.peak(GROUP, pixels))
    raise _too_large(cost, width, height, GROUP, need, available, budget_mb)


def _too_large(cost: StepCost, width: int, height: int, frames: int, need: int,
               available: int, budget_mb: int) -> TooLarge:
    fits = _largest_pixels(cost, frames, available)
    if fits >= 64:
        scale = math.sqrt(fits / (width * height))
        w, h = max(8, int(width * scale) // 8 * 8), max(8, int(height * scale) // 8 * 8)
        hint = (f"frames of up to about {fits:,} pixels fit (e.g. {w}x{h} at this aspect "
                "ratio)")
    else:
        hint = "no frame size fits: raise the budget"
    return TooLarge(
        f"a {width}x{height} {'picture' if frames == 1 else 'video'} needs about "
        f"{need // MB:,} MB per step ({frames} frame{'s' if frames > 1 else ''} at a "
        f"time), more than the {available // MB:,} MB one request may use under the memory "
        f"budget of {budget_mb:,} MB (IVVAE_MEMORY_BUDGET_MB); {hint}")


def _largest_pixels(cost: StepCost, frames: int, available: int) -> int:
    """The most padded pixels per frame whose step of ``frames`` frames fits."""
    per_pixel = (SAFETY * cost.per_pixel_frame * frames + IO_BYTES_PER_PIXEL_FRAME * frames
                 + IO_BYTES_PER_PIXEL)
    room = available - SAFETY * cost.fixed - IO_FIXED_BYTES
    return max(0, int(room / per_pixel)) if per_pixel > 0 else 0


_BACKGROUND: set[asyncio.Task[None]] = set()  # trims in flight (a task needs a reference)


class MemoryBudget:
    """Admission control over ``capacity`` bytes (the budget less the baseline).

    :meth:`reserve` waits, in arrival order, until the reservation fits next to those held;
    a reservation larger than the whole capacity is the planner's business (it refuses
    such requests first), here it waits for an empty budget.
    """

    def __init__(self, capacity: int, *, timeout_s: float, budget_mb: int) -> None:
        if capacity <= 0:
            raise ValueError(
                f"the memory budget of {budget_mb} MB leaves nothing for requests next to "
                "the process's baseline (weights, runtime, in-memory cache): raise "
                "IVVAE_MEMORY_BUDGET_MB or lower IVVAE_CACHE_MEMORY_MAX_BYTES")
        self.capacity = capacity
        self.budget_mb = budget_mb
        self.timeout_s = timeout_s
        self.reserved = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        release = await self.acquire(nbytes)
        try:
            yield
        finally:
            release()

    async def acquire(self, nbytes: int) -> Callable[[], None]:
        """Wait for ``nbytes``; returns the function that gives them back (idempotent,
        callable from the event loop's thread)."""
        nbytes = min(max(0, nbytes), self.capacity)
        await self._acquire(nbytes)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.reserved -= nbytes
            self._wake()
            if nbytes >= RETURN_AFTER_BYTES:
                task = asyncio.get_running_loop().create_task(asyncio.to_thread(return_memory))
                _BACKGROUND.add(task)
                task.add_done_callback(_BACKGROUND.discard)

        return release

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiters and self.reserved + nbytes <= self.capacity:
            self.reserved += nbytes
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            await within(asyncio.shield(waiter), self.timeout_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # granted just as the timeout fired: keep it
            raise Overloaded(
                f"waited {self.timeout_s:g} s for {nbytes // MB:,} MB of the memory budget "
                f"({self.reserved // MB:,} of {self.capacity // MB:,} MB in use); retry later",
                retry_after_s=max(1.0, self.timeout_s / 4)) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.reserved -= nbytes  # granted, but the caller is gone
                self._wake()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            if not waiter.done():
                waiter.cancel()
            self._wake()

    def _wake(self) -> None:
        """Grant waiters in order while the first one fits (no overtaking: a big request
        is not starved by a stream of small ones)."""
        while self._waiters:
            nbytes, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.reserved + nbytes > self.capacity:
                return
            self._waiters.popleft()
            self.reserved += nbytes
            waiter.set_result(None)


class HeldBodies:
    """Request bodies held in memory (a ``/decode`` latent, a raw tensor, a ``/frames``
    video, a gRPC upload), from their first byte until their request lets them go: together
    at most ``capacity`` bytes, a share carved from the budget (:data:`BODY_SHARE`).

    Why: each body may be ``IVVAE_MAX_UPLOAD_BYTES``, and connections (or RPCs) are
    counted, not weighed: a thousand clients sending latents at once held a thousand
    bodies before any of them reached admission. A body that would pass the share is
    refused at once (:class:`~ivvae.errors.Overloaded`, 503 with ``Retry-After``) rather
    than waiting, since a waiting body holds its connection and what has arrived; one that
    could never fit is :class:`~ivvae.errors.TooLarge`. ``/encode`` file uploads are spooled
    to disk and take none of it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """``with bodies.hold() as body:`` one request's part, given back when the block
        ends (whatever it has not let go before)."""
        body = BodyHold(self)
        try:
            yield body
        finally:
            body.let_go()


class BodyHold:
    """One request's part of :class:`HeldBodies`."""

    def __init__(self, bodies: HeldBodies) -> None:
        self._bodies = bodies
        self.taken = 0

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` more as they arrive, or raise when they do not fit."""
        bodies = self._bodies
        if self.taken + nbytes > bodies.capacity:
            raise TooLarge(
                f"the body is over {self.taken + nbytes:,} bytes, more than the "
                f"{bodies.capacity:,} bytes of memory that bodies may hold "
                f"({BODY_SHARE:.0%} of the budget's share for requests, "
                "IVVAE_MEMORY_BUDGET_MB): send less at once")
        if bodies.held + nbytes > bodies.capacity:
            raise Overloaded(
                f"request bodies already hold {bodies.held // MB:,} of the "
                f"{bodies.capacity // MB:,} MB of memory they may use; retry later",
                retry_after_s=1.0)
        bodies.held += nbytes
        self.taken += nbytes

    def give(self, nbytes: int) -> None:
        """Give back ``nbytes`` let go before the request ends (a copy dropped); never
        more than were taken."""
        given = min(nbytes, self.taken)
        self.taken -= given
        self._bodies.held -= given

    def let_go(self) -> None:
        """Give back all: the request no longer needs its body."""
        self.give(self.taken)


# -- measuring a model's cost -----------------------------------------------------------------

# Side of the square frames a calibration step runs on: big enough that the model's
# activations dominate the runtime's noise, small enough to take a second or two. The
# cost is taken as all per pixel (no fixed part): an overestimate for larger frames (about
# 1.3x at 1080p for the bundled model), which errs on the safe side.
CALIBRATION_SIDE = 192


class PeakMeter(Protocol):
    def start(self) -> int:
        """Begin a measurement; the level now, in bytes."""

    def peak(self) -> int:
        """The highest level since :meth:`start`, in bytes."""


class RssMeter:
    """The process's resident memory: what the budget bounds on a CPU."""

    def start(self) -> int:
        return_memory()
        if not reset_peak_rss():
            raise OSError("cannot reset the peak RSS (/proc/self/clear_refs)")
        return rss_bytes()

    def peak(self) -> int:
        return peak_rss_bytes()


def measure_step_cost(steps: Steps, meter: PeakMeter, *, side: int = CALIBRATION_SIDE
                      ) -> StepCost:
    """Run a first and a next step of one group on ``side x side`` frames (after a small
    warm-up) and express the peak as bytes per pixel per frame of the step's frames."""
    small = 8 * SPACE_COMPRESSION

    def run(size: int) -> None:
        if steps.direction == "encoder":
            _, cache = steps.first(np.zeros((1, 1, size, size, 3), np.uint8))
            steps.next(np.zeros((1, GROUP, size, size, 3), np.uint8), cache)
        else:
            h = size // SPACE_COMPRESSION
            _, cache = steps.first(np.zeros((1, steps.z_dim, 1, h, h), np.float32))
            steps.next(np.zeros((1, steps.z_dim, 1, h, h), np.float32), cache)

    run(small)  # thread pools, kernels and caches of the runtime: not the model's cost
    level = meter.start()
    run(side)
    peak = max(0, meter.peak() - level)
    return StepCost(fixed=0, per_pixel_frame=peak / (GROUP * side * side))


_MEASURED: dict[str, StepCost] = {}
COSTS_FILE = "step-costs.json"


def remembered_step_cost(key: str, measure: Callable[[], StepCost]) -> StepCost:
    """``measure()``, once per ``key`` per machine: kept in this process and in
    ``state_dir()/step-costs.json`` (a calibration takes seconds; restarts reuse it).

    ``key`` names everything the cost depends on (weights, direction, precision, device,
    runtime version). An unreadable or unwritable file only costs a new measurement.
    """
    if key in _MEASURED:
        return _MEASURED[key]
    path = state_dir() / COSTS_FILE
    known: dict[str, dict[str, float]] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            known = loaded
    entry = known.get(key)
    cost = None
    if isinstance(entry, dict):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            cost = StepCost(fixed=int(entry["fixed"]),
                            per_pixel_frame=float(entry["per_pixel_frame"]))
            if cost.per_pixel_frame < 0 or cost.fixed < 0:
                cost = None
    if cost is None:
        cost = measure()
        known[key] = {"fixed": cost.fixed, "per_pixel_frame": cost.per_pixel_frame}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(known, indent=1, sort_keys=True))
        except OSError as exc:
            log.info("could not remember step costs in %s: %s", path, exc)
    _MEASURED[key] = cost
    return cost


# -- the process's memory ---------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The process's resident memory now (0 where /proc is not available)."""
    return _status_kb("VmRSS") or 0


def peak_rss_bytes() -> int:
    """The process's peak resident memory (VmHWM) since start or :func:`reset_peak_rss`."""
    return _status_kb("VmHWM") or 0


def reset_peak_rss() -> bool:
    """Set the peak to the current RSS (Linux ``clear_refs``); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _glibc(function: str) -> Any:
    """A function of glibc's malloc (``None`` off glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None  # not glibc


def _libc_trim() -> Callable[[], None] | None:
    trim = _glibc("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_TRIM = _libc_trim()

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 * MB
ALLOCATOR_ENV = "IVVAE_TUNE_MALLOC"  # 0: leave glibc's defaults


def tune_allocator() -> bool:
    """Set glibc's mmap threshold to ``MMAP_THRESHOLD_BYTES`` (whether it was set). Left
    alone when the user set ``MALLOC_MMAP_THRESHOLD_`` or ``IVVAE_TUNE_MALLOC=0``, and off
    glibc. Setting it also stops glibc from raising the threshold on its own, which is how
    freed multi-megabyte feature maps end up kept in the heap."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get(
            ALLOCATOR_ENV, "").strip() == "0":
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def return_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import gc

    gc.collect()
    if _TRIM is not None:
        _TRIM()


def machine_memory_bytes() -> int:
    """The memory this process may use: the cgroup limit if any, else physical RAM."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            text = Path(path).read_text().strip()
            if text.isdigit():
                limits.append(int(text))
    with contextlib.suppress(AttributeError, ValueError, OSError):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return min(limits) if limits else 8 << 30


def default_budget_mb() -> int:
    return int(machine_memory_bytes() * DEFAULT_FRACTION) // MB
