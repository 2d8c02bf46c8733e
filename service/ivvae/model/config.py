"""IV-VAE configurations: one frozen dataclass and the four official presets.

The architecture is fixed by (z_dim, dim, dim_mult, num_res_blocks); the temporal schedule
(no temporal downsampling in stage 0, 2x in stages 1 and 2: 4x overall) is the paper's and is
not configurable. ``scale_factor``/``shift_factor`` map posterior means to diffusion latents:
``latent = scale * (mu - shift)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..core.geometry import TEMPORAL_DOWNSAMPLE


@dataclass(frozen=True)
class IVVAEConfig:
    z_dim: int = 16
    dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    scale_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.z_dim < 2 or self.z_dim % 2:
            raise ValueError(f"z_dim must be an even number >= 2, got {self.z_dim}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if len(self.dim_mult) != len(TEMPORAL_DOWNSAMPLE) + 1:
            raise ValueError(f"dim_mult must have 4 entries, got {self.dim_mult}")
        if any(m < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult entries must be >= 1, got {self.dim_mult}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")
        if not (math.isfinite(self.scale_factor) and math.isfinite(self.shift_factor)):
            raise ValueError(f"scale_factor and shift_factor must be finite numbers, got "
                             f"{self.scale_factor} and {self.shift_factor}")
        # Upsamplers halve the width, so the decoder needs even stage widths.
        if any((self.dim * m) % 2 for m in self.dim_mult[1:]):
            raise ValueError("dim * dim_mult[1:] must be even")

    @property
    def half_z(self) -> int:
        """Channels of each latent half: [0, k) keyframe (2D), [k, z) temporal (3D)."""
        return self.z_dim // 2

    def with_factors(self, scale_factor: float, shift_factor: float) -> IVVAEConfig:
        return dataclasses.replace(self, scale_factor=scale_factor, shift_factor=shift_factor)

    def to_metadata(self) -> dict[str, str]:
        """String metadata in the golden-file convention (safetensors ``__metadata__``)."""
        return {
            "z_dim": str(self.z_dim),
            "dim": str(self.dim),
            "dim_mult": ",".join(str(m) for m in self.dim_mult),
            "num_res_blocks": str(self.num_res_blocks),
            "temporal_downsample": ",".join(str(t) for t in TEMPORAL_DOWNSAMPLE),
            "scale_factor": repr(self.scale_factor),
            "shift_factor": repr(self.shift_factor),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> IVVAEConfig:
        try:
            td = tuple(s.strip() == "True" for s in meta.get("temporal_downsample", "").split(","))
            if meta.get("temporal_downsample") and td != TEMPORAL_DOWNSAMPLE:
                raise ValueError(f"unsupported temporal_downsample {meta['temporal_downsample']}")
            return cls(
                z_dim=int(meta["z_dim"]),
                dim=int(meta["dim"]),
                dim_mult=tuple(int(m) for m in meta.get("dim_mult", "1,2,4,4").split(",")),
                num_res_blocks=int(meta.get("num_res_blocks", "2")),
                scale_factor=float(meta.get("scale_factor", "1.0")),
                shift_factor=float(meta.get("shift_factor", "0.0")),
            )
        except KeyError as exc:
            raise ValueError(f"model metadata lacks {exc.args[0]!r}") from exc


PRESETS: dict[str, IVVAEConfig] = {
    "ivvae_z4_dim64": IVVAEConfig(z_dim=4, dim=64, scale_factor=1.3196, shift_factor=0.1250),
    "ivvae_z8_dim64": IVVAEConfig(z_dim=8, dim=64, scale_factor=1.0940, shift_factor=-0.0322),
    "ivvae_z16_dim64": IVVAEConfig(z_dim=16, dim=64, scale_factor=0.9697, shift_factor=-0.1553),
    "ivvae_z16_dim96": IVVAEConfig(z_dim=16, dim=96, scale_factor=0.7619, shift_factor=-0.0483),
}


def preset_for(z_dim: int, dim: int) -> tuple[str, IVVAEConfig] | None:
    """The official preset with this shape, if any (factors come only from presets)."""
    for name, cfg in PRESETS.items():
        if cfg.z_dim == z_dim and cfg.dim == dim:
            return name, cfg
    return None
