"""IV-VAE building blocks: split norms, GCConv, KTC convolutions, attention, resamplers, PAC.

Layout everywhere: channels-first 5-D ``(B, C, T, H, W)``. A feature with ``2C`` channels is
two halves: ``[0, C)`` the 2D (keyframe) half and ``[C, 2C)`` the 3D (temporal) half.

Temporal state. Every block has the same call signature so that the networks can iterate
over them (and TorchScript can compile that loop)::

    y, new_cache = block(x, cache, first)

``first`` is True for the stream's first call (one frame, the image path); ``cache`` is the
list of this block's cache tensors from the previous call (empty when ``first``), and
``new_cache`` the list to pass next time. A cache tensor is the last input frame of a group
causal convolution, ``(B, C, 1, H, W)``. Blocks without temporal state take and return ``[]``.

Per-frame 2-D convolutions are written as 3-D convolutions with a temporal kernel of 1 so
that tensors never leave the 5-D layout (no (B*T) folding copies).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-12


def _conv_param(co: int, ci: int, *kernel: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight and bias initialised like torch's default conv init (kaiming-uniform)."""
    weight = nn.Parameter(torch.empty(co, ci, *kernel))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = ci * math.prod(kernel)
    bound = 1.0 / math.sqrt(fan_in)
    bias = nn.Parameter(torch.empty(co).uniform_(-bound, bound))
    return weight, bias


