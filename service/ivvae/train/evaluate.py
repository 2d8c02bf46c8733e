"""``ivvae eval``: reconstruction quality per video, per frame and per group position.

Position within a frame group matters for causal video VAEs (the paper's second finding):
frame 0 is coded alone; every later frame sits at position 1-4 of its group of 4 (position
1 is the group's keyframe, decoded by the 2D branch; 2-4 by the temporal branch). GCConv
should keep positions balanced.

A trivial baseline that stores the same number of values as the latent is scored beside
the model: bicubic downscaling by ``f`` in space and keeping every ``s``-th frame, undone by
bicubic upscaling and linear interpolation in time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.geometry import GROUP
from ..core.names import PRECISIONS
from ..model import IVVAE, latent_frames, latent_size
from ..video import VideoLimits, open_video
from .metrics import psnr_per_frame, ssim_per_frame


def group_position(frame: int) -> int:
    """0 for frame 0, else 1..4: the frame's place in its group of 4."""
    return 0 if frame == 0 else (frame - 1) % GROUP + 1


@dataclass
class Scores:
    psnr: list[float]  # per frame
    ssim: list[float]

    @property
    def mean_psnr(self) -> float:
        # PSNR of the mean MSE (not the mean of per-frame PSNRs): the usual video PSNR.
        mse = float(np.mean([10 ** (-p / 10) for p in self.psnr]))
        return 10 * math.log10(1 / max(mse, 1e-12))

    @property
    def mean_ssim(self) -> float:
        return float(np.mean(self.ssim))

    def by_position(self) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for pos in range(5):
            idx = [i for i in range(len(self.psnr)) if group_position(i) == pos]
            if idx:
                sub = Scores([self.psnr[i] for i in idx], [self.ssim[i] for i in idx])
                out[pos] = (sub.mean_psnr, sub.mean_ssim)
        return out


@dataclass
class VideoReport:
    name: str
    frames: int
    width: int
    height: int
    latent_values: int
    results: dict[str, Scores] = field(default_factory=dict)  # label -> scores
    baseline: str = ""


