"""Benchmark the IV-VAE model on this machine: speed, efficiency, bf16 and streaming memory.

One run measures, for a random-weight ``ivvae_z16_dim64`` model:

* encode and decode throughput (frames/s) and effective GFLOP/s in fp32 and in bf16
  (``set_precision(..., "bfloat16")``, i.e. autocast), and the bf16 latent error
  ``||lat_bf16 - lat_fp32|| / ||lat_fp32||``;
* the GFLOP/s of one large dense ``Conv3d`` (128 -> 128 channels, 3x3x3) in fp32 and bf16:
  the practical ceiling for the model's convolutions;
* peak RSS of ``encode_moments`` on a short and a long clip, each in a fresh subprocess;
* with ``--official PATH/models/vae3d.py`` (the official IV-VAE code, which this project
  never downloads or ships; it needs ``einops``): the official model with the same weights
  on the same clip, side by side: its fp32 encode and decode times, the ratios of ours (fp32
  and bf16) to it, the agreement of the outputs, and (``--official-memory``, slow: the long
  clip takes the official code minutes) its peak RSS on the same two clips.
  Without the path that comparison is skipped (and says so).

FLOPs are counted once per workload with ``torch.utils.flop_counter.FlopCounterMode`` on a
meta-device copy of the model (the same code path, no arithmetic), so "effective GFLOP/s" is
the counted convolution/matmul work divided by the measured wall time. Timings are the best
of ``--reps`` runs (the median is printed too): on a shared machine the best run is the
least disturbed one. Compare ratios from one run rather than numbers across runs.

The issue's workload is 17 frames of 256x256 in fp32 and bf16, and memory at 128x128::

    python bench/bench_model.py --frames 17 --size 256 --bf16-frames 17 --bf16-size 256 \
        --dense-bf16 8,128 --mem-size 128 --mem-frames 17,161 \
        --official /path/to/IV-VAE/models/vae3d.py

That is ~17 TFLOP per encode + decode: about 9 minutes on 2 AVX-512 cores with native bf16
(avx512_bf16), and far longer where bf16 is emulated (AVX2 only: bf16 autocast is then two
orders of magnitude slower than fp32). The defaults are therefore smaller (fp32 9x128x128,
bf16 5x16x16) and finish in about three minutes anywhere.

bf16 on a CPU without native bf16 (oneDNN reports none, e.g. AVX2 only) is emulated and
about two orders of magnitude slower than fp32; there the bf16 rows run at the default tiny
size whatever is asked (they show the emulation, not a speed-up), and the bench says so.

``--quick`` runs tiny sizes end to end (the smoke test uses it); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ivvae.memory import ALLOCATOR_ENV, tune_allocator
from ivvae.model.checkpoint import official_state_dict
from ivvae.model.config import PRESETS
from ivvae.model.vae import IVVAE, latent_frames, latent_size

PRESET = "ivvae_z16_dim64"

# Targets from the issue.
TARGET_MEMORY_GROWTH = 0.06
TARGET_VS_OFFICIAL_FP32 = 2.0  # our fp32 encode + decode time vs the official fp32 code
TARGET_VS_OFFICIAL_BF16 = 3.5  # our bf16 vs the official fp32 code
TARGET_BF16_ERROR = 0.01
# The default (tiny) bf16 workload, used where bf16 is emulated.
BF16_TINY = (5, 16)


@dataclass
class Row:
    name: str
    workload: str
    gflop: float
    times: list[float]
    frames: int = 0  # frames produced or consumed per run (0: not a video workload)
    cpu_use: float = float("nan")  # process CPU time / (wall time * threads), best run

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def gflops(self) -> float:
        return self.gflop / self.best

    @property
    def fps(self) -> float:
        return self.frames / self.best if self.frames else float("nan")


def _model(device: str = "cpu") -> IVVAE:
    with torch.device(device):
        return IVVAE(PRESETS[PRESET]).eval().requires_grad_(False)


def _video(frames: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


def _latent_shape(frames: int, size: int) -> tuple[int, ...]:
    return (1, PRESETS[PRESET].z_dim, latent_frames(frames), latent_size(size), latent_size(size))


def count_gflop(frames: int, size: int) -> tuple[float, float]:
    """(encode, decode) GFLOP for one clip, counted on the meta device (no arithmetic)."""
    model = _model("meta")
    video = torch.empty(1, 3, frames, size, size, device="meta")
    latent = torch.empty(_latent_shape(frames, size), device="meta")
    out = []
    with torch.inference_mode():
        for run in (lambda: model.encode_moments(video), lambda: model.decode(latent)):
            counter = FlopCounterMode(display=False)
            with counter:
                run()
            out.append(counter.get_total_flops() / 1e9)
    return out[0], out[1]


@dataclass
class Timing:
    times: list[float]
    cpu_use: float  # of the best run: well below 1 means other processes took the CPUs
    out: torch.Tensor


def timed(fn: Callable[[], torch.Tensor], reps: int) -> Timing:
    """Wall times of ``reps`` calls, the best run's CPU use, and the last result."""
    times, use = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        times.append(wall)
        use.append((time.process_time() - c0) / (wall * torch.get_num_threads()))
    return Timing(times, use[times.index(min(times))], out)


