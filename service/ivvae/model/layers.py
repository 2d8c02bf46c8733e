"""IV-VAE building blocks: split norms, GCConv, KTC convolutions, attention, resamplers, PAC.

Layout everywhere: 5-D ``(B, C, T, H, W)`` shapes. A feature with ``2C`` channels is two
halves: ``[0, C)`` the 2D (keyframe) half and ``[C, 2C)`` the 3D (temporal) half.

Memory format. The networks keep activations in ``torch.channels_last_3d`` (memory order
``B, T, H, W, C``): oneDNN's convolutions are fastest on it, and in that order the frames of a
clip are consecutive blocks of memory. So folding time into the batch for per-frame 2-D
convolutions, splitting the channels into halves for the norms, and laying out the padded
GCConv frame stacks are all views or a single copy. Every op here is correct for any memory
format (``reshape`` copies where a view is impossible); the layout only decides the speed.

Temporal state. Every block has the same call signature so that the networks can iterate
over them::

    y, new_cache = block(x, cache, first)

``first`` is True for the stream's first call (one frame, the image path); ``cache`` is the
list of this block's cache tensors from the previous call (empty when ``first``), and
``new_cache`` the list to pass next time. A cache tensor is the last input frame of a group
causal convolution, ``(B, C, 1, H, W)``. Blocks without temporal state take and return ``[]``.

In-place arithmetic is used on freshly made intermediates only, and only where autograd does
not need the overwritten values (``_needs_grad``), so training works unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-12
CHANNELS_LAST = torch.channels_last_3d


def _conv_param(co: int, ci: int, *kernel: int) -> tuple[nn.Parameter, nn.Parameter]:
    """Weight and bias initialised like torch's default conv init (kaiming-uniform)."""
    weight = nn.Parameter(torch.empty(co, ci, *kernel))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = ci * math.prod(kernel)
    bound = 1.0 / math.sqrt(fan_in)
    bias = nn.Parameter(torch.empty(co).uniform_(-bound, bound))
    return weight, bias


def _onnx() -> bool:
    """Whether this run is being traced for ONNX, which has no notion of memory formats."""
    return torch.onnx.is_in_onnx_export()


def channels_last(x: Tensor) -> Tensor:
    """``x`` (B, C, T, H, W) in the networks' working memory format (no copy if it is)."""
    return x if _onnx() else x.contiguous(memory_format=CHANNELS_LAST)


def to_frames(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W): time folded into the batch (a view if channels-last)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(y: Tensor, batch: int) -> Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W): the inverse of ``to_frames``."""
    n, c, h, w = y.shape
    return y.reshape(batch, n // batch, c, h, w).transpose(1, 2)


def _needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records ops on these tensors (then no in-place shortcuts)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rms_norm(x: Tensor, dim: int, gain: Tensor, silu: bool, inplace: bool = False) -> Tensor:
    """``x / max(||x||_2 over dim, eps) * gain``, optionally followed by SiLU.

    The same arithmetic as ``F.normalize(x) * gain``. Without autograd, the product and SiLU
    overwrite the quotient, and ``inplace`` (for an ``x`` the caller made and no longer
    needs) overwrites ``x`` itself: on large activations a fresh output costs more (page
    faults) than the arithmetic.
    """
    denom = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(NORM_EPS)
    if _needs_grad(x, gain):
        y = x / denom * gain
        return F.silu(y) if silu else y
    y = x.div_(denom) if inplace else torch.div(x, denom)
    y = y.mul_(gain)
    return F.silu(y, inplace=True) if silu else y


def _last_frame(x: Tensor) -> Tensor:
    """The cache entry for a conv whose input is ``x``: its last frame, in its own storage
    (a view would keep the whole input alive)."""
    if x.shape[2] == 1:
        return x
    last = x[:, :, -1:]
    return last.clone() if _onnx() else last.clone(memory_format=CHANNELS_LAST)


class GroupRMSNorm(nn.Module):
    """RMS norm over channels, each half separately, scaled by sqrt(per-half width).

    ``gamma`` is ``[2C, 1, 1, 1]`` (the official shape); there is no bias. Every use in the
    network is followed by SiLU, which ``forward(x, silu=True)`` fuses in. ``inplace``:
    ``x`` is a fresh intermediate that may be overwritten (ignored when autograd records).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.scale = math.sqrt(width)
        self.gamma = nn.Parameter(torch.ones(2 * width, 1, 1, 1))

    def forward(self, x: Tensor, silu: bool = False, inplace: bool = False) -> Tensor:
        b, _, t, h, w = x.shape
        # Channels last: the two halves are the last two axes, a view of x's memory.
        halves = x.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, self.width)
        gain = (self.gamma * self.scale).reshape(2, self.width)
        y = _rms_norm(halves, -1, gain, silu, inplace)  # (B, T, H, W, 2, C)
        return y.reshape(b, t, h, w, 2 * self.width).permute(0, 4, 1, 2, 3)


