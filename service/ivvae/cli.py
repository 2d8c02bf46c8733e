"""The ``ivvae`` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .core.names import DEFAULT_CRF, PRECISIONS

if TYPE_CHECKING:
    from .config import Settings

Handler = Callable[[argparse.Namespace], int]


def _verify_golden(args: argparse.Namespace) -> int:
    from .model.golden import verify_golden

    ok = True
    for path in args.files:
        try:
            result = verify_golden(path)
        except (OSError, ValueError) as exc:
            print(json.dumps({"file": path, "error": str(exc), "passed": False}))
            ok = False
            continue
        print(json.dumps(result.as_dict()))
        ok = ok and result.passed
    return 0 if ok else 1


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .train.config import TrainConfig
    from .train.trainer import Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cfg = TrainConfig(**values)
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        trainer = Trainer(cfg)
        resumed = trainer.resume()
        if trainer.rank == 0:
            where = (f"resumed at step {trainer.step}" if resumed
                     else f"from {cfg.init_weights}" if cfg.init_weights else "from scratch")
            print(f"training {where}; {cfg.total_steps} steps in all; out={cfg.out}",
                  file=sys.stderr)
        if not args.export_only:
            trainer.fit(progress=not args.no_progress, max_steps=args.max_steps)
        if args.export and trainer.rank == 0:
            model_cfg = trainer.export_model(args.export)
            print(f"wrote {args.export} (scale {model_cfg.scale_factor}, "
                  f"shift {model_cfg.shift_factor})", file=sys.stderr)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from IVVAE_* environment variables, overridden by explicit CLI options."""
    from pydantic import ValidationError

    from .config import Settings

    values = {k: v for k, v in vars(args).items()
              if k in Settings.model_fields and v is not None}
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:  # a message, not a traceback
        lines = [f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                 for e in exc.errors()]
        raise SystemExit("ivvae: invalid settings (IVVAE_* environment or options):\n"
                         + "\n".join(lines)) from None


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from .server import serve

    settings = _settings(args)
    _setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _encode_dataset(args: argparse.Namespace) -> int:
    from .dataset import main as encode_dataset

    if args.engine != "ray":
        return encode_dataset(args)
    try:
        from .ray import run_on_ray
    except ModuleNotFoundError as exc:
        print(f"encode-dataset: --engine ray needs ray: pip install 'ivvae[ray]' ({exc})",
              file=sys.stderr)
        return 2
    return encode_dataset(args, engine=run_on_ray)


