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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.geometry import GROUP
from ..core.names import PRECISIONS
from ..model import IVVAE, latent_frames, latent_size
from ..video import VideoLimits, open_video
from .metrics import psnr_per_frame, ssim_per_frame

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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
    # A few frames of the first precision's run for the HTML report: frame index ->
    # (original, reconstruction), each (H, W, 3) uint8 RGB.
    samples: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


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
                best = (f"bicubic /{f} space, every {ordinal(s)} frame", sc, values)
            break  # larger s only stores fewer values and loses quality
    if best is None:
        raise ValueError("no baseline fits the latent's budget")
    return best


def _uint8(video: Tensor, i: int) -> np.ndarray:
    """Frame ``i`` of a (1, 3, T, H, W) [-1, 1] video as (H, W, 3) uint8."""
    frame = ((video[0, :, i].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frame.permute(1, 2, 0).numpy()


def sample_frames(scores: Scores, count: int = 3) -> list[int]:
    """The frames the report shows: the first, the worst (lowest PSNR) and the middle."""
    worst = int(np.argmin(scores.psnr))
    picked = list(dict.fromkeys([0, worst, len(scores.psnr) // 2]))
    return sorted(picked[:count])


def evaluate(model: IVVAE, paths: Sequence[str | Path], *,
             precisions: Sequence[str] = PRECISIONS[:2], max_frames: int | None = None,
             progress: Callable[[str], None] | None = None) -> list[VideoReport]:
    """Score each video; ``progress(what)`` is called before each step (decoding a video,
    each precision, the baseline search), so a caller can show what is going on."""
    say = progress or (lambda _: None)
    reports = []
    for path in paths:
        name = Path(path).name
        say(f"{name}: decoding")
        video = load_video(path, max_frames)
        _, _, t, h, w = video.shape
        values = model.cfg.z_dim * latent_frames(t) * latent_size(h) * latent_size(w)
        rep = VideoReport(name, t, w, h, values)
        for prec in precisions:
            say(f"{name}: encode + decode {t} frames {w}x{h} in {prec}")
            model.set_precision(encode=prec, decode=prec)
            try:
                with torch.no_grad():
                    recon = model.decode(model.encode(video), num_frames=t, height=h, width=w)
            finally:
                model.set_precision(encode="float32", decode="float32")
            rep.results[f"ivvae {prec}"] = score(quantize(recon), video)
            if not rep.samples:
                rep.samples = {i: (_uint8(video, i), _uint8(recon, i))
                               for i in sample_frames(rep.results[f"ivvae {prec}"])}
        say(f"{name}: searching the same-size baseline")
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


# fp32 and bf16 scores are often within 0.1 dB: a wide pale line under a thin dark one
# keeps both visible; the baseline is dashed.
_STYLES = {"float32": dict(linestyle="-", linewidth=3.2, alpha=0.45, zorder=2),
           "bfloat16": dict(linestyle="-", linewidth=1.0, alpha=1.0, zorder=3),
           "float16": dict(linestyle=":", linewidth=1.4, alpha=1.0, zorder=4),
           "baseline": dict(linestyle="--", linewidth=1.2, alpha=1.0, zorder=1)}
_POSITIONS = ["frame 0", "pos 1\n(key)", "pos 2", "pos 3", "pos 4"]


def _style(label: str) -> dict[str, Any]:
    return dict(_STYLES.get(label.removeprefix("ivvae "), _STYLES["bfloat16"]))


def figure(reports: Sequence[VideoReport]) -> Figure:
    """Per video, one row: PSNR per frame, SSIM per frame, PSNR and SSIM by group position
    (bars from 0). Legends sit below the axes, never over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 4, figsize=(18, 4.4 * len(reports)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 2, 1.2, 1.2]})
    for (ax_p, ax_s, bar_p, bar_s), rep in zip(axes, reports, strict=True):
        labels = list(rep.results)
        for ax, metric, unit in ((ax_p, "psnr", "PSNR (dB)"), (ax_s, "ssim", "SSIM")):
            for label, sc in rep.results.items():
                ax.plot(getattr(sc, metric), label=label, **_style(label))
            for g in range(1, rep.frames, 4):
                ax.axvline(g, color="0.9", linewidth=0.6, zorder=0)
            ax.set_title(f"{rep.name}: {unit.split()[0]} per frame (grey lines: group starts)",
                         fontsize=10)
            ax.set_xlabel("frame")
            ax.set_ylabel(unit)
        width = 0.8 / len(labels)
        for ax, k_metric, unit in ((bar_p, 0, "PSNR (dB)"), (bar_s, 1, "SSIM")):
            for k, label in enumerate(labels):
                pos = rep.results[label].by_position()
                ax.bar([p + k * width for p in pos], [v[k_metric] for v in pos.values()],
                       width=width, label=label)
            ax.set_xticks([p + 0.4 - width / 2 for p in range(5)])
            ax.set_xticklabels(_POSITIONS, fontsize=8)
            ax.set_ylim(0, None)  # from 0: differences of a few tenths look like what they are
            ax.set_ylabel(unit)
            ax.set_title(f"{unit.split()[0]} by position in the frame group", fontsize=10)
        for ax in (ax_p, bar_p):
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(labels),
                      fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot(reports: Sequence[VideoReport], path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(reports)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _png_data_uri(image: np.ndarray) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    plt.imsave(buf, image, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


DIFF_GAIN = 4  # |reconstruction - original| x 4 in the report's difference images


def write_html(reports: Sequence[VideoReport], path: str | Path, *, title: str,
               table: str, plot_png: bytes) -> None:
    """One self-contained HTML file (no external assets): the table, the charts and, per
    video, a few frames as original / reconstruction / amplified difference."""
    import base64
    import html

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{html.escape(title)}</title><style>"
             "body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a}"
             "table{border-collapse:collapse}td,th{border:1px solid #d8dde2;padding:3px 8px}"
             "img{image-rendering:pixelated;max-width:100%}figure{margin:8px 0}"
             "figcaption{color:#5f6b76}.grid{display:flex;gap:8px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", _markdown_tables(table),
             "<img alt='charts' src='data:image/png;base64,"
             f"{base64.b64encode(plot_png).decode()}'>"]
    for rep in reports:
        parts.append(f"<h2>{html.escape(rep.name)}: frames</h2>")
        first = next(iter(rep.results.values()))
        for i, (orig, recon) in rep.samples.items():
            diff = np.clip(np.abs(recon.astype(np.int16) - orig.astype(np.int16)) * DIFF_GAIN,
                           0, 255).astype(np.uint8)
            scale = max(1, 256 // max(orig.shape[:2]))
            cells = "".join(
                f"<figure><img width='{orig.shape[1] * scale}' alt='{name} frame {i}' "
                f"src='{_png_data_uri(img)}'><figcaption>{name}</figcaption></figure>"
                for name, img in (("original", orig), ("reconstruction", recon),
                                  (f"|difference| x {DIFF_GAIN}", diff)))
            parts.append(f"<h3>frame {i} (group position {group_position(i)}): PSNR "
                         f"{first.psnr[i]:.2f} dB, SSIM {first.ssim[i]:.3f}</h3>"
                         f"<div class='grid'>{cells}</div>")
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts))


def _markdown_tables(text: str) -> str:
    """format_table's Markdown as HTML: headings, lines, pipe tables."""
    import html

    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                       + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>"
                                                            for c in r) + "</tr>"
                                           for r in body) + "</table>")
            rows.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-", " "} for c in cells):
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)
