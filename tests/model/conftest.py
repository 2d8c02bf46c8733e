from __future__ import annotations

import pytest
import torch

from ivvae.model import IVVAE, IVVAEConfig

TINY = IVVAEConfig(z_dim=4, dim=4, scale_factor=0.9, shift_factor=-0.1)


def make_model(cfg: IVVAEConfig = TINY, seed: int = 0) -> IVVAE:
    torch.manual_seed(seed)
    model = IVVAE(cfg).eval().requires_grad_(False)
    # Non-trivial norm gains so a wrong half/scale in a norm cannot hide behind gamma = 1.
    for name, p in model.named_parameters():
        if "gamma" in name:
            p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.fixture(scope="module")
def tiny() -> IVVAE:
    return make_model()


def rand_video(t: int, h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
