"""The ``local`` backend: the model runs in this process (torch), steps are micro-batched.

Every model call runs on one worker thread, so the event loop never blocks and torch gets
all cores for one batch at a time. Feature caches stay in the session objects as torch
tensors; steps of different videos with equal (model, kind, size) run as one batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batching import MicroBatcher
from ..config import Settings
from ..errors import UnknownModel
from ..metrics import Metrics
from ..model.steps import DecoderStep, EncoderStep
from ..weights import load_weights
from .base import Backend, DecodeSession, EncodeSession, ModelInfo

log = logging.getLogger("ivvae.backends.local")

Key = tuple[str, str, tuple[int, ...]]  # (model, step kind, input shape without batch)


@dataclass
class _Served:
    info: ModelInfo
    encoder: EncoderStep
    decoder: DecoderStep


@dataclass
class _Item:
    array: np.ndarray
    cache: list[torch.Tensor] | None


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[str, _Served] = {}
        self._default = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivvae-model")
        self._batcher: MicroBatcher[Key, _Item, Any] = MicroBatcher(
            self._run_batch, executor=self._executor, max_batch_size=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000, on_batch=self._observe,
        )
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
        for name, path in sources:
            model, info = load_weights(path or None, name=name, device=s.device)
            model.set_precision(encode=s.encode_precision, decode=s.decode_precision)
            if info.name in self._models:
                raise ValueError(f"two models are named {info.name!r}; name them apart")
            self._models[info.name] = _Served(info, EncoderStep(model), DecoderStep(model))
            log.info("loaded model %s (%s, %d params, weights %s, trained=%s)", info.name,
                     info.source, info.num_params, info.weights_sha256[:12], info.trained)
            if not self._default:
                self._default = info.name

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

    def encode_session(self, model: str) -> EncodeSession:
        self._get(model)
        return _LocalEncode(self, model)

    def decode_session(self, model: str) -> DecodeSession:
        self._get(model)
        return _LocalDecode(self, model)

    async def submit(self, model: str, kind: str, array: np.ndarray,
                     cache: list[torch.Tensor] | None) -> Any:
        key: Key = (model, kind, tuple(array.shape[1:]))
        return await self._batcher.submit(key, _Item(array, cache))

    def _observe(self, key: Key, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(key[1]).observe(size)
        self.metrics.batch_seconds.labels(key[1]).observe(seconds)

    # -- runs on the model thread -----------------------------------------------------------

    def _run_batch(self, key: Key, items: Sequence[_Item]) -> list[Any]:
        model, kind, _ = key
        served = self._get(model)
        x = torch.from_numpy(np.concatenate([i.array for i in items]))
        cache = None
        if kind.endswith("next"):
            slots = zip(*(i.cache or [] for i in items), strict=True)
            cache = [torch.cat(s) for s in slots]
        with torch.inference_mode():
            if kind == "encode_first":
                mu, logvar, new = served.encoder.first(x)
            elif kind == "encode_next":
                assert cache is not None
                mu, logvar, new = served.encoder.next(x, cache)
            elif kind == "decode_first":
                frames, new = served.decoder.first(x)
            elif kind == "decode_next":
                assert cache is not None
                frames, new = served.decoder.next(x, cache)
            else:
                raise ValueError(f"unknown step kind {kind}")
        out: list[Any] = []
        for b in range(len(items)):
            # clone: a slice would keep the whole batch's cache alive
            c = [t[b : b + 1].clone() for t in new]
            if kind.startswith("encode"):
                out.append((mu[b : b + 1].numpy().copy(), logvar[b : b + 1].numpy().copy(), c))
            else:
                out.append((frames[b : b + 1].numpy().copy(), c))
        return out


class _LocalEncode(EncodeSession):
    def __init__(self, backend: LocalBackend, model: str) -> None:
        self.backend, self.model = backend, model
        self.cache: list[torch.Tensor] | None = None

    async def first(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar, self.cache = await self.backend.submit(self.model, "encode_first", frames,
                                                           None)
        return mu, logvar

    async def next(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is None:
            raise RuntimeError("next() before first()")
        mu, logvar, self.cache = await self.backend.submit(self.model, "encode_next", frames,
                                                           self.cache)
        return mu, logvar

    async def close(self) -> None:
        self.cache = None


class _LocalDecode(DecodeSession):
    def __init__(self, backend: LocalBackend, model: str) -> None:
        self.backend, self.model = backend, model
        self.cache: list[torch.Tensor] | None = None

    async def first(self, latent: np.ndarray) -> np.ndarray:
        frames, self.cache = await self.backend.submit(self.model, "decode_first", latent, None)
        return frames

    async def next(self, latent: np.ndarray) -> np.ndarray:
        if self.cache is None:
            raise RuntimeError("next() before first()")
        frames, self.cache = await self.backend.submit(self.model, "decode_next", latent,
                                                       self.cache)
        return frames

    async def close(self) -> None:
        self.cache = None
