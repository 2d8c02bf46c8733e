"""Conformance against golden vectors produced by the official implementation.

A golden file is a ``.safetensors`` holding ``state_dict.<official name>`` weights,
``input.video`` and ``expected.{mu,logvar,latent,recon}``, with the config in its string
metadata. ``verify_golden`` rebuilds the model from the embedded weights, runs the input in
fp32 and reports the max abs error of each expected tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checkpoint import load_model
from .config import IVVAEConfig

TOLERANCE = 1e-4
_PREFIX = "state_dict."


@dataclass(frozen=True)
class GoldenResult:
    file: str
    errors: dict[str, float]  # max abs error per expected tensor
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return all(e <= self.tolerance for e in self.errors.values())

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, **{f"max_abs_{k}": v for k, v in self.errors.items()},
                "tolerance": self.tolerance, "passed": self.passed}


def verify_golden(path: str | os.PathLike[str]) -> GoldenResult:
    from safetensors import safe_open

    _no_tf32()
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        sd = {k[len(_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(_PREFIX)}  # noqa: SIM118
        video = f.get_tensor("input.video")
        expected = {k: f.get_tensor(f"expected.{k}") for k in ("mu", "logvar", "latent", "recon")}
    cfg = IVVAEConfig.from_metadata(meta)
    model = load_model(sd, scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor)
    if model.cfg.dim_mult != cfg.dim_mult or model.cfg.num_res_blocks != cfg.num_res_blocks:
        raise ValueError(f"{path}: weights disagree with the metadata config {cfg}")
    mu, logvar = model.encode_moments(video)
    latent = model.moments_to_latent(mu, logvar)
    recon = model.decode(latent, num_frames=video.shape[2], height=video.shape[3],
                         width=video.shape[4])
    got = {"mu": mu, "logvar": logvar, "latent": latent, "recon": recon}
    errors = {}
    for k, exp in expected.items():
        if got[k].shape != exp.shape:
            errors[k] = float("inf")
        else:
            errors[k] = float((got[k].double() - exp.double()).abs().max())
    return GoldenResult(os.fspath(path), errors)


def _no_tf32() -> None:
    # cuDNN may use TF32 for convolutions on GPUs; conformance is defined in true fp32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