def _encode(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from .core.files import atomic_write
    from .errors import IVVAEError
    from .pipeline import EncodeOptions
    from .service import Service
    from .video import Preprocess

    settings = _settings(args, backend="local", redis_url="")
    _setup_logging(settings.log_level if args.verbose else "warning")

    async def run() -> int:
        options = EncodeOptions(model=args.model or "", sample=args.sample, seed=args.seed,
                                dtype=args.dtype, include_moments=args.moments,
                                preprocess=Preprocess.parse(_pairs(args.options)))
        service = Service(settings)
        await service.start()
        try:
            with _progress("encode", args.no_progress) as bar:
                result = await service.pipeline.encode(Path(args.input), options,
                                                       on_frames=bar)
        finally:
            await service.close()
        out = args.output or str(Path(args.input).with_suffix(".latent.safetensors"))
        atomic_write(out, result.data)
        print(json.dumps({"output": out, "latent_shape": list(result.latent_shape),
                          "model": result.info.model_name, "frames": result.info.num_frames,
                          "seconds": round(result.seconds, 3)}))
        return 0

    try:
        return asyncio.run(run())
    except IVVAEError as exc:
        print(f"error ({exc.code}): {exc.detail}", file=sys.stderr)
        return 2


def _decode(args: argparse.Namespace) -> int:
    import asyncio
    from collections.abc import AsyncIterator
    from pathlib import Path

    import numpy as np

    from .core.files import atomic_write, atomic_writer
    from .errors import InvalidInput, IVVAEError
    from .outputs import OutputFormat, render, render_batch
    from .service import Service
    from .wire import DecodeTarget, is_ivvae_latent_file, read_bare_latent

    settings = _settings(args, backend="local", redis_url="")
    _setup_logging(settings.log_level if args.verbose else "warning")
    out = args.output or str(Path(args.input).with_suffix(".mp4"))
    fmt: OutputFormat = "frames" if out.endswith(".safetensors") else "mp4"

    async def run() -> int:
        service = Service(settings)
        await service.start()
        try:
            data = Path(args.input).read_bytes()
            target = _pairs(args.options)
            if not is_ivvae_latent_file(data):
                latent, dtype = read_bare_latent(data)
                info, items = await service.pipeline.decode_bare(
                    latent, dtype, DecodeTarget.parse(target))
                body, _ = await render_batch(fmt, info, items, crf=args.crf)
                await asyncio.to_thread(atomic_write, out, body)
                print(json.dumps({"output": out, "batch": len(items),
                                  "frames": info.num_frames, "width": info.width,
                                  "height": info.height}))
                return 0
            if target:
                raise InvalidInput("--options are for bare latents: a latent file from "
                                   "encode records its own model, size and fps")
            info, frames = await service.pipeline.decode_frames(data)
            with _progress("decode", args.no_progress, total=info.num_frames) as bar:
                async def counted() -> AsyncIterator[np.ndarray]:
                    async for part in frames:
                        bar(len(part))
                        yield part

                with atomic_writer(out) as f:
                    async for chunk in render(fmt, info, counted(), crf=args.crf):
                        await asyncio.to_thread(f.write, chunk)
        finally:
            await service.close()
        print(json.dumps({"output": out, "frames": info.num_frames, "width": info.width,
                          "height": info.height}))
        return 0

    try:
        return asyncio.run(run())
    except IVVAEError as exc:
        print(f"error ({exc.code}): {exc.detail}", file=sys.stderr)
        return 2


def _pairs(options: list[str] | None) -> list[tuple[str, str]]:
    """``--options NAME=VALUE ...`` as (name, value) pairs; a malformed one is refused."""
    from .errors import InvalidInput

    pairs = []
    for option in options or []:
        name, sep, value = option.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--options takes NAME=VALUE, got {option!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


class _progress:
    """A tqdm bar as a frames callback (no-op when disabled)."""

    def __init__(self, desc: str, disabled: bool, total: int | None = None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit="frame", total=total, disable=disabled,
                        dynamic_ncols=True)

    def __enter__(self) -> Callable[[int], None]:
        def advance(n: int) -> None:
            self.bar.update(n)

        return advance

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _add_service_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="weights file (.pth/.safetensors); default: bundled")
    p.add_argument("--device", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--encode-precision", choices=PRECISIONS)
    p.add_argument("--decode-precision", choices=PRECISIONS)
    p.add_argument("--groups-per-step", type=int, help="frame groups per model step")


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train import evaluate
    from .weights import load_weights

    model, info = load_weights(args.weights or None)
    reports = evaluate.evaluate(model, args.videos, precisions=args.precision,
                                max_frames=args.max_frames)
    table = evaluate.format_table(reports)
    header = f"# ivvae eval: model {info.name} (weights {info.weights_sha256[:12]})\n\n"
    print(header + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text(header + table + "\n")
        (out / "eval.json").write_text(evaluate.to_json(reports))
        evaluate.plot(reports, out / "eval.png")
        print(f"wrote {out / 'eval.md'}, eval.json and eval.png", file=sys.stderr)
    return 0


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --option per dataclass field (defaults stay in the dataclass)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {default})")
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="+", type=item, default=None,
                                help=f"(default {default or 'built-in'})")
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=None,
                                help=f"(default {default})")
        else:
            required = default is dataclasses.MISSING
            parser.add_argument(flag, type=hint, default=None, required=required,
                                help=None if required else f"(default {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ivvae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify-golden", help="check the model against golden vector files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(handler=_verify_golden)

    p = sub.add_parser("eval", help="PSNR/SSIM per video, frame and group position vs a "
                       "same-size baseline; table + PNG plot")
    p.add_argument("videos", nargs="+", metavar="VIDEO")
    p.add_argument("--weights", default="", help="default: the bundled model")
    p.add_argument("--precision", nargs="+", default=list(PRECISIONS[:2]), choices=PRECISIONS)
    p.add_argument("--max-frames", type=int, default=None, help="evaluate the first N frames")
    p.add_argument("--out", default="", help="folder for eval.md, eval.json, eval.png")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("serve", help="run the HTTP and gRPC service (settings: IVVAE_* env)")
    _add_service_options(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--backend", choices=["local", "triton"])
    p.add_argument("--triton-url")
    p.add_argument("--redis-url")
    p.add_argument("--log-level")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS and gRPC over TLS")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("encode", help="encode a video file to a latent file (no server)")
    p.add_argument("input", metavar="IN")
    p.add_argument("-o", "--output", help="default: IN with .latent.safetensors")
    p.add_argument("--model", default="")
    p.add_argument("--sample", action="store_true", help="sample the posterior")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", default=PRECISIONS[0], choices=PRECISIONS)
    p.add_argument("--moments", action="store_true", help="also store mu and logvar")
    p.add_argument("--options", nargs="+", metavar="NAME=VALUE",
                   help="preprocessing, as HTTP /encode's parameters: resize=256, "
                   "bucket=480x272x17, crop=none, start_frame=0, start_s=1.5, num_frames=17, "
                   "max_frames=65, stride=2, fps=12")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_service_options(p)
    p.set_defaults(handler=_encode)

    p = sub.add_parser("decode", help="decode a latent file to .mp4 (or .safetensors frames)")
    p.add_argument("input", metavar="IN")
    p.add_argument("-o", "--output", help="OUT.mp4, or OUT.safetensors for raw frames")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="H.264 quality (lower=better)")
    p.add_argument("--options", nargs="+", metavar="NAME=VALUE",
                   help="for a bare latent (a safetensors file holding only 'latent'), as "
                   "HTTP /decode's parameters: model, fps, num_frames, height, width, "
                   "latent_space; a batch of more than one writes a zip of MP4s")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_service_options(p)
    p.set_defaults(handler=_decode)

    from .dataset import add_arguments as _dataset_arguments

    p = sub.add_parser("encode-dataset", help="encode a dataset (folder, prefix, glob or "
                       "list; local or object storage) to latent files, webdataset or parquet "
                       "shards; exact resume, --shard I/N, Ray")
    _dataset_arguments(p)
    p.set_defaults(handler=_encode_dataset)

    from .train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train an IV-VAE (stage 1 image VAE, stage 2 video VAE); torchrun for DDP",
        description="Two-stage IV-VAE training. Resumes from OUT/checkpoint when present. "
        "Multi-GPU / multi-node: torchrun --nproc-per-node N -m ivvae.cli train ...",
    )
    _add_dataclass_options(p, TrainConfig)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--export", default="", help="write inference weights here at the end")
    p.add_argument("--export-only", action="store_true", help="only --export the checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train)

    from . import export_cli
    from .devtools import triton_serve

    export_cli.add_parser(sub)
    triton_serve.add_parser(sub)

    from . import stack

    stack.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