class GroupRMSNorm(nn.Module):
    """RMS norm over channels, each half separately, scaled by sqrt(per-half width).

    ``gamma`` is ``[2C, 1, 1, 1]`` (the official shape); there is no bias.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.scale = math.sqrt(width)
        self.gamma = nn.Parameter(torch.ones(2 * width, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        halves = x.reshape(b, 2, self.width, t, h, w)  # (B, 2, C, T, H, W)
        y = F.normalize(halves, dim=2, eps=NORM_EPS).reshape(b, 2 * self.width, t, h, w)
        return y * self.scale * self.gamma


class PerFrameConv(nn.Module):
    """A 2-D convolution applied to every frame. Weight ``[Co, Ci, k, k]`` (official shape)."""

    def __init__(self, ci: int, co: int, kernel: int, *, stride: int = 1, dilation: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        self.weight, self.bias = _conv_param(co, ci, kernel, kernel)
        pad = dilation * (kernel // 2) if padding is None else padding
        self.padding = (0, pad, pad)
        self.stride = (1, stride, stride)
        self.dilation = (1, dilation, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, self.stride, self.padding,
                        self.dilation)


class GroupCausalConv3d(nn.Module):
    """GCConv: a 3x3x3 conv, ordinary inside a frame group, causal between groups.

    Frame 0 of a stream is seen alone (``prev is None``) through the stack ``[x, x, 0]``.
    Later calls carry ``T = G * group`` frames and the previous call's last input frame
    ``prev``; each group ``g`` is convolved over ``[left_g, x_g0 .. x_g(group-1), 0]`` where
    ``left_0 = prev`` and ``left_g`` is the last frame of group ``g - 1``.
    """

    def __init__(self, ci: int, co: int, group: int) -> None:
        super().__init__()
        self.weight, self.bias = _conv_param(co, ci, 3, 3, 3)
        self.group = group

    def forward(self, x: Tensor, prev: Tensor | None) -> Tensor:
        if prev is None:
            stack = torch.cat([x, x, torch.zeros_like(x)], dim=2)  # (B, C, 3, H, W)
            return F.conv3d(stack, self.weight, self.bias, padding=(0, 1, 1))
        b, c, t, h, w = x.shape
        g = self.group
        n = t // g
        if n * g != t:
            raise ValueError(f"GCConv needs a multiple of {g} frames, got {t}")
        left = torch.cat([prev, x[:, :, g - 1 : t - 1 : g]], dim=2)  # (B, C, G, H, W)
        stack = torch.cat(
            [left.unsqueeze(3), x.reshape(b, c, n, g, h, w), x.new_zeros(b, c, n, 1, h, w)],
            dim=3,
        )  # (B, C, G, g + 2, H, W)
        if n > 1:
            stack = stack.transpose(1, 2)
        stack = stack.reshape(b * n, c, g + 2, h, w)
        y = F.conv3d(stack, self.weight, self.bias, padding=(0, 1, 1))  # (B*G, Co, g, H, W)
        co = y.shape[1]
        if n > 1:
            return y.reshape(b, n, co, g, h, w).transpose(1, 2).reshape(b, co, t, h, w)
        return y.reshape(b, co, t, h, w)


class PointwiseConv3d(nn.Module):
    """1x1x1 conv. Weight ``[Co, Ci, 1, 1, 1]``."""

    def __init__(self, ci: int, co: int) -> None:
        super().__init__()
        self.weight, self.bias = _conv_param(co, ci, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv3d(x, self.weight, self.bias)


class SepConv3d(nn.Module):
    """KTC convolution: ``[per-frame conv2d(x) || GCConv(x)]``; both read all channels.

    ``kernel`` 3 (cached, group-causal) or 1 (pointwise, stateless).
    """

    def __init__(self, ci: int, co: int, kernel: int, group: int = 1) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv_2d = PerFrameConv(ci, co, kernel)
        if kernel == 3:
            self.conv_3d: nn.Module = GroupCausalConv3d(ci, co, group)
        elif kernel == 1:
            self.conv_3d = PointwiseConv3d(ci, co)
        else:
            raise ValueError(f"SepConv3d kernel must be 1 or 3, got {kernel}")

    def forward(self, x: Tensor, prev: Tensor | None) -> Tensor:
        if self.kernel == 3:
            y3 = self.conv_3d(x, prev)
        else:
            y3 = self.conv_3d(x)
        return torch.cat([self.conv_2d(x), y3], dim=1)


def _last_frame(x: Tensor) -> Tensor:
    """The cache entry for a conv whose input is ``x``: its last frame, detached storage."""
    return x[:, :, -1:].contiguous() if x.shape[2] > 1 else x


class ResBlock3D(nn.Module):
    """Pre-activation residual block with two cached KTC convs (2 cache slots)."""

    num_slots: int = 2

    def __init__(self, ci: int, co: int, group: int) -> None:
        super().__init__()
        self.norm1 = GroupRMSNorm(ci)
        self.conv1 = SepConv3d(2 * ci, co, 3, group)
        self.norm2 = GroupRMSNorm(co)
        self.conv2 = SepConv3d(2 * co, co, 3, group)
        self.shortcut: SepConv3d | None = SepConv3d(2 * ci, co, 1) if ci != co else None

    def forward(self, x: Tensor, cache: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        h = F.silu(self.norm1(x))
        c1 = _last_frame(h)
        h = self.conv1(h, None if first else cache[0])
        h = F.silu(self.norm2(h))
        c2 = _last_frame(h)
        h = self.conv2(h, None if first else cache[1])
        shortcut = self.shortcut
        s = x if shortcut is None else shortcut(x, None)
        return h + s, [c1, c2]


class ResBlock2D(nn.Module):
    """Residual block of per-frame convs over all channels; no temporal state."""

    num_slots: int = 0

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = GroupRMSNorm(width)
        self.conv1 = PerFrameConv(2 * width, 2 * width, 3)
        self.norm2 = GroupRMSNorm(width)
        self.conv2 = PerFrameConv(2 * width, 2 * width, 3)

    def forward(self, x: Tensor, cache: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h, []


class FrameAttention(nn.Module):
    """Single-head self-attention over the H*W pixels of each frame, on one C-channel half."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.norm_scale = math.sqrt(width)
        self.norm_gamma = nn.Parameter(torch.ones(width, 1, 1))
        self.to_qkv = PerFrameConv(width, 3 * width, 1)
        self.proj = PerFrameConv(width, width, 1)

    def forward(self, u: Tensor) -> Tensor:
        b, c, t, h, w = u.shape
        n = F.normalize(u, dim=1, eps=NORM_EPS) * self.norm_scale * self.norm_gamma.unsqueeze(1)
        qkv = self.to_qkv(n)  # (B, 3C, T, H, W)
        tokens = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, 3 * c)
        q, k, v = tokens.split(c, dim=2)  # each (B*T, HW, C)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
        return u + self.proj(o)


