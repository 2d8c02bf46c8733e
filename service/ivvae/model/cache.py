"""FeatureCache: the temporal state a GCConv network carries from one step to the next.

It is the last input frame of every group causal convolution, one tensor per slot (13 for
the encoder, 19 for the decoder), each ``(B, C, 1, H, W)``. Batch entries are independent
streams, so caches of several videos at the same size can be concatenated along the batch
dimension, stepped together, and split again.

Not to be confused with the service's ``ResultCache`` (stored latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FeatureCache:
    tensors: tuple[Tensor, ...]
    frames_seen: int  # input frames (encoder) or latent frames (decoder) consumed so far

    @property
    def batch_size(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @staticmethod
    def concat(caches: Sequence[FeatureCache]) -> FeatureCache:
        """Stack independent streams along the batch dimension (same sizes, same position
        kind). ``frames_seen`` may differ per stream; the result keeps the first one's."""
        if not caches:
            raise ValueError("no caches to concatenate")
        if len({len(c.tensors) for c in caches}) != 1:
            raise ValueError("caches come from different networks")
        slots = zip(*(c.tensors for c in caches), strict=True)
        return FeatureCache(tuple(torch.cat(s, dim=0) for s in slots), caches[0].frames_seen)

    def split(self, sizes: Sequence[int] | None = None) -> list[FeatureCache]:
        """Inverse of ``concat``: one cache per stream (``sizes`` = batch sizes, default 1)."""
        sizes = list(sizes) if sizes is not None else [1] * self.batch_size
        parts = [t.split(sizes, dim=0) for t in self.tensors]
        return [
            FeatureCache(tuple(p[i] for p in parts), self.frames_seen) for i in range(len(sizes))
        ]

    def to(self, device: torch.device | str) -> FeatureCache:
        return FeatureCache(tuple(t.to(device) for t in self.tensors), self.frames_seen)
