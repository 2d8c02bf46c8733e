"""IV-VAE on a CUDA GPU: conformance, precision cost and throughput, in one run.

Needs a CUDA device (CI has none; run it where one is lent)::

    python bench/bench_cuda.py --json cuda.json

1. The golden vectors (``tests/data/golden``) on the GPU in true fp32 (TF32 off): max abs
   error against the official outputs, the same 1e-4 bar as on the CPU.
2. For a random-weight ``ivvae_z16_dim64`` on a ``--frames`` x ``--size``² clip:
   encode and decode frames/s in fp32 (TF32 off), fp32 with TF32, bf16 and fp16 (autocast,
   ``set_precision``), and each lower precision's relative latent / reconstruction error
   against true fp32. Timings are CUDA-synchronised medians of ``--reps`` runs after warm-up.
3. Effective TFLOP/s from FlopCounterMode on a meta-device copy (as ``bench_model.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

from ivvae.model import IVVAE, PRESETS  # noqa: E402
from ivvae.model.golden import verify_golden  # noqa: E402


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(cfg_name: str, frames: int, size: int) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = IVVAE(PRESETS[cfg_name])
        video = torch.empty(1, 3, frames, size, size)
        with FlopCounterMode(display=False) as enc:
            lat = model.encode(video)
        with FlopCounterMode(display=False) as dec:
            model.decode(lat, num_frames=frames, height=size, width=size)
    return float(enc.get_total_flops()), float(dec.get_total_flops())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="ivvae_z16_dim64")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    out: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "preset": args.preset, "frames": args.frames, "size": args.size,
                              "batch": args.batch}

    # 1. goldens on the GPU (verify_golden turns TF32 off and runs on the CPU model; we
    #    move the weights to the GPU by loading and comparing here)
    from safetensors import safe_open

    from ivvae.model import load_model
    from ivvae.model.config import IVVAEConfig

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    golden = {}
    for path in sorted((ROOT / "tests" / "data" / "golden").glob("*.safetensors")):
        cpu = verify_golden(path)
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k[len("state_dict."):]: f.get_tensor(k) for k in f.keys()  # noqa: SIM118
                  if k.startswith("state_dict.")}
            video = f.get_tensor("input.video").to(dev)
            exp_lat = f.get_tensor("expected.latent")
            exp_rec = f.get_tensor("expected.recon")
        cfg = IVVAEConfig.from_metadata(meta)
        model = load_model(sd, device="cuda", scale_factor=cfg.scale_factor,
                           shift_factor=cfg.shift_factor)
        with torch.no_grad():
            lat = model.encode(video)
            rec = model.decode(lat, num_frames=video.shape[2], height=video.shape[3],
                               width=video.shape[4])
        golden[path.name] = {
            "cuda_latent_max_abs": float((lat.cpu() - exp_lat).abs().max()),
            "cuda_recon_max_abs": float((rec.cpu() - exp_rec).abs().max()),
            "cpu_passed": cpu.passed,
        }
    out["golden"] = golden

    # 2. speed and precision on a preset
    torch.manual_seed(0)
    model = IVVAE(PRESETS[args.preset]).to(dev).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    video = (torch.rand(args.batch, 3, args.frames, args.size, args.size, device=dev,
                        generator=g) * 2 - 1)
    enc_flops, dec_flops = _flops(args.preset, args.frames, args.size)
    enc_flops *= args.batch
    dec_flops *= args.batch
    out["gflop_encode"] = enc_flops / 1e9
    out["gflop_decode"] = dec_flops / 1e9
    results = {}
    ref_lat = ref_rec = None
    for mode in ("fp32", "tf32", "bf16", "fp16"):
        torch.backends.cudnn.allow_tf32 = mode == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        prec = {"bf16": "bfloat16", "fp16": "float16"}.get(mode, "float32")
        model.set_precision(encode=prec, decode=prec)
        with torch.no_grad():
            lat = model.encode(video)
            rec = model.decode(lat, num_frames=args.frames, height=args.size, width=args.size)
            def run_decode(latent: torch.Tensor = lat) -> torch.Tensor:
                return model.decode(latent, num_frames=args.frames, height=args.size,
                                    width=args.size)

            t_enc = _time(lambda: model.encode(video), args.reps)
            t_dec = _time(run_decode, args.reps)
        if ref_lat is None:
            ref_lat, ref_rec = lat, rec
        assert ref_rec is not None
        n = args.batch * args.frames
        results[mode] = {
            "encode_fps": n / t_enc, "decode_fps": n / t_dec,
            "encode_tflops": enc_flops / t_enc / 1e12, "decode_tflops": dec_flops / t_dec / 1e12,
            "latent_rel_err": _rel(lat, ref_lat), "recon_rel_err": _rel(rec, ref_rec),
            "finite": bool(torch.isfinite(lat).all() and torch.isfinite(rec).all()),
        }
        print(mode, json.dumps(results[mode]), flush=True)
    out["results"] = results
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