class PerFrameConv(nn.Module):
    """A 2-D convolution applied to every frame. Weight ``[Co, Ci, k, k]`` (official shape)."""

    def __init__(self, ci: int, co: int, kernel: int, *, stride: int = 1, dilation: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        self.weight, self.bias = _conv_param(co, ci, kernel, kernel)
        self.padding = dilation * (kernel // 2) if padding is None else padding
        self.stride = stride
        self.dilation = dilation

    def frames(self, x: Tensor) -> Tensor:
        """The conv on frames already folded into the batch: (N, Ci, H, W) -> (N, Co, H', W')."""
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        return from_frames(self.frames(to_frames(x)), x.shape[0])


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
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 3, 4, 1)  # (B, T, H, W, C): memory order when channels-last
        if prev is None:
            n, g = 1, 1
            groups = frames.unsqueeze(1)  # (B, 1, 1, H, W, C)
            left = groups
        else:
            g = self.group
            n = t // g
            if n * g != t:
                raise ValueError(f"GCConv needs a multiple of {g} frames, got {t}")
            groups = frames.reshape(b, n, g, h, w, c)  # (B, G, g, H, W, C)
            left = torch.cat([prev.permute(0, 2, 3, 4, 1).unsqueeze(1), groups[:, :-1, -1:]],
                             dim=1)  # (B, G, 1, H, W, C)
        # One copy builds every group's padded stack [left, group, 0], already in the
        # channels-last order the conv wants, with the groups folded into the batch.
        zeros = frames.new_zeros(b, n, 1, h, w, c)
        stack = torch.cat([left, groups, zeros], dim=2)  # (B, G, g+2, H, W, C)
        stack = stack.reshape(b * n, g + 2, h, w, c).permute(0, 4, 1, 2, 3)  # (B*G, C, g+2, H, W)
        y = F.conv3d(stack, self.weight, self.bias, padding=(0, 1, 1))  # (B*G, Co, g, H, W)
        return y.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)


class PointwiseConv3d(nn.Module):
    """1x1x1 conv. Weight ``[Co, Ci, 1, 1, 1]``."""

    def __init__(self, ci: int, co: int) -> None:
        super().__init__()
        self.weight, self.bias = _conv_param(co, ci, 1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        # Per frame as a 1x1 conv2d: the same sums, on oneDNN's faster 2-D path.
        y = F.conv2d(to_frames(x), self.weight[:, :, 0], self.bias)
        return from_frames(y, x.shape[0])


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


def _add_residual(h: Tensor, x: Tensor) -> Tensor:
    """``h + x`` into ``h``: ``h`` is a fresh conv (or concat) output, which autograd never
    saves, so overwriting it is safe in training too."""
    return h.add_(x)


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
        h = self.norm1(x, silu=True)
        c1 = _last_frame(h)
        h = self.conv1(h, None if first else cache[0])
        h = self.norm2(h, silu=True, inplace=True)  # h: conv1's fresh output
        c2 = _last_frame(h)
        h = self.conv2(h, None if first else cache[1])
        shortcut = self.shortcut
        s = x if shortcut is None else shortcut(x, None)
        return _add_residual(h, s), [c1, c2]


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
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True, inplace=True))
        return _add_residual(h, x), []


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
        frames = to_frames(u)  # (B*T, C, H, W)
        n = _rms_norm(frames, 1, self.norm_gamma * self.norm_scale, silu=False)
        qkv = self.to_qkv.frames(n)  # (B*T, 3C, H, W)
        # Channels last, the pixel-major token matrix is a view (``contiguous`` is then a
        # no-op). 4-D q/k/v with unit-stride channels take the fused (flash) CPU kernel
        # instead of materialising the H*W x H*W score matrix.
        tokens = qkv.permute(0, 2, 3, 1).reshape(b * t, 1, h * w, 3 * c).contiguous()
        q, k, v = tokens.split(c, dim=3)  # each (B*T, 1, HW, C)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.reshape(b * t, h, w, c).permute(0, 3, 1, 2)  # (B*T, C, H, W)
        return from_frames(_add_residual(self.proj.frames(o), frames), b)


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


def _upsample_frames(x: Tensor, repeat: int) -> Tensor:
    """Nearest x2 in space and x``repeat`` in time, in one copy.

    ``x`` (B, T, R, H, W, C) -> (B, T*R, 2H, 2W, C), channels-last order: axis R holds the
    ``R`` output frames made from each input frame (expanded when it has size 1).
    """
    b, t, _, h, w, c = x.shape
    x = x[:, :, :, :, None, :, None, :].expand(b, t, repeat, h, 2, w, 2, c)
    return x.reshape(b, t * repeat, 2 * h, 2 * w, c)


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
        a = x[:, :c].permute(0, 2, 3, 4, 1).unsqueeze(2)  # (B, T, 1, H, W, C)
        b = x[:, c:]
        time_conv = self.time_conv
        repeat = 1
        if time_conv is not None and not first:
            repeat = 2
            bt, _, t, h, w = b.shape
            u = time_conv(b).permute(0, 2, 3, 4, 1)  # (B, T, H, W, 2C): [even || odd frame]
            b = u.reshape(bt, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5)  # (B, T, 2, H, W, C)
        else:
            b = b.permute(0, 2, 3, 4, 1).unsqueeze(2)
        a = _upsample_frames(a, repeat).permute(0, 4, 1, 2, 3)  # (B, C, T', 2H, 2W)
        b = _upsample_frames(b, repeat).permute(0, 4, 1, 2, 3)
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
        frames = to_frames(x)
        outs = [self.branch_0.frames(frames)]
        for branch in self.dilated:
            assert isinstance(branch, PerFrameConv)
            outs.append(branch.frames(frames))
        firsts = [o[:, :z] for o in outs]
        seconds = [o[:, z:] for o in outs]
        return from_frames(self.fuse.frames(torch.cat(firsts + seconds, dim=1)), x.shape[0])
