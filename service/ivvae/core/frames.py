"""Float video in [-1, 1] as the 8-bit frames the model reads: one check and one rounding
for every door that takes float frames (an HTTP tensor body, the Python client)."""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInput

# Float frames past this are another scale, not [-1, 1]; up to it they are clipped (a
# decoder's output, not clamped, overshoots [-1, 1] a little).
FLOAT_FRAME_BOUND = 1.25


def uint8_frames(x: np.ndarray) -> np.ndarray:
    """``(..., 3, T, H, W)`` float in [-1, 1] -> ``(..., T, H, W, 3)`` uint8, rounded as the
    decoder's frames are (``round((x + 1) * 127.5)``). Refused (``InvalidInput``): no
    values, non-finite values, and values past ``FLOAT_FRAME_BOUND`` (a [0, 255] or
    [0, 1] video clipped to [-1, 1] would be encoded as a washed-out one, silently)."""
    refuse_empty(x)
    # Checked in the caller's dtype: a float64 past float32's range is out of range, not inf.
    if not np.isfinite(x).all():
        raise InvalidInput("the video has non-finite values (NaN or inf)")
    low, high = float(x.min()), float(x.max())
    if low < -FLOAT_FRAME_BOUND or high > FLOAT_FRAME_BOUND:
        raise InvalidInput(
            f"the video's values span [{low:.4g}, {high:.4g}]; float frames are in [-1, 1] "
            "(from [0, 255]: x / 127.5 - 1; from [0, 1]: x * 2 - 1)")
    # One float32 working copy, changed in place (the caller's array is left as it is).
    work = x.astype(np.float32, copy=True)
    np.clip(work, -1.0, 1.0, out=work)
    work += 1.0
    work *= 127.5
    np.rint(work, out=work)
    return np.ascontiguousarray(np.moveaxis(work, -4, -1), dtype=np.uint8)


def refuse_empty(video: np.ndarray) -> None:
    """``InvalidInput`` for a video of any layout with no frames or no pixels."""
    if video.size == 0:
        raise InvalidInput(f"the video has no frames or no pixels: shape {list(video.shape)}")
