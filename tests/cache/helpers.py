"""Entries for the cache tests: small random moments with a little meta."""

from __future__ import annotations

import numpy as np

from ivvae.cache import CachedMoments, deserialize, serialize

SMALL_SHAPE = (1, 4, 2, 3, 5)  # (1, z, n, h, w)
SECRET = b"tests-cache-secret-0123456789"
KEY = "k"


def seal(value: CachedMoments, key: str = KEY, secret: bytes = SECRET) -> bytes:
    return serialize(value, secret=secret, key=key)


def unseal(blob: object, key: str = KEY, secret: bytes = SECRET) -> CachedMoments:
    return deserialize(blob, secret=secret, key=key)  # type: ignore[arg-type]


def moments(seed: int = 0, shape: tuple[int, ...] = SMALL_SHAPE) -> CachedMoments:
    rng = np.random.default_rng(seed)
    return CachedMoments(
        mu=rng.standard_normal(shape, dtype=np.float32),
        logvar=rng.standard_normal(shape, dtype=np.float32) - 3.0,
        meta={
            "num_frames": str(1 + 4 * (shape[2] - 1)),
            "fps": "30000/1001",
            "seed": f"{seed:08d}",
        },
    )


def assert_same(actual: CachedMoments | None, expected: CachedMoments) -> None:
    """Bit-identical arrays (NaN-free by construction) and equal meta."""
    assert actual is not None
    for name in ("mu", "logvar"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert got.tobytes() == want.tobytes(), name
    assert dict(actual.meta) == dict(expected.meta)