class Attention(nn.Module):
    """Per-half attention: separate weights for the 2D and the 3D half."""

    num_slots: int = 0

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.attn_2d = FrameAttention(width)
        self.attn_3d = FrameAttention(width)

    def forward(self, x: Tensor, cache: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        c = self.width
        return torch.cat([self.attn_2d(x[:, :c]), self.attn_3d(x[:, c:])], dim=1), []


class Downsample(nn.Module):
    """Spatial /2 per half (pad right/bottom by 1, 3x3 stride-2 conv); optionally time /2.

    Temporal reduction (not on the first call): the 2D half keeps the first frame of each
    pair (keyframe selection), the 3D half mixes each pair with a (2,1,1) stride-2 conv.
    """

    num_slots: int = 0

    def __init__(self, width: int, temporal: bool) -> None:
        super().__init__()
        self.width = width
        self.temporal = temporal
        self.conv_2d = PerFrameConv(width, width, 3, stride=2, padding=0)
        self.conv_3d = PerFrameConv(width, width, 3, stride=2, padding=0)
        self.time_conv: nn.Conv3d | None = None
        if temporal:
            self.time_conv = nn.Conv3d(width, width, (2, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        c = self.width
        a = x[:, :c]
        b = x[:, c:]
        time_conv = self.time_conv
        reduce_time = time_conv is not None and not first
        if reduce_time:
            # Keyframe selection commutes with the per-frame spatial conv: select first.
            a = a[:, :, 0 : 2 * (a.shape[2] // 2) : 2]
        a = self.conv_2d(F.pad(a, (0, 1, 0, 1)))
        b = self.conv_3d(F.pad(b, (0, 1, 0, 1)))
        if reduce_time and time_conv is not None:
            b = time_conv(b)
        return torch.cat([a, b], dim=1), []


class Upsample(nn.Module):
    """Optionally time x2, then space x2 (nearest) and a 3x3 conv halving each half's width.

    Temporal doubling (not on the first call): the 2D half repeats each frame; the 3D half
    goes through a pointwise conv to 2C channels whose halves are the even and odd frames.
    """

    num_slots: int = 0

    def __init__(self, width: int, temporal: bool) -> None:
        super().__init__()
        self.width = width
        self.temporal = temporal
        self.conv_2d = PerFrameConv(width, width // 2, 3)
        self.conv_3d = PerFrameConv(width, width // 2, 3)
        self.time_conv: nn.Conv3d | None = None
        if temporal:
            self.time_conv = nn.Conv3d(width, 2 * width, 1)

    def forward(self, x: Tensor, cache: list[Tensor], first: bool) -> tuple[Tensor, list[Tensor]]:
        c = self.width
        a = x[:, :c]
        b = x[:, c:]
        time_conv = self.time_conv
        if time_conv is not None and not first:
            bt, _, t, h, w = b.shape
            a = a.repeat_interleave(2, dim=2)
            u = time_conv(b).reshape(bt, 2, c, t, h, w)  # [even frames; odd frames]
            b = u.permute(0, 2, 3, 1, 4, 5).reshape(bt, c, 2 * t, h, w)
        a = F.interpolate(a, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        b = F.interpolate(b, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return torch.cat([self.conv_2d(a), self.conv_3d(b)], dim=1), []


PAC_DILATIONS = (1, 3, 6, 9, 12)


class PACHead(nn.Module):
    """Parallel atrous convolutions: 1x1 + 3x3 at dilations 1, 3, 6, 9, 12, then a 1x1 fuse.

    Branch outputs are concatenated half-wise: all first halves (2D z) in branch order, then
    all second halves (3D z).
    """

    def __init__(self, ci: int, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.branch_0 = PerFrameConv(ci, 2 * z_dim, 1)
        self.dilated = nn.ModuleList(
            [PerFrameConv(ci, 2 * z_dim, 3, dilation=d) for d in PAC_DILATIONS]
        )
        self.fuse = PerFrameConv(12 * z_dim, 2 * z_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        z = self.z_dim
        outs = [self.branch_0(x)]
        for branch in self.dilated:
            outs.append(branch(x))
        firsts = [o[:, :z] for o in outs]
        seconds = [o[:, z:] for o in outs]
        return self.fuse(torch.cat(firsts + seconds, dim=1))
