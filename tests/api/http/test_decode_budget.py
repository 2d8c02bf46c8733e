"""Whole answers of /decode (a tensor, a batch's frames file) inside the memory budget: one
that could never fit is a 413 before any decoding, one that fits is held in the budget
until it is sent, then given back."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.service_fixtures import running_app, tiny_settings, tiny_weights  # noqa: F401

BUDGET_MB = 4000


async def test_a_tensor_answer_past_the_budget_is_refused_before_decoding(
        tiny_weights: Path) -> None:  # noqa: F811
    # 16 latents of 97 frames 512x512 as float32 (inside the frame count limit): a 4.9 GB
    # answer, held three times over, from a 26 MB body. It was decoded and stacked whatever
    # the budget.
    async with running_app(tiny_settings(tiny_weights, memory_budget_mb=BUDGET_MB)) as client:
        budget = client.app.state.service.pipeline.budget  # type: ignore[attr-defined]
        metrics = client.app.state.service.metrics  # type: ignore[attr-defined]
        big = np.zeros((16, 4, 25, 64, 64), np.float32)
        r = await client.post("/decode", content=big.tobytes(), params={
            "shape": "16,4,25,64,64", "dtype": "float32", "output_type": "pt"})
        assert r.status_code == 413, r.text
        assert "IVVAE_MEMORY_BUDGET_MB" in r.json()["detail"]
        assert metrics.frames.labels("decode")._value.get() == 0  # nothing was decoded
        for output in ({"output_type": "pt"}, {"format": "frames"}):
            small = np.zeros((2, 4, 2, 4, 4), np.float32)
            r = await client.post("/decode", content=small.tobytes(), params={
                "shape": "2,4,2,4,4", "dtype": "float32", **output})
            assert r.status_code == 200, r.text
            assert budget.reserved == 0  # given back once sent
