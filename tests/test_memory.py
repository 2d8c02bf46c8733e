"""ivvae.memory: step plans from a cost and a budget, admission control, measuring a cost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ivvae import memory
from ivvae.core.geometry import GROUP
from ivvae.errors import Overloaded, TooLarge
from ivvae.memory import MB, HeldBodies, MemoryBudget, StepCost, plan_steps
from tests.service_fixtures import tiny_settings, tiny_weights, write_tiny_weights  # noqa: F401

COST = StepCost(fixed=0, per_pixel_frame=700.0)  # about the bundled model's


def test_plan_takes_the_most_groups_that_fit() -> None:
    small = plan_steps(COST, width=320, height=240, still=False, max_groups=4,
                       available=2000 * MB, budget_mb=3000)
    assert small.groups_per_step == 4
    assert small.reserve_bytes == COST.peak(4 * GROUP, 320 * 240)
    # At 720p four groups (16 frames) do not fit 2 GB, one does.
    hd = plan_steps(COST, width=1280, height=720, still=False, max_groups=4,
                    available=3500 * MB, budget_mb=4000)
    assert 1 <= hd.groups_per_step < 4
    assert hd.reserve_bytes <= 3500 * MB
    assert COST.peak(GROUP * (hd.groups_per_step + 1), 1280 * 720) > 3500 * MB


def test_what_no_plan_fits_is_too_large_naming_the_limit_and_what_fits() -> None:
    with pytest.raises(TooLarge) as info:
        plan_steps(COST, width=1920, height=1080, still=False, max_groups=4,
                   available=2500 * MB, budget_mb=3000)
    detail = info.value.detail
    assert "1920x1080" in detail and "3,000 MB" in detail and "IVVAE_MEMORY_BUDGET_MB" in detail
    assert "2,500 MB" in detail and "fit (e.g. " in detail
    # The size it names does fit.
    hint = detail.split("(e.g. ")[1].split(" ")[0]
    w, h = (int(v) for v in hint.split("x"))
    assert plan_steps(COST, width=w, height=h, still=False, max_groups=4,
                      available=2500 * MB, budget_mb=3000).groups_per_step >= 1
    assert w * 1080 == pytest.approx(h * 1920, rel=0.05)


def test_a_still_picture_needs_only_its_one_frame() -> None:
    plan = plan_steps(COST, width=1920, height=1080, still=True, max_groups=4,
                      available=2500 * MB, budget_mb=3000)
    assert plan.reserve_bytes == COST.peak(1, 1920 * 1080)
    with pytest.raises(TooLarge, match="picture"):
        plan_steps(COST, width=8000, height=8000, still=True, max_groups=4,
                   available=2500 * MB, budget_mb=3000)


def test_pixels_are_counted_after_padding_to_multiples_of_8() -> None:
    assert memory.padded_pixels(1920, 1081) == 1920 * 1088
    assert memory.padded_pixels(1, 1) == 64


async def test_budget_admits_what_fits_and_queues_the_rest_in_order() -> None:
    budget = MemoryBudget(100, timeout_s=5, budget_mb=1)
    order: list[str] = []
    release_a = asyncio.Event()

    async def job(name: str, nbytes: int, hold: asyncio.Event | None = None) -> None:
        async with budget.reserve(nbytes):
            order.append(name)
            if hold is not None:
                await hold.wait()

    a = asyncio.create_task(job("a", 60, release_a))
    await asyncio.sleep(0)
    b = asyncio.create_task(job("b", 60))  # does not fit next to a: waits
    await asyncio.sleep(0)
    c = asyncio.create_task(job("c", 10))  # would fit, but does not overtake b
    await asyncio.sleep(0.05)
    assert order == ["a"] and budget.reserved == 60
    release_a.set()
    await asyncio.gather(a, b, c)
    assert order == ["a", "b", "c"] and budget.reserved == 0


async def test_a_request_that_waits_too_long_is_overloaded_with_a_retry_hint() -> None:
    budget = MemoryBudget(100, timeout_s=0.1, budget_mb=1)
    async with budget.reserve(100):
        with pytest.raises(Overloaded) as info:
            async with budget.reserve(1):
                pass
    assert info.value.retry_after_s is not None and info.value.retry_after_s >= 1
    assert budget.reserved == 0 and not budget._waiters
    async with budget.reserve(100):  # nothing leaked
        assert budget.reserved == 100


async def test_a_cancelled_waiter_takes_nothing_and_blocks_no_one() -> None:
    budget = MemoryBudget(100, timeout_s=5, budget_mb=1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with budget.reserve(80):
            await hold.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(budget.reserve(50).__aenter__())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    async with budget.reserve(20):  # fits next to the holder: the cancelled one is gone
        assert budget.reserved == 100
    hold.set()
    await first
    assert budget.reserved == 0


def test_held_bodies_are_bounded_together_refused_at_once_and_given_back() -> None:
    bodies = HeldBodies(100)
    with bodies.hold() as first:
        first.take(40)
        first.take(30)
        with bodies.hold() as second:
            second.take(30)
            with pytest.raises(Overloaded, match="retry later") as busy:
                second.take(1)  # 101 together: refused now, not waited for
            assert busy.value.retry_after_s is not None
        assert bodies.held == 70  # the second's 30 given back
        first.give(50)  # a copy let go before the end: given back at once, never below zero
        first.give(50)
        assert bodies.held == 0
        first.take(70)
        with pytest.raises(TooLarge, match="IVVAE_MEMORY_BUDGET_MB"), bodies.hold() as third:
            third.take(101)  # could never fit, however idle: not worth a retry
    assert bodies.held == 0
    with pytest.raises(RuntimeError), bodies.hold() as failing:
        failing.take(100)
        raise RuntimeError
    assert bodies.held == 0


def test_a_budget_smaller_than_the_baseline_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="IVVAE_MEMORY_BUDGET_MB"):
        MemoryBudget(0, timeout_s=1, budget_mb=500)


def test_default_budget_is_a_share_of_the_machine() -> None:
    machine = memory.machine_memory_bytes()
    assert machine > 0
    assert memory.default_budget_mb() == int(machine * memory.DEFAULT_FRACTION) // MB


def test_measured_cost_of_a_real_model_step(tmp_path: Path) -> None:
    """The peak RSS of a real calibration step, per pixel-frame: positive, and the plan's
    peak from it bounds that step's own peak from above."""
    from ivvae.model.steps import EagerSteps
    from ivvae.weights import load_weights

    model, _ = load_weights(str(write_tiny_weights(tmp_path / "tiny.safetensors")))
    meter = memory.RssMeter()
    for direction in ("encoder", "decoder"):
        cost = memory.measure_step_cost(EagerSteps(model, direction), meter, side=64)
        assert 0 < cost.per_pixel_frame < 10_000, (direction, cost)
        steps = EagerSteps(model, direction)
        level = meter.start()
        if direction == "encoder":
            _, cache = steps.first(np.zeros((1, 1, 64, 64, 3), np.uint8))
            steps.next(np.zeros((1, GROUP, 64, 64, 3), np.uint8), cache)
        else:
            _, cache = steps.first(np.zeros((1, model.cfg.z_dim, 1, 8, 8), np.float32))
            steps.next(np.zeros((1, model.cfg.z_dim, 1, 8, 8), np.float32), cache)
        assert meter.peak() - level <= cost.peak(GROUP, 64 * 64), direction