def bench_model(model: IVVAE, frames: int, size: int, reps: int,
                precision: str) -> tuple[Row, Row, torch.Tensor]:
    """Encode and decode rows at one precision, and the latent (for the bf16 error)."""
    model.set_precision(encode=precision, decode=precision)
    enc_gflop, dec_gflop = count_gflop(frames, size)
    video = _video(frames, size)
    work = f"{frames}x{size}x{size}"
    with torch.inference_mode():
        enc = timed(lambda: model.encode(video), reps)
        dec = timed(lambda: model.decode(enc.out), reps)
    model.set_precision(encode="float32", decode="float32")
    return (Row(f"model encode {precision}", work, enc_gflop, enc.times, frames, enc.cpu_use),
            Row(f"model decode {precision}", work, dec_gflop, dec.times, frames, dec.cpu_use),
            enc.out)


def bench_dense(frames: int, size: int, reps: int, precision: str,
                channels_last: bool) -> Row:
    """A 128 -> 128 channel 3x3x3 Conv3d with 'same' padding on (1, 128, T, S, S)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, frames, size, size, generator=g)
    w = torch.randn(128, 128, 3, 3, 3, generator=g) * 0.02
    b = torch.zeros(128)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        w = w.contiguous(memory_format=torch.channels_last_3d)
    gflop = 2 * 128 * 128 * 27 * frames * size * size / 1e9
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype,
                                                enabled=dtype != torch.float32):
        F.conv3d(x, w, b, padding=1)  # warm-up: oneDNN primitive creation
        t = timed(lambda: F.conv3d(x, w, b, padding=1), reps)
    layout = "channels-last" if channels_last else "channels-first"
    return Row(f"dense conv3d {precision} {layout}", f"128x{frames}x{size}x{size}", gflop,
               t.times, cpu_use=t.cpu_use)


# -- the official code, side by side ---------------------------------------------------------


def load_official_module(path: str) -> object:
    """The official ``models/vae3d.py`` as a module, imported from the user's path."""
    if not os.path.isfile(path):
        raise SystemExit(f"--official: no such file {path!r} (the official models/vae3d.py)")
    spec = importlib.util.spec_from_file_location("official_ivvae_vae3d", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SystemExit(f"--official: the official code needs {exc.name!r} "
                         f"(pip install {exc.name})") from exc
    return module


def official_model(path: str, ours: IVVAE | None = None) -> Any:
    """The official ``VAutoencoder3d`` (untyped code) for our preset, with ``ours``'s weights
    (strictly loaded) when given. Its ``encode`` samples; here it returns the mean, as ours
    does."""
    module = load_official_module(path)
    cfg = PRESETS[PRESET]
    model = module.VAutoencoder3d(  # type: ignore[attr-defined]
        dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        scale_factor=cfg.scale_factor, shift_factor=cfg.shift_factor)
    if ours is not None:
        model.load_state_dict(official_state_dict(ours), strict=True)
    model.sample = lambda mu, log_var, deterministic=False: mu
    return model.eval().requires_grad_(False)


@dataclass
class Official:
    """The official code's fp32 rows and how closely our outputs match its outputs."""

    encode: Row
    decode: Row
    latent_max_abs: float
    video_max_abs: float


def bench_official(path: str, ours: IVVAE, frames: int, size: int, reps: int,
                   ours_latent: torch.Tensor | None = None) -> Official:
    """The official model in fp32 on our clip (same weights, same input), and the largest
    differences of its latent and reconstruction from ours (ours in fp32)."""
    off = official_model(path, ours)
    video = _video(frames, size)
    work = f"{frames}x{size}x{size}"
    with torch.inference_mode():
        off.decode(off.encode(_video(1, size)))  # warm-up, like ours
        enc = timed(lambda: off.encode(video), reps)
        dec = timed(lambda: off.decode(enc.out), reps)
        lat = ours.encode(video) if ours_latent is None else ours_latent
        rec = ours.decode(lat)
    enc_gflop, dec_gflop = count_gflop(frames, size)
    return Official(
        Row("official encode float32", work, enc_gflop, enc.times, frames, enc.cpu_use),
        Row("official decode float32", work, dec_gflop, dec.times, frames, dec.cpu_use),
        float((enc.out - lat).abs().max()), float((dec.out - rec).abs().max()))


# -- memory: one fresh process per clip length -----------------------------------------------


def _peak_rss_kib() -> int:
    """This process's peak RSS. Linux's ``VmHWM`` belongs to the process image; ``ru_maxrss``
    (the fallback) also counts the parent's RSS at fork time, so it would read the parent's
    footprint in a child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(frames: int, size: int, threads: int, official: str = "") -> None:
    """Print peak RSS (KiB) before and after a whole-video encode of a (frames, size) clip:
    ours (``encode_moments``) or, given its path, the official code's ``encode``. Ours runs
    with the allocator setting the service uses (``ivvae.memory.tune_allocator``) unless
    ``IVVAE_TUNE_MALLOC=0``; the official code with glibc's defaults."""
    if not official:
        tune_allocator()
    torch.set_num_threads(threads)
    model = official_model(official) if official else _model()
    encode: Callable[[torch.Tensor], object] = (
        model.encode if official else model.encode_moments)
    video = _video(frames, size)
    with torch.inference_mode():
        encode(_video(1, size))  # allocator and oneDNN warm-up, one frame
        base = _peak_rss_kib()
        encode(video)
        peak = _peak_rss_kib()
    print(json.dumps({"frames": frames, "size": size, "baseline_kib": base, "peak_kib": peak}))


def bench_memory(frames: list[int], size: int, threads: int,
                 official: str = "", tuned: bool = True) -> list[dict[str, int]]:
    out = []
    env = {**os.environ, ALLOCATOR_ENV: "1" if tuned else "0"}
    for n in frames:
        cmd = [sys.executable, __file__, "--memory-child", str(n), str(size), str(threads)]
        if official:
            cmd += ["--official", official]
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# -- report ----------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def print_table(rows: list[Row]) -> None:
    head = (f"{'workload':34s} {'size':>16s} {'GFLOP':>9s} {'best s':>8s} {'median s':>9s} "
            f"{'frames/s':>9s} {'GFLOP/s':>8s} {'cpu use':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        fps = f"{r.fps:9.3f}" if r.frames else f"{'':9s}"
        print(f"{r.name:34s} {r.workload:>16s} {r.gflop:9.1f} {r.best:8.3f} "
              f"{statistics.median(r.times):9.3f} {fps} {r.gflops:8.2f} {r.cpu_use:8.0%}")
    print("(cpu use: process CPU time / (wall time x threads) of the best run; below 100% the "
          "threads waited: for each other on small ops, or for CPUs other processes held)")


def print_memory(label: str, mem: list[dict[str, int]]) -> float:
    """The memory table of one implementation; returns its peak RSS growth first -> last."""
    print(f"{label:34s} {'baseline MiB':>12s} {'peak MiB':>9s} {'peak-baseline':>14s}")
    for m in mem:
        print(f"{m['frames']:4d} frames {m['size']}x{m['size']:<18d} "
              f"{m['baseline_kib'] / 1024:12.1f} {m['peak_kib'] / 1024:9.1f} "
              f"{(m['peak_kib'] - m['baseline_kib']) / 1024:14.1f}")
    first, last = mem[0], mem[-1]
    growth = last["peak_kib"] / first["peak_kib"] - 1
    first_work = first["peak_kib"] - first["baseline_kib"]
    last_work = last["peak_kib"] - last["baseline_kib"]
    work_growth = f"{last_work / first_work - 1:+.1%}" if first_work > 0 else "n/a"
    print(f"peak RSS growth {first['frames']} -> {last['frames']} frames: {growth:+.1%} "
          f"(peak-baseline {work_growth})")
    return growth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=9, help="fp32 clip length (default 9)")
    p.add_argument("--size", type=int, default=128, help="fp32 frame side (default 128)")
    p.add_argument("--bf16-frames", type=int, default=BF16_TINY[0],
                   help=f"bf16 clip length (default {BF16_TINY[0]})")
    p.add_argument("--bf16-size", type=int, default=BF16_TINY[1],
                   help=f"bf16 frame side (default {BF16_TINY[1]})")
    p.add_argument("--dense", default="8,128", help="dense conv T,S in fp32 (default 8,128)")
    p.add_argument("--dense-bf16", default="2,32", help="dense conv T,S in bf16 (default 2,32)")
    p.add_argument("--mem-frames", default="17,161", help="clip lengths for the memory check")
    p.add_argument("--mem-size", type=int, default=64, help="frame side for the memory check")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions (best is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--official", default="", metavar="VAE3D_PY",
                   help="path to the official IV-VAE models/vae3d.py: compare side by side")
    p.add_argument("--official-memory", action="store_true",
                   help="also measure the official code's peak RSS (slow)")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--memory-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        frames, size, threads = args.memory_child
        memory_child(frames, size, threads, official=args.official)
        return 0
    if args.official:
        load_official_module(args.official)  # a bad path or a missing einops fails now
    if args.quick:
        args.frames, args.size, args.bf16_frames, args.bf16_size = 5, 8, 1, 8
        args.dense, args.dense_bf16, args.mem_frames, args.mem_size = "2,8", "1,8", "5,9", 8
        args.reps = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native_bf16 and not args.quick:
        args.bf16_frames, args.bf16_size = BF16_TINY
        args.dense_bf16 = f"2,{2 * BF16_TINY[1]}"
    dense_t, dense_s = (int(v) for v in args.dense.split(","))
    dbf_t, dbf_s = (int(v) for v in args.dense_bf16.split(","))
    mem_frames = [int(v) for v in args.mem_frames.split(",")]

    print(f"IV-VAE {PRESET}, random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if not native_bf16:
        print(f"this CPU has no native bf16 (oneDNN emulates it, ~100x slower than fp32): "
              f"bf16 rows run at {BF16_TINY[0]}x{BF16_TINY[1]}x{BF16_TINY[1]} and show the "
              f"emulation, not a speed-up", flush=True)
    # Memory first, in fresh processes, while this one is still small.
    mem = bench_memory(mem_frames, args.mem_size, args.threads)
    mem_untuned = bench_memory(mem_frames, args.mem_size, args.threads, tuned=False)
    mem_off = bench_memory(mem_frames, args.mem_size, args.threads, args.official) \
        if args.official and args.official_memory else []
    model = _model()
    with torch.inference_mode():  # one-frame warm-up: lazy init, oneDNN, allocator
        model.decode(model.encode(_video(1, args.size)))

    rows: list[Row] = []
    enc32, dec32, lat32 = bench_model(model, args.frames, args.size, args.reps, "float32")
    rows += [enc32, dec32]
    # bf16 runs at its own (smaller) size; fp32 at that size gives the like-for-like speedup.
    same = (args.bf16_frames, args.bf16_size) == (args.frames, args.size)
    enc32s, dec32s, lat32s = (enc32, dec32, lat32) if same else bench_model(
        model, args.bf16_frames, args.bf16_size, args.reps, "float32")
    enc16, dec16, lat16 = bench_model(model, args.bf16_frames, args.bf16_size, args.reps,
                                      "bfloat16")
    rows += [enc16, dec16] if same else [enc32s, dec32s, enc16, dec16]
    official: Official | None = None
    official_s: Official | None = None
    if args.official:
        official = bench_official(args.official, model, args.frames, args.size, args.reps,
                                  lat32)
        official_s = official if same else bench_official(
            args.official, model, args.bf16_frames, args.bf16_size, args.reps, lat32s)
        rows += [official.encode, official.decode]
        if not same:
            rows += [official_s.encode, official_s.decode]
    dense = [bench_dense(dense_t, dense_s, args.reps, "float32", cl) for cl in (False, True)]
    dense_bf16 = bench_dense(dbf_t, dbf_s, 1, "bfloat16", True)
    dense_fp32_small = bench_dense(dbf_t, dbf_s, 1, "float32", True)
    rows += [*dense, dense_fp32_small, dense_bf16]
    print()
    print_table(rows)

    ceiling = max(d.gflops for d in dense)
    eff_enc, eff_dec = enc32.gflops / ceiling, dec32.gflops / ceiling
    sp_enc, sp_dec = enc32s.best / enc16.best, dec32s.best / dec16.best
    sp_dense = dense_fp32_small.best / dense_bf16.best
    rel = float((lat16 - lat32s).norm() / lat32s.norm())
    print()
    print(f"dense conv3d fp32 ceiling (best layout): {ceiling:.1f} GFLOP/s")
    print(f"model fp32 encode / dense fp32: {eff_enc:6.1%}")
    print(f"model fp32 decode / dense fp32: {eff_dec:6.1%}")
    print(f"bf16 speedup over fp32: encode {sp_enc:.3f}x, decode {sp_dec:.3f}x, "
          f"dense conv3d {sp_dense:.3f}x")
    print(f"bf16 latent relative error: {rel:.2e}  (target <= {TARGET_BF16_ERROR:.0%}: "
          f"{_verdict(rel <= TARGET_BF16_ERROR)})")

    vs: dict[str, float] = {}
    print()
    if official is None or official_s is None:
        print("official comparison: skipped (no --official path to the official "
              "models/vae3d.py)")
    else:
        vs = {
            "fp32_encode": official.encode.best / enc32.best,
            "fp32_decode": official.decode.best / dec32.best,
            "fp32": (official.encode.best + official.decode.best) / (enc32.best + dec32.best),
            "bf16_encode": official_s.encode.best / enc16.best,
            "bf16_decode": official_s.decode.best / dec16.best,
            "bf16": (official_s.encode.best + official_s.decode.best)
            / (enc16.best + dec16.best),
        }
        print(f"official vs ours (same weights, same clip {official.encode.workload}): "
              f"latent max |diff| {official.latent_max_abs:.2e}, reconstruction max |diff| "
              f"{official.video_max_abs:.2e}")
        print(f"ours fp32 vs official fp32 ({official.encode.workload}): "
              f"{vs['fp32']:.2f}x (encode {vs['fp32_encode']:.2f}x, decode "
              f"{vs['fp32_decode']:.2f}x)  (target >= {TARGET_VS_OFFICIAL_FP32}x: "
              f"{_verdict(vs['fp32'] >= TARGET_VS_OFFICIAL_FP32)})")
        print(f"ours bf16 vs official fp32 ({official_s.encode.workload}): "
              f"{vs['bf16']:.2f}x (encode {vs['bf16_encode']:.2f}x, decode "
              f"{vs['bf16_decode']:.2f}x)  (target >= {TARGET_VS_OFFICIAL_BF16}x: "
              f"{_verdict(vs['bf16'] >= TARGET_VS_OFFICIAL_BF16)})"
              + ("" if native_bf16 else "  [bf16 emulated on this CPU]"))

    print()
    growth = print_memory("ours: encode_moments memory", mem)
    print(f"  (as the service runs: glibc mmap threshold 1 MiB; target <= "
          f"{TARGET_MEMORY_GROWTH:.0%}: {_verdict(growth <= TARGET_MEMORY_GROWTH)})")
    growth_untuned = print_memory("ours, glibc defaults (IVVAE_TUNE_MALLOC=0)", mem_untuned)
    growth_off = print_memory("official: encode memory", mem_off) if mem_off else None

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "rows": [{"name": r.name, "workload": r.workload, "gflop": r.gflop,
                          "times": r.times, "gflops": r.gflops, "fps": r.fps}
                         for r in rows],
                "native_bf16": native_bf16,
                "efficiency": {"encode": eff_enc, "decode": eff_dec},
                "bf16_speedup": {"encode": sp_enc, "decode": sp_dec, "dense": sp_dense},
                "bf16_latent_rel_error": rel,
                "vs_official": vs,
                "memory": mem, "memory_growth": growth,
                "memory_untuned": mem_untuned, "memory_growth_untuned": growth_untuned,
                "official_memory": mem_off, "official_memory_growth": growth_off,
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
