"""Two jobs that open one new output at the same instant, in two processes (the check and
the creation of the job file must be one step, or both jobs go on writing into it)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
from concurrent.futures import ProcessPoolExecutor
from typing import Any

_barrier: Any = None


def _init(barrier: multiprocessing.synchronize.Barrier) -> None:
    global _barrier
    _barrier = barrier


def _open(out_url: str, resize: int) -> str:
    from ivvae.dataset import ClipOptions, DatasetError
    from ivvae.dataset.job import JobConfig, ModelIdentity
    from ivvae.dataset.state import open_output

    config = JobConfig("parquet", ClipOptions(preprocess=f"resize={resize}"),
                       ModelIdentity("tiny", "0" * 64, "float32"))
    _barrier.wait(timeout=30)
    try:
        open_output(out_url, config)
    except DatasetError:
        return "refused"
    return "owner"


def race(out_urls: list[str]) -> list[list[str]]:
    """For each URL, two different jobs open it together: what each got."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init,
                             initargs=(barrier,)) as pool:
        results = []
        for url in out_urls:
            a, b = pool.submit(_open, url, 32), pool.submit(_open, url, 48)
            results.append(sorted([a.result(), b.result()]))
        return results
