"""Precision names (``ivvae.core.names.PRECISIONS``) as torch dtypes."""

from __future__ import annotations

import torch

from ..core.names import PRECISIONS

_DTYPES: dict[str, torch.dtype] = dict(
    zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16), strict=True))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name; ``ValueError`` naming the choices."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}") from None

