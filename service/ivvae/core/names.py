"""Names and defaults that settings, files and every transport share."""

from __future__ import annotations

from typing import Literal, get_args

# Compute precisions of the model and stored dtypes of latent files: one list for both.
Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

# H.264 quality of decoded MP4s (libx264 crf: lower is better).
DEFAULT_CRF = 18
CRF_RANGE = (0, 51)
