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



def cpu_bfloat16_is_emulated() -> bool:
    """Whether bfloat16 math on this CPU is emulated (no AVX512-BF16 or AMX): there one
    bfloat16 step of the model takes tens of times a float32 one (a 9-frame eval, 8 minutes
    against 13 s on an AVX2 machine)."""
    try:  # (oneDNN's own "bf16 supported" says yes to any AVX512 CPU, emulating it there)
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # a torch without these checks: assume the worst
        return True
