"""The local backend frees every video's state in its sequence table, however the caller
ends: also when it is cancelled while its step runs on the model thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from ivvae.backends import create_backend
from ivvae.backends.local import LocalBackend
from ivvae.metrics import Metrics
from ivvae.model import steps as steps_module
from tests.service_fixtures import tiny_settings

FRAME = np.random.default_rng(3).integers(0, 256, (1, 1, 16, 24, 3), dtype=np.uint8)


@pytest.mark.parametrize("direction", ["encoder", "decoder"])
async def test_a_step_cancelled_while_it_runs_leaves_no_state(
        tiny_weights: Path, monkeypatch: pytest.MonkeyPatch, direction: str) -> None:
    backend = create_backend(tiny_settings(tiny_weights, torch_threads=1), Metrics())
    assert isinstance(backend, LocalBackend)
    await backend.start()
    model = backend.default_model
    try:
        if direction == "encoder":
            session, x = backend.encode_session(model), FRAME
        else:
            session = backend.decode_session(model)
            x = np.zeros((1, backend.models[model].z_dim, 1, 2, 3), np.float32)
        running, go_on = threading.Event(), threading.Event()
        run = steps_module.EagerSteps._run

        def held(self: steps_module.EagerSteps, *args: object) -> object:
            running.set()
            go_on.wait(30)
            return run(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(steps_module.EagerSteps, "_run", held)
        step = asyncio.create_task(session.first(x))
        assert await asyncio.to_thread(running.wait, 30)
        step.cancel()  # the client went away while the model thread runs its step
        with pytest.raises(asyncio.CancelledError):
            await step
        closing = asyncio.create_task(session.close())
        go_on.set()
        await closing
        # behind the cancelled step on the one model thread: its batch has ended
        await asyncio.get_running_loop().run_in_executor(backend._executor, lambda: None)
        table = backend._models[model].tables[direction]  # type: ignore[index]
        assert len(table) == 0  # it held the state until its time-to-live (20 minutes)
    finally:
        go_on.set()
        await backend.close()
