"""Reconstruction losses and quality metrics (PSNR, SSIM) on video tensors.

All functions take ``(B, 3, T, H, W)`` float videos in ``[-1, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), mean over elements."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma * sigma))
    g = (g / g.sum()).float()
    return g[:, None] * g[None, :]


def ssim_per_frame(x: Tensor, y: Tensor) -> Tensor:
    """SSIM of each frame, ``(B, T)``, on [0, 1]-mapped RGB (mean over channels).

    Standard constants (K1 0.01, K2 0.03), 11x11 Gaussian window sigma 1.5, 'valid'
    filtering when frames are large enough, 'same' (zero-free reflect) otherwise.
    """
    b, c, t, h, w = x.shape
    a = ((x + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w).float()
    r = ((y + 1) / 2).permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w).float()
    size = min(11, h, w)
    win = _gaussian_window(size, 1.5 * size / 11).to(a.device)[None, None]

    def filt(v: Tensor) -> Tensor:
        return F.conv2d(v, win)

    mu_a, mu_r = filt(a), filt(r)
    var_a = filt(a * a) - mu_a**2
    var_r = filt(r * r) - mu_r**2
    cov = filt(a * r) - mu_a * mu_r
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_r + c1) * (2 * cov + c2)
    s = num / ((mu_a**2 + mu_r**2 + c1) * (var_a + var_r + c2))
    return s.mean(dim=(1, 2, 3)).reshape(b, t, c).mean(dim=2)


def psnr_per_frame(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB of each frame, ``(B, T)``, with peak 1 on [0, 1]-mapped values."""
    mse = (((x - y) / 2) ** 2).float().mean(dim=(1, 3, 4))  # (B, T)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))

