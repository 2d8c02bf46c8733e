"""FeatureCache: the temporal state a GCConv network carries from one step to the next.

It is the last input frame of every group causal convolution, one tensor per slot (13 for
the encoder, 19 for the decoder, as the network's layers are counted), each
``(B, C, 1, H, W)``. Batch entries are independent streams, so caches of several videos at
the same size can be concatenated along the batch dimension, stepped together, and split
again: what the step engine (``ivvae.core.steps.SequenceTable``) does through
:func:`concat_slots` / :func:`split_slots`.

Not to be confused with the service's ``ResultCache`` (stored latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def concat_slots(caches: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Slot lists of several streams stacked along the batch dimension (same sizes)."""
    if not caches:
        raise ValueError("no caches to concatenate")
    if len({len(c) for c in caches}) != 1:
        raise ValueError("caches come from different networks")
    if len(caches) == 1:
        return list(caches[0])
    return [torch.cat(slot, dim=0) for slot in zip(*caches, strict=True)]


def split_slots(cache: Sequence[Tensor], n: int) -> list[list[Tensor]]:
    """Inverse of :func:`concat_slots` for ``n`` streams of batch 1.

    Copies, not views: a view would keep the whole batch's cache alive.
    """
    if n == 1:
        return [list(cache)]
    return [[t[b : b + 1].clone() for t in cache] for b in range(n)]


@dataclass(frozen=True)
class FeatureCache:
    tensors: tuple[Tensor, ...]

    @property
    def batch_size(self) -> int:
        return int(self.tensors[0].shape[0]) if self.tensors else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @staticmethod
    def concat(caches: Sequence[FeatureCache]) -> FeatureCache:
        """Stack independent streams along the batch dimension (same sizes)."""
        return FeatureCache(tuple(concat_slots([c.tensors for c in caches])))

    def split(self) -> list[FeatureCache]:
        """Inverse of ``concat``: one cache per stream of batch 1."""
        return [FeatureCache(tuple(s)) for s in split_slots(self.tensors, self.batch_size)]
