"""ivvae.core.steps: the step engine: per-sequence caches, batching, errors, time-to-live.

A numpy stand-in for the exported steps keeps these tests fast and exact: its "moments" are
the running sum of every frame value the sequence has sent, so a cache mixed up between
sequences, lost, or applied twice shows in the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from ivvae.core.artifacts import CacheSlot, ExportManifest
from ivvae.core.steps import Cache, ErrorKind, SequenceTable, StepRequest
from ivvae.model.artifacts import ArtifactSteps

Z = 2


def manifest() -> ExportManifest:
    return ExportManifest(
        format="onnx", model={"z_dim": Z, "weights_sha256": "0" * 64}, files={},
        cache_slots={"encoder": [CacheSlot(1, 1)], "decoder": [CacheSlot(1, 1)]},
        ivvae_version="test", torch_version="none",
    )


class RunningSum(ArtifactSteps):
    """Cache: per video the sum of all inputs so far. Output: that sum, shaped like moments
    (encoder) or frames (decoder)."""

    def __init__(self, direction: str = "encoder", fail: bool = False,
                 poison: int | None = None) -> None:
        super().__init__(manifest(), direction)  # type: ignore[arg-type]
        self.batches: list[tuple[str, int]] = []
        self.fail = fail
        self.poison = poison  # a batch holding this frame value fails

    def _step(self, kind: str, x: np.ndarray, total: np.ndarray) -> tuple[list[np.ndarray],
                                                                          Cache]:
        if self.fail or (self.poison is not None and (x == self.poison).any()):
            raise RuntimeError("out of memory")
        self.batches.append((kind, len(x)))
        total = total + x.reshape(len(x), -1).astype(np.float64).sum(axis=1)
        b = len(x)
        if self.direction == "encoder":
            mu = np.broadcast_to(total[:, None, None, None, None], (b, Z, 1, 1, 1))
            return [mu.astype(np.float32), -mu.astype(np.float32)], [total]
        frames = np.broadcast_to(total[:, None, None, None, None] % 256, (b, 1, 8, 8, 3))
        return [frames.astype(self.frames_dtype)], [total]

    def _run(self, step: str, x: np.ndarray, cache: Cache, frames_dtype: str = "uint8"
             ) -> tuple[list[np.ndarray], Cache]:
        self.frames_dtype = frames_dtype
        return self._step(step, x, cache[0] if step == "next" else np.zeros(len(x)))

    def concat(self, caches: Sequence[Cache]) -> Cache:
        return [np.concatenate([c[0] for c in caches])]

    def split(self, cache: Cache, n: int) -> list[Cache]:
        return [[cache[0][b : b + 1].copy()] for b in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frames(t: int, value: int = 1, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((1, t, h, w, 3), value, dtype=np.uint8)


def per_frame(value: int, t: int, h: int = 8, w: int = 8) -> float:
    return float(value * t * h * w * 3)


def total(result: object) -> float:
    outputs = result.outputs  # type: ignore[attr-defined]
    return float(outputs[0].ravel()[0])


def test_steps_of_equal_size_run_as_one_batch_and_keep_their_own_cache() -> None:
    steps = RunningSum()
    table = SequenceTable(steps, ttl_s=10)
    starts = table.execute([StepRequest(c, start=True, array=frames(1, c)) for c in (1, 2, 3)])
    assert [total(r) for r in starts] == [per_frame(c, 1) for c in (1, 2, 3)]
    # arrival order differs from the first step's; sizes differ for sequence 3
    nexts = table.execute([
        StepRequest(3, array=frames(8, 1)),
        StepRequest(2, array=frames(4, 5)),
        StepRequest(1, array=frames(4, 7)),
    ])
    assert [total(r) for r in nexts] == [
        per_frame(3, 1) + per_frame(1, 8), per_frame(2, 1) + per_frame(5, 4),
        per_frame(1, 1) + per_frame(7, 4),
    ]
    assert steps.batches == [("first", 3), ("next", 1), ("next", 2)]
    assert nexts[0].outputs[1].shape == (1, Z, 1, 1, 1)
    assert len(table) == 3


def test_decoder_steps_are_batched_by_frames_dtype() -> None:
    """Videos asking for uint8 and float32 frames never share a batch; each gets its own."""
    steps = RunningSum("decoder")
    table = SequenceTable(steps, ttl_s=10)
    z = np.ones((1, Z, 1, 1, 1), np.float32)
    results = table.execute([StepRequest(c, start=True, array=z * c,
                                         frames_dtype="float32" if c % 2 else "uint8")
                             for c in (1, 2, 3)])
    assert sorted(steps.batches) == [("first", 1), ("first", 2)]
    assert [r.outputs[0].dtype for r in results] == [np.float32, np.uint8, np.float32]
    bad = table.execute([StepRequest(4, start=True, array=z,
                                     frames_dtype="float64")])  # type: ignore[arg-type]
    assert bad[0].kind is ErrorKind.INVALID and "frames_dtype" in bad[0].error
    enc = SequenceTable(RunningSum(), ttl_s=10).execute(
        [StepRequest(1, start=True, array=frames(1), frames_dtype="float32")])
    assert enc[0].kind is ErrorKind.INVALID and "encoder" in enc[0].error


def test_a_bad_request_fails_alone() -> None:
    table = SequenceTable(RunningSum(), ttl_s=10)
    table.execute([StepRequest(c, start=True, array=frames(1)) for c in (1, 2, 3, 4)])
    results = table.execute([
        StepRequest(1, array=frames(3)),  # not a multiple of 4
        StepRequest(2, array=frames(4, h=16)),  # size changed mid-sequence
        StepRequest(3, array=None),  # no data
        StepRequest(4, array=frames(4)),
        StepRequest(5, array=frames(4)),  # never started
    ])
    kinds = [r.kind for r in results]
    assert kinds == [ErrorKind.INVALID, ErrorKind.INVALID, ErrorKind.INVALID, None,
                     ErrorKind.LOST]
    assert "multiple of 4" in results[0].error and "size changed" in results[1].error
    assert "sequence 5 has no state" in results[4].error
    # the failed steps changed nothing: the sequences go on
    again = table.execute([StepRequest(1, array=frames(4))])
    assert total(again[0]) == per_frame(1, 1) + per_frame(1, 4)


@pytest.mark.parametrize(("shape", "message"), [
    ((1, 2, 8, 8, 3), "first step takes 1 frame"),
    ((1, 1, 12, 8, 3), "multiples of 8"),
    ((1, 1, 8, 8, 4), "multiples of 8"),
    ((2, 1, 8, 8, 3), "batch 1"),
])
def test_encoder_input_checks(shape: tuple[int, ...], message: str) -> None:
    table = SequenceTable(RunningSum(), ttl_s=10)
    (result,) = table.execute([StepRequest(9, start=True, array=np.zeros(shape, np.uint8))])
    assert result.kind is ErrorKind.INVALID and message in result.error
    assert len(table) == 0


def test_decoder_checks_channels_and_finiteness() -> None:
    table = SequenceTable(RunningSum("decoder"), ttl_s=10)
    ok, wrong_z, nan = table.execute([
        StepRequest(1, start=True, array=np.ones((1, Z, 1, 1, 1), np.float32)),
        StepRequest(2, start=True, array=np.ones((1, Z + 1, 1, 1, 1), np.float32)),
        StepRequest(3, start=True, array=np.full((1, Z, 1, 1, 1), np.nan, np.float32)),
    ])
    assert ok.kind is None and ok.outputs[0].shape == (1, 1, 8, 8, 3)
    assert wrong_z.kind is ErrorKind.INVALID and "channels" in wrong_z.error
    assert nan.kind is ErrorKind.INVALID and "NaN" in nan.error
    assert len(ok.outputs) == 1


def test_end_and_release_free_the_state_and_start_resets_it() -> None:
    table = SequenceTable(RunningSum(), ttl_s=10)
    table.execute([StepRequest(c, start=True, array=frames(1)) for c in (1, 2)])
    ended, released = table.execute([StepRequest(1, end=True, array=frames(4)),
                                     StepRequest(2, end=True, release=True)])
    assert ended.kind is None and total(ended) == per_frame(1, 5)
    assert released.kind is None and released.outputs == []
    assert len(table) == 0
    # releasing an unknown sequence is harmless; START on a live sequence starts afresh
    assert table.execute([StepRequest(7, end=True, release=True)])[0].kind is None
    table.execute([StepRequest(3, start=True, array=frames(1, 9))])
    (restarted,) = table.execute([StepRequest(3, start=True, array=frames(1, 2))])
    assert total(restarted) == per_frame(2, 1)


def test_two_steps_of_one_sequence_in_one_call_run_in_order() -> None:
    steps = RunningSum()
    table = SequenceTable(steps, ttl_s=10)
    first, second = table.execute([StepRequest(1, start=True, array=frames(1)),
                                   StepRequest(1, array=frames(4))])
    assert total(first) == per_frame(1, 1) and total(second) == per_frame(1, 5)
    assert steps.batches == [("first", 1), ("next", 1)]


def test_idle_sequences_are_evicted_after_the_ttl() -> None:
    clock = Clock()
    table = SequenceTable(RunningSum(), ttl_s=5, clock=clock)
    table.execute([StepRequest(c, start=True, array=frames(1)) for c in (1, 2)])
    clock.now = 4
    table.execute([StepRequest(2, array=frames(4))])
    clock.now = 6  # sequence 1 idle for 6 s, sequence 2 for 2 s
    assert table.evict_expired() == [1]
    assert 1 not in table and 2 in table and table.evicted == 1
    clock.now = 20  # a sequence whose step is being executed is not evicted first
    (late,) = table.execute([StepRequest(2, array=frames(4))])
    assert late.kind is None and total(late) == per_frame(1, 9)
    (lost,) = table.execute([StepRequest(1, array=frames(4))])
    assert lost.kind is ErrorKind.LOST and "idle for more than 5 s" in lost.error


def test_a_step_that_always_fails_fails_each_member_and_keeps_the_state() -> None:
    steps = RunningSum()
    table = SequenceTable(steps, ttl_s=10)
    table.execute([StepRequest(c, start=True, array=frames(1)) for c in (1, 2)])
    steps.fail = True
    results = table.execute([StepRequest(c, array=frames(4)) for c in (1, 2)])
    assert [r.kind for r in results] == [ErrorKind.INTERNAL] * 2
    assert "out of memory" in results[0].error
    steps.fail = False
    (ok,) = table.execute([StepRequest(1, array=frames(4))])
    assert total(ok) == per_frame(1, 5)


def test_a_failing_member_is_retried_alone_and_the_others_succeed() -> None:
    steps = RunningSum(poison=9)
    table = SequenceTable(steps, ttl_s=10)
    table.execute([StepRequest(c, start=True, array=frames(1)) for c in (1, 2, 3)])
    good1, bad, good3 = table.execute([StepRequest(1, array=frames(4)),
                                       StepRequest(2, array=frames(4, 9)),
                                       StepRequest(3, array=frames(4, 2))])
    assert bad.kind is ErrorKind.INTERNAL and "out of memory" in bad.error
    assert good1.kind is None and total(good1) == per_frame(1, 5)
    assert good3.kind is None and total(good3) == per_frame(1, 1) + per_frame(2, 4)
    # the batch of 3 failed, then each member ran alone
    assert steps.batches[-2:] == [("next", 1), ("next", 1)]
    # the failed member keeps its state and goes on
    (again,) = table.execute([StepRequest(2, array=frames(4))])
    assert total(again) == per_frame(1, 5)
