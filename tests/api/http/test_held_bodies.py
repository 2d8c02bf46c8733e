"""Request bodies held in memory (``/decode`` latents, raw tensors, ``/frames`` videos)
count against their share of the memory budget as they arrive: one that would pass it
while others hold theirs is a 503 with ``Retry-After``, one that could never fit a 413,
and every byte is given back when its request ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tests.service_fixtures import running_app, tiny_settings, tiny_weights  # noqa: F401

SHAPE = (1, 4, 5, 16, 32)  # a bare latent of the tiny model: 40,960 bytes as float32
LATENT = np.zeros(SHAPE, np.float32).tobytes()
PARAMS = {"shape": ",".join(map(str, SHAPE)), "dtype": "float32", "format": "frames"}


async def test_bodies_past_their_share_wait_for_no_one_and_are_given_back(
        tiny_weights: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    async with running_app(tiny_settings(tiny_weights, memory_budget_mb=4000)) as client:
        pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
        bodies = pipeline.bodies
        share = bodies.capacity + pipeline.budget.capacity  # carved from the budget
        assert bodies.capacity == int(share * 0.25) and share <= 4000 * 2**20
        assert "less than one upload" not in caplog.text
        # A share below one upload of IVVAE_MAX_UPLOAD_BYTES is said at start-up.
        pipeline.settings = pipeline.settings.model_copy(update={"max_upload_bytes": 2**40})
        pipeline.start_budget(0)
        assert "less than one upload of IVVAE_MAX_UPLOAD_BYTES" in caplog.text
        bodies = pipeline.bodies
        bodies.capacity = 64 * 1024
        go_on = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield LATENT[:30_000]
            await go_on.wait()
            yield LATENT[30_000:]

        slow = asyncio.create_task(client.post("/decode", content=slow_body(), params=PARAMS))
        for _ in range(200):
            if bodies.held:
                break
            await asyncio.sleep(0.01)
        assert bodies.held == 30_000
        # 30,000 + 40,960 bytes do not fit 64 KiB: refused at once, the slow one unharmed.
        r = await client.post("/decode", content=LATENT, params=PARAMS)
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "overloaded" and "bodies" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        r = await client.post("/frames", content=LATENT,
                              headers={"content-type": "video/mp4"})
        assert r.status_code == 503, r.text
        assert bodies.held == 30_000
        go_on.set()
        assert (await slow).status_code == 200
        assert bodies.held == 0
        r = await client.post("/decode", content=LATENT, params=PARAMS)
        assert r.status_code == 200, r.text
        assert bodies.held == 0
        # Multipart: the raw body is let go once parsed, before its file is read back; it
        # was counted twice (a 413 at half the size).
        bodies.capacity = 60_000
        r = await client.post("/decode", files={"file": ("l.bin", LATENT)}, params=PARAMS)
        assert r.status_code == 200, r.text
        assert bodies.held == 0
        # A body larger than the whole share could never be held: 413, not a retry.
        bodies.capacity = 40_000
        r = await client.post("/decode", content=LATENT, params=PARAMS)
        assert r.status_code == 413, r.text
        assert "IVVAE_MEMORY_BUDGET_MB" in r.json()["detail"]
        r = await client.post("/encode", content=bytes(16 * 32 * 32 * 3), params={
            "shape": "1,16,32,32,3", "dtype": "uint8"})
        assert r.status_code == 413, r.text
        assert bodies.held == 0

