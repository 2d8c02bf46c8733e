"""Keyframe-based temporal compression (KTC) staging: the image VAE inside the video VAE.

Stage 1 trains "the 2D half alone": every weight that writes the 2D (keyframe) half is kept
from reading the 3D half, by zeroing those weight blocks and their gradients. Then the
keyframe path (frame 0 -> 2D latent half -> keyframe RGB) is exactly an image VAE with half
the latent width, and the 3D half receives no gradient at all.

Stage 2 starts from those weights with the masks lifted: the cross blocks start at zero, so
the video VAE begins as the image VAE on keyframes (the KTC initialisation) while the 3D
GCConv half learns temporal compression from its initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..model.layers import PACHead, PerFrameConv, ResBlock2D, ResBlock3D, SepConv3d
from ..model.vae import IVVAE

Block = tuple[torch.Tensor, tuple[slice, ...]]


def _sep_2d(conv: SepConv3d, in_half: int) -> Block:
    """The 2D branch of a KTC conv reading a split input: mask its 3D-half input columns."""
    return conv.conv_2d.weight, (slice(None), slice(in_half, None))


def _all_conv(conv: PerFrameConv, half: int) -> Block:
    """A conv over all channels: mask [2D out rows, 3D in columns]."""
    return conv.weight, (slice(0, half), slice(half, None))


def cross_half_blocks(model: IVVAE) -> list[Block]:
    """Every weight block through which the 3D half feeds the 2D half."""
    cfg = model.cfg
    z, k = cfg.z_dim, cfg.half_z
    blocks: list[Block] = []

    def residuals(modules: Iterator[nn.Module]) -> None:
        for m in modules:
            if isinstance(m, ResBlock3D):
                blocks.append(_sep_2d(m.conv1, m.norm1.width))
                blocks.append(_sep_2d(m.conv2, m.norm2.width))
                if m.shortcut is not None:
                    blocks.append(_sep_2d(m.shortcut, m.norm1.width))
            elif isinstance(m, ResBlock2D):
                blocks.append(_all_conv(m.conv1, m.norm1.width))
                blocks.append(_all_conv(m.conv2, m.norm2.width))

    enc, dec = model.encoder, model.decoder
    residuals(iter(enc.downsamples))
    residuals(iter(enc.middle))
    head: PACHead = enc.head
    feat_half = enc.head_norm.width
    blocks.append((head.branch_0.weight, (slice(0, z), slice(feat_half, None))))
    for branch in head.dilated:
        assert isinstance(branch, PerFrameConv)
        blocks.append((branch.weight, (slice(0, z), slice(feat_half, None))))
    # fuse input = [first halves of 6 branches (2D) || second halves (3D)]
    blocks.append((head.fuse.weight, (slice(0, z), slice(6 * z, None))))
    blocks.append(_sep_2d(model.quant_conv, z))
    blocks.append(_sep_2d(model.post_quant_conv, k))
    top = dec.middle[0]
    assert isinstance(top, ResBlock2D)
    blocks.append((dec.conv_in.weight, (slice(0, top.norm1.width), slice(k, None))))
    residuals(iter(dec.middle))
    residuals(iter(dec.upsamples))
    blocks.append(_sep_2d(dec.head, dec.head_norm.width))
    return blocks


class KeyframeMask:
    """Keeps the cross-half blocks at zero during stage 1 (weights and gradients)."""

    def __init__(self, model: IVVAE) -> None:
        self.blocks = cross_half_blocks(model)

    @torch.no_grad()
    def zero_weights(self) -> None:
        for p, idx in self.blocks:
            p[idx] = 0

    @torch.no_grad()
    def zero_grads(self) -> None:
        for p, idx in self.blocks:
            if p.grad is not None:
                p.grad[idx] = 0
