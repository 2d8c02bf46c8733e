"""One failure policy on both backends: a bad member of a batch fails alone.

Three videos step concurrently (so their steps are batched: by the micro-batcher on the
local backend, by Triton's sequence batcher on Triton); one of them sends a step whose size
changed mid-sequence. On both backends that one gets the same 4xx error and the other two
get exactly the moments they get alone. On the local backend a member that makes the model
itself fail is injected too: the batch is retried member by member, so only that member
fails (``ivvae.core.steps.SequenceTable``, which the Triton models run as well).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ivvae.backends import Backend, create_backend
from ivvae.errors import InvalidInput, IVVAEError
from ivvae.metrics import Metrics
from ivvae.model import steps as steps_module
from tests.service_fixtures import tiny_settings
from tests.triton_server import IvvaeTriton

H, W = 16, 24
rng = np.random.default_rng(7)
FIRST = [rng.integers(0, 256, (1, 1, H, W, 3), dtype=np.uint8) for _ in range(3)]
NEXT = [rng.integers(0, 256, (1, 4, H, W, 3), dtype=np.uint8) for _ in range(3)]
WRONG = np.zeros((1, 4, H + 8, W, 3), np.uint8)  # the size changes mid-sequence
POISON = 7  # a frame full of this value makes the (patched) local model fail


async def alone(backend: Backend, i: int) -> np.ndarray:
    session = backend.encode_session(backend.default_model)
    try:
        await session.first(FIRST[i])
        mu, _ = await session.next(NEXT[i])
        return mu
    finally:
        await session.close()


async def together(backend: Backend, bad: np.ndarray) -> list[np.ndarray | BaseException]:
    """Three sequences started, then their second steps sent at once; the middle one bad."""
    sessions = [backend.encode_session(backend.default_model) for _ in range(3)]
    try:
        await asyncio.gather(*(s.first(f) for s, f in zip(sessions, FIRST, strict=True)))
        inputs = [NEXT[0], bad, NEXT[2]]
        results = await asyncio.gather(
            *(s.next(x) for s, x in zip(sessions, inputs, strict=True)),
            return_exceptions=True)
        return [r if isinstance(r, BaseException) else r[0] for r in results]
    finally:
        for s in sessions:
            await s.close()


async def check_isolation(backend: Backend) -> None:
    expected = [await alone(backend, i) for i in (0, 2)]
    first, bad, third = await together(backend, WRONG)
    assert isinstance(bad, InvalidInput) and "size changed" in bad.detail
    assert isinstance(first, np.ndarray) and isinstance(third, np.ndarray)
    np.testing.assert_allclose(first, expected[0], atol=1e-5)  # batched vs alone: 1e-7
    np.testing.assert_allclose(third, expected[1], atol=1e-5)


async def test_local_backend_isolates_a_bad_member(tiny_weights: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = tiny_settings(tiny_weights, batch_max_delay_ms=200, torch_threads=1)
    backend = create_backend(settings, Metrics())
    await backend.start()
    try:
        await check_isolation(backend)

        # A member that makes the model itself fail: the batch fails, then each member
        # runs alone and only the poisoned one fails.
        run = steps_module.EagerSteps._run
        calls: list[int] = []

        def poisoned(self: steps_module.EagerSteps, x: np.ndarray, cache: object,
                     frames_dtype: str) -> object:
            calls.append(len(x))
            if (x == POISON).all(axis=(1, 2, 3, 4)).any():
                raise RuntimeError("poisoned input")
            return run(self, x, cache, frames_dtype)  # type: ignore[arg-type]

        monkeypatch.setattr(steps_module.EagerSteps, "_run", poisoned)
        expected = [await alone(backend, i) for i in (0, 2)]
        calls.clear()
        first, bad, third = await together(backend, np.full((1, 4, H, W, 3), POISON, np.uint8))
        assert isinstance(bad, IVVAEError) and "poisoned input" in bad.detail
        assert bad.code == "internal_error"
        np.testing.assert_allclose(first, expected[0], atol=1e-5)  # batched vs alone: 1e-7
        np.testing.assert_allclose(third, expected[1], atol=1e-5)
        assert 3 in calls[:1] and calls.count(1) >= 3  # one batch of 3, then alone
    finally:
        await backend.close()


@pytest.mark.triton
async def test_triton_backend_isolates_a_bad_member(ivvae_triton: IvvaeTriton) -> None:
    settings = tiny_settings(ivvae_triton.weights, backend="triton",
                             triton_url=ivvae_triton.server.grpc_url)
    backend = create_backend(settings, Metrics())
    await backend.start()
    try:
        await check_isolation(backend)
    finally:
        await backend.close()
