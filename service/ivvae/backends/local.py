"""The ``local`` backend: the model runs in this process (torch), steps are micro-batched.

The step engine is the one the Triton models run (``ivvae.core.steps.SequenceTable``), here
over the eager model (``ivvae.model.steps.EagerSteps``): one table per model and
direction holds each video's feature cache, keyed by a session's sequence id. The
micro-batcher collects the steps that arrive within ``batch_max_delay_ms`` and hands them
to the table, which batches the ones of equal shape and isolates a failing member. Every
model call runs on one worker thread, so the event loop never blocks and torch gets all
cores for one batch at a time.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import memory
from ..batching import MicroBatcher
from ..config import Settings
from ..core.model_info import ModelInfo
from ..core.steps import Direction, FramesDtype, SequenceTable, StepRequest, StepResult
from ..errors import UnknownModel
from ..memory import StepCost
from ..metrics import Metrics
from ..model import IVVAE
from ..model.steps import EagerSteps
from ..weights import load_weights
from .base import (
    Backend,
    DecodeSession,
    EncodeSession,
    SequenceDecode,
    SequenceEncode,
    step_error,
)

log = logging.getLogger("ivvae.backends.local")

Key = tuple[str, Direction]  # (model, direction)
_KIND = {"encoder": "encode", "decoder": "decode"}


@dataclass
class _Served:
    info: ModelInfo
    tables: dict[Direction, SequenceTable]
    costs: dict[Direction, StepCost]


class _CudaMeter:
    """CUDA's own peak allocation: what bounds a GPU step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))


def _measured_costs(model: IVVAE, info: ModelInfo, settings: Settings
                    ) -> dict[Direction, StepCost]:
    device = model.device
    meter: memory.PeakMeter = (_CudaMeter(device) if device.type == "cuda"
                               else memory.RssMeter())
    costs: dict[Direction, StepCost] = {}
    precisions: dict[Direction, str] = {"encoder": settings.encode_precision,
                                        "decoder": settings.decode_precision}
    for direction, precision in precisions.items():
        key = (f"{info.weights_sha256}:{direction}:{precision}:{device}:torch{torch.__version__}"
               f":{memory.CALIBRATION_SIDE}")
        measure = functools.partial(memory.measure_step_cost, EagerSteps(model, direction),
                                    meter)
        try:
            costs[direction] = memory.remembered_step_cost(key, measure)
        except OSError as exc:  # no way to read the peak: assume the bundled model's cost
            log.warning("cannot measure the memory cost of %s: %s; assuming %d bytes per "
                        "pixel per frame", info.name, exc, memory.UNMEASURED_PER_PIXEL_FRAME)
            costs[direction] = memory.StepCost(per_pixel_frame=memory.UNMEASURED_PER_PIXEL_FRAME)
    log.info("model %s step memory: %.0f B per pixel-frame encoding, %.0f decoding", info.name,
             costs["encoder"].per_pixel_frame, costs["decoder"].per_pixel_frame)
    return costs


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, _Served] = {}
        self._default = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivvae-model")
        self._batcher: MicroBatcher[Key, StepRequest, StepResult] = MicroBatcher(
            self._run_batch, executor=self._executor, max_batch_size=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000,
        )
        self._ids = itertools.count(1)
        self._started = False

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        self._started = True

    def _load(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        sources = [(s.model_name, s.weights)] + [
            (name, str(path)) for name, path in s.extra_weight_paths.items()
        ]
        # A session always releases its sequence; the time-to-live only catches leaks.
        ttl_s = 2 * s.request_timeout_s
        for name, path in sources:
            model, info = load_weights(path or None, name=name, device=s.device)
            model.set_precision(encode=s.encode_precision, decode=s.decode_precision)
            if info.name in self._models:
                raise ValueError(f"two models are named {info.name!r}; name them apart")
            tables: dict[Direction, SequenceTable] = {
                d: SequenceTable(EagerSteps(model, d), ttl_s=ttl_s, on_batch=self._observer(d))
                for d in ("encoder", "decoder")}
            for direction, table in tables.items():
                self.metrics.open_sequences.labels(info.name, direction).set_function(
                    table.__len__)
                self.metrics.evicted_sequences.labels(info.name, direction).set_function(
                    functools.partial(getattr, table, "evicted"))
            self._models[info.name] = _Served(info, tables, _measured_costs(model, info, s))
            log.info("loaded model %s (%s, %d params, weights %s, trained=%s)", info.name,
                     info.source, info.num_params, info.weights_sha256[:12], info.trained)
            if not self._default:
                self._default = info.name

    def _observer(self, direction: Direction):  # type: ignore[no-untyped-def]
        def observe(step: str, size: int, seconds: float) -> None:
            kind = f"{_KIND[direction]}_{step}"
            self.metrics.batch_size.labels(kind).observe(size)
            self.metrics.batch_seconds.labels(kind).observe(seconds)
        return observe

    async def close(self) -> None:
        await self._batcher.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def ready(self) -> tuple[bool, str]:
        if not self._started:
            return False, "models are loading"
        return True, "ok"

    @property
    def models(self) -> dict[str, ModelInfo]:
        return {name: m.info for name, m in self._models.items()}

    @property
    def default_model(self) -> str:
        return self._default

    def _get(self, model: str) -> _Served:
        try:
            return self._models[model]
        except KeyError:
            raise UnknownModel(f"unknown model {model!r}; served: {sorted(self._models)}") from None

    def step_cost(self, model: str, direction: Direction) -> StepCost:
        return self._get(model).costs[direction]

    def encode_session(self, model: str) -> EncodeSession:
        self._get(model)
        return SequenceEncode(_Sequence(self, model, "encoder"))

    def decode_session(self, model: str, frames_dtype: FramesDtype = "uint8") -> DecodeSession:
        self._get(model)
        return SequenceDecode(_Sequence(self, model, "decoder", frames_dtype))

    def _run_batch(self, key: Key, requests: Sequence[StepRequest]) -> list[StepResult]:
        model, direction = key
        return self._get(model).tables[direction].execute(requests)


class _Sequence:
    """One video's steps through a model's table, one at a time."""

    def __init__(self, backend: LocalBackend, model: str, direction: Direction,
                 frames_dtype: FramesDtype = "uint8") -> None:
        self.backend = backend
        self.key: Key = (model, direction)
        self.frames_dtype = frames_dtype
        self.corrid = next(backend._ids)
        self.sent = False  # a step was submitted: the table may hold state for it
        self.closed = False

    async def step(self, array: np.ndarray, *, first: bool) -> list[np.ndarray]:
        # Set before the wait: a caller cancelled while its batch runs on the model thread
        # never sees the result, but the table keeps the state that batch made.
        self.sent = True
        result = await self.backend._batcher.submit(
            self.key, StepRequest(self.corrid, start=first, array=array,
                                  frames_dtype=self.frames_dtype))
        if result.kind is not None:
            raise step_error(result, self.key[1])
        return result.outputs

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.sent:
            table = self.backend._get(self.key[0]).tables[self.key[1]]
            # behind any batch still running on the model thread, never blocking the loop
            await asyncio.get_running_loop().run_in_executor(
                self.backend._executor, table.release, self.corrid)