def load_video(path: str | Path, max_frames: int | None = None) -> Tensor:
    """(1, 3, T, H, W) float in [-1, 1]."""
    limits = VideoLimits(max_frames=1 << 30, max_pixels=1 << 26)
    with open_video(path, limits=limits) as reader:
        chunks, total = [], 0
        for chunk in reader.iter_frames(32):
            chunks.append(chunk)
            total += len(chunk)
            if max_frames is not None and total >= max_frames:
                break
    frames = np.concatenate(chunks)[:max_frames]
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def quantize(video: Tensor) -> Tensor:
    """What a user gets back: clamp, round to uint8 levels, back to [-1, 1]."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def score(recon: Tensor, video: Tensor) -> Scores:
    return Scores(psnr_per_frame(recon, video)[0].tolist(),
                  ssim_per_frame(recon, video)[0].tolist())


def baseline_reconstruct(video: Tensor, f: int, s: int) -> tuple[Tensor, int]:
    """Bicubic /f in space and every s-th frame; returns (reconstruction, values stored)."""
    _, c, t, h, w = video.shape
    keep = list(range(0, t, s))
    if keep[-1] != t - 1:
        keep.append(t - 1)  # keep the last frame so interpolation never extrapolates
    hs, ws = max(1, round(h / f)), max(1, round(w / f))
    frames = video[0, :, keep].permute(1, 0, 2, 3)  # (K, 3, H, W)
    small = F.interpolate(frames, size=(hs, ws), mode="bicubic", align_corners=False)
    small = quantize(small)  # stored as 8-bit like the video itself
    big = F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False)
    out = torch.empty_like(video[0].permute(1, 0, 2, 3))
    for i in range(t):
        j = int(np.searchsorted(keep, i, side="right")) - 1
        if keep[j] == i or j == len(keep) - 1:
            out[i] = big[j]
        else:
            a = (i - keep[j]) / (keep[j + 1] - keep[j])
            out[i] = (1 - a) * big[j] + a * big[j + 1]
    return out.permute(1, 0, 2, 3)[None], len(keep) * c * hs * ws


def best_baseline(video: Tensor, budget: int) -> tuple[str, Scores, int]:
    """The best-PSNR (f, s) baseline storing at most ``budget`` values."""
    best: tuple[str, Scores, int] | None = None
    for f in (2, 3, 4, 6, 8):
        for s in range(1, 17):
            recon, values = baseline_reconstruct(video, f, s)
            if values > budget:
                continue
            sc = score(quantize(recon), video)
            if best is None or sc.mean_psnr > best[1].mean_psnr:
                best = (f"bicubic /{f} space, every {s}th frame", sc, values)
            break  # larger s only stores fewer values and loses quality
    if best is None:
        raise ValueError("no baseline fits the latent's budget")
    return best


def evaluate(model: IVVAE, paths: Sequence[str | Path], *,
             precisions: Sequence[str] = PRECISIONS[:2],
             max_frames: int | None = None) -> list[VideoReport]:
    reports = []
    for path in paths:
        video = load_video(path, max_frames)
        _, _, t, h, w = video.shape
        values = model.cfg.z_dim * latent_frames(t) * latent_size(h) * latent_size(w)
        rep = VideoReport(Path(path).name, t, w, h, values)
        for prec in precisions:
            model.set_precision(encode=prec, decode=prec)
            try:
                with torch.no_grad():
                    recon = model.decode(model.encode(video), num_frames=t, height=h, width=w)
            finally:
                model.set_precision(encode="float32", decode="float32")
            rep.results[f"ivvae {prec}"] = score(quantize(recon), video)
        label, sc, used = best_baseline(video, values)
        rep.baseline = f"{label} ({used} values vs {values} latent values)"
        rep.results["baseline"] = sc
        reports.append(rep)
    return reports


def format_table(reports: Sequence[VideoReport]) -> str:
    lines = []
    for rep in reports:
        lines.append(f"## {rep.name}: {rep.frames} frames {rep.width}x{rep.height}, "
                     f"{rep.latent_values} latent values")
        lines.append(f"baseline = {rep.baseline}")
        lines.append("| method | PSNR | SSIM | frame 0 | pos 1 (key) | pos 2 | pos 3 | pos 4 |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, sc in rep.results.items():
            pos = sc.by_position()
            cells = [f"{pos[p][0]:.2f} / {pos[p][1]:.3f}" if p in pos else "-"
                     for p in range(5)]
            lines.append(f"| {label} | {sc.mean_psnr:.2f} | {sc.mean_ssim:.4f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines.append("PSNR in dB over 8-bit RGB; per-position cells are PSNR / SSIM.")
    return "\n".join(lines)


def to_json(reports: Sequence[VideoReport]) -> str:
    out = []
    for rep in reports:
        out.append({
            "video": rep.name, "frames": rep.frames, "width": rep.width,
            "height": rep.height, "latent_values": rep.latent_values,
            "baseline": rep.baseline,
            "results": {label: {"psnr": sc.mean_psnr, "ssim": sc.mean_ssim,
                                "per_frame_psnr": sc.psnr, "per_frame_ssim": sc.ssim,
                                "by_position": {str(k): {"psnr": v[0], "ssim": v[1]}
                                                for k, v in sc.by_position().items()}}
                        for label, sc in rep.results.items()},
        })
    return json.dumps(out, indent=1)


def plot(reports: Sequence[VideoReport], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(13, 4 * len(reports)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1]})
    for (ax_f, ax_p), rep in zip(axes, reports, strict=True):
        for label, sc in rep.results.items():
            style = "--" if label == "baseline" else "-"
            ax_f.plot(sc.psnr, style, label=label, linewidth=1.2)
        for g in range(1, rep.frames, 4):
            ax_f.axvline(g, color="0.9", linewidth=0.6, zorder=0)
        ax_f.set_title(f"{rep.name}: PSNR per frame (grey lines: group starts)")
        ax_f.set_xlabel("frame")
        ax_f.set_ylabel("PSNR (dB)")
        ax_f.legend(loc="lower right", fontsize=8)
        labels = list(rep.results)
        width = 0.8 / len(labels)
        for k, label in enumerate(labels):
            pos = rep.results[label].by_position()
            xs = [p + k * width for p in pos]
            ax_p.bar(xs, [v[0] for v in pos.values()], width=width, label=label)
        ax_p.set_xticks([p + 0.4 - width / 2 for p in range(5)])
        ax_p.set_xticklabels(["frame 0", "pos 1\n(key)", "pos 2", "pos 3", "pos 4"])
        lo = min(min(v[0] for v in rep.results[lb].by_position().values()) for lb in labels)
        ax_p.set_ylim(max(0, lo - 3), None)
        ax_p.set_title("PSNR by position in the frame group")
        ax_p.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
