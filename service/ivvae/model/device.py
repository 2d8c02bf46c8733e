"""Device names, checked in one place: a typo, or a GPU this torch cannot use, is an error
naming the device before any weights are loaded (torch's own errors for these are an
assertion deep in a ``.to()``, or a list of every device type it knows)."""

from __future__ import annotations

import torch


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device, whether or not this process has it."""
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {name!r}") from None


def torch_device(name: str) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``, ...) as a device this process can use."""
    device = parse_device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA "
                             "GPU; use cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA "
                             "GPUs (cuda:0 ...)")
    return device