def test_costs_are_measured_once_and_remembered_across_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setattr(memory, "_MEASURED", {})
    calls: list[int] = []

    def measure() -> StepCost:
        calls.append(1)
        return StepCost(fixed=5, per_pixel_frame=123.5)

    assert memory.remembered_step_cost("k", measure) == StepCost(5, 123.5)
    assert memory.remembered_step_cost("k", measure) == StepCost(5, 123.5)
    monkeypatch.setattr(memory, "_MEASURED", {})  # as a new process would start
    assert memory.remembered_step_cost("k", measure) == StepCost(5, 123.5)
    assert len(calls) == 1
    (tmp_path / "ivvae" / memory.COSTS_FILE).write_text("{not json")
    monkeypatch.setattr(memory, "_MEASURED", {})
    assert memory.remembered_step_cost("k", measure) == StepCost(5, 123.5)  # re-measured
    assert len(calls) == 2


def test_tune_allocator_sets_the_mmap_threshold_unless_told_not_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On glibc the threshold is set (mallopt answers 1); the user's own setting, or
    IVVAE_TUNE_MALLOC=0, leaves the allocator alone."""
    import platform

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv(memory.ALLOCATOR_ENV, raising=False)
    assert memory.tune_allocator() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv(memory.ALLOCATOR_ENV, "0")
    assert memory.tune_allocator() is False
    monkeypatch.delenv(memory.ALLOCATOR_ENV)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.tune_allocator() is False


async def test_a_request_waits_for_a_slot_only_as_long_as_for_memory(
        tiny_weights: Path) -> None:  # noqa: F811
    # The max_concurrent_requests queue had no bound: behind a slow backend, requests
    # waited many request timeouts instead of a 503 the client can retry.
    from tests import media
    from tests.service_fixtures import running_app

    settings = tiny_settings(tiny_weights, max_concurrent_requests=1, admission_timeout_s=0.3)
    video = media.make_video(None, frames=5, width=16, height=16)
    async with running_app(settings) as client:
        pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
        await pipeline._slots.acquire()  # one request in flight
        try:
            busy = await asyncio.wait_for(client.post(
                "/encode", content=video, headers={"content-type": "video/mp4"}), 20)
        finally:
            pipeline._slots.release()
        free = await client.post("/encode", content=video, headers={"content-type": "video/mp4"})
    assert busy.status_code == 503 and busy.json()["error"] == "overloaded"
    assert busy.headers["retry-after"] == "1"
    assert free.status_code == 200
