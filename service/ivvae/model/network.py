"""IV-VAE encoder and decoder networks, assembled from ``layers``.

Both are step functions over a stream: ``first=True`` runs the stream's first frame (the
image path), later calls run whole frame groups with the cache from the previous call.

Encoder, per call: ``(B, 3, T, H, W)`` -> ``(B, 2z, T', H/8, W/8)`` with ``T' = 1`` on the
first call (T = 1) and ``T' = T / 4`` later (T a multiple of 4).
Decoder, per call: ``(B, z, n, h, w)`` -> ``(B, 6, n', 8h, 8w)`` with ``n' = 1`` on the first
call (n = 1) and ``n' = 4n`` later; channels ``[0:3]`` are the keyframe branch and ``[3:6]``
the temporal branch (the VAE assembles frames from them).
"""

from torch import Tensor, nn

from ..core.geometry import GROUP, TEMPORAL_DOWNSAMPLE
from .config import IVVAEConfig
from .layers import (
    Attention,
    Downsample,
    GroupRMSNorm,
    PACHead,
    ResBlock2D,
    ResBlock3D,
    SepConv3d,
    Upsample,
    _last_frame,
    channels_last,
    from_frames,
    to_frames,
)


def _slots(block: nn.Module) -> int:
    """Cache slots a block uses (ResBlock3D: 2, stateless blocks: 0)."""
    return int(getattr(block, "num_slots", 0))


def _run_blocks(
    blocks: nn.ModuleList, x: Tensor, cache: list[Tensor], offset: int, first: bool
) -> tuple[Tensor, list[Tensor]]:
    """Run blocks in order, handing each its own slice of the cache list."""
    new_cache: list[Tensor] = []
    i = offset
    for block in blocks:
        n = _slots(block)
        x, c = block(x, [] if first else cache[i : i + n], first)
        new_cache.extend(c)
        i += n
    return x, new_cache


class Encoder(nn.Module):
    def __init__(self, cfg: IVVAEConfig) -> None:
        super().__init__()
        d = cfg.dim
        widths = [d * m for m in (1, *cfg.dim_mult)]  # stage i maps widths[i] -> widths[i+1]
        self.stem = SepConv3d(3, d, 3, GROUP)
        blocks: list[nn.Module] = []
        rate_div = 1  # temporal downsampling so far
        last = len(cfg.dim_mult) - 1
        for i in range(last):
            ci, co = widths[i], widths[i + 1]
            for j in range(cfg.num_res_blocks):
                blocks.append(ResBlock3D(ci if j == 0 else co, co, GROUP // rate_div))
            blocks.append(Downsample(co, TEMPORAL_DOWNSAMPLE[i]))
            if TEMPORAL_DOWNSAMPLE[i]:
                rate_div *= 2
        # Last stage works on single latent frames: 2-D blocks and attention only.
        ci, co = widths[last], widths[last + 1]
        if ci != co:
            raise ValueError("the last two dim_mult entries must be equal")
        blocks.append(Attention(co))
        for _ in range(cfg.num_res_blocks):
            blocks.append(ResBlock2D(co))
            blocks.append(Attention(co))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = nn.ModuleList([ResBlock2D(co), Attention(co), ResBlock2D(co)])
        self.head_norm = GroupRMSNorm(co)
        self.head = PACHead(2 * co, cfg.z_dim)
        self.num_slots = 1 + sum(_slots(b) for b in blocks)

    def forward(
        self, x: Tensor, cache: list[Tensor], first: bool
    ) -> tuple[Tensor, list[Tensor]]:
        x = channels_last(x)
        stem_prev: Tensor | None = None if first else cache[0]
        new_cache = [_last_frame(x)]
        h = self.stem(x, stem_prev)
        h, c = _run_blocks(self.downsamples, h, cache, 1, first)
        new_cache.extend(c)
        h, _ = _run_blocks(self.middle, h, cache, 0, first)
        # h is the last block's fresh output: normalise it in place.
        return self.head(self.head_norm(h, silu=True, inplace=True)), new_cache


class Decoder(nn.Module):
    def __init__(self, cfg: IVVAEConfig) -> None:
        super().__init__()
        d = cfg.dim
        mults = cfg.dim_mult
        widths = [d * m for m in (mults[-1], *reversed(mults))]  # e.g. 4d 4d 4d 2d d
        top = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_dim, 2 * top, 3, padding=1)
        self.middle = nn.ModuleList([ResBlock2D(top), Attention(top), ResBlock2D(top)])
        temporal_up = tuple(reversed(TEMPORAL_DOWNSAMPLE))
        blocks: list[nn.Module] = []
        rate_mul = 1
        n_stages = len(mults)
        for i in range(n_stages):
            ci, co = widths[i], widths[i + 1]
            if i > 0:
                ci //= 2  # the upsampler before this stage halved the width
            for j in range(cfg.num_res_blocks + 1):
                cin = ci if j == 0 else co
                if i == 0:
                    if cin != co:
                        raise ValueError("the last two dim_mult entries must be equal")
                    blocks.append(ResBlock2D(co))
                    blocks.append(Attention(co))
                else:
                    blocks.append(ResBlock3D(cin, co, GROUP * rate_mul // 4))
            if i != n_stages - 1:
                blocks.append(Upsample(co, temporal_up[i]))
                if temporal_up[i]:
                    rate_mul *= 2
        self.upsamples = nn.ModuleList(blocks)
        out_w = widths[-1]
        self.head_norm = GroupRMSNorm(out_w)
        self.head = SepConv3d(2 * out_w, 3, 3, GROUP)
        self.num_slots = 1 + sum(_slots(b) for b in blocks)

    def forward(
        self, x: Tensor, cache: list[Tensor], first: bool
    ) -> tuple[Tensor, list[Tensor]]:
        # conv_in is per frame on the (B, z, n, h, w) latent.
        y = from_frames(self.conv_in(to_frames(channels_last(x))), x.shape[0])
        y, _ = _run_blocks(self.middle, y, cache, 0, first)
        y, new_cache = _run_blocks(self.upsamples, y, cache, 0, first)
        y = self.head_norm(y, silu=True, inplace=True)  # y: the last block's fresh output
        new_cache.append(_last_frame(y))
        y = self.head(y, None if first else cache[self.num_slots - 1])
        return y, new_cache
