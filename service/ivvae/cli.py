"""The ``ivvae`` command line. Each subcommand imports what it needs when it runs.

Errors: a mistake of the user's (a missing file, a busy port, bad media, wrong weights,
Ctrl-C) is one line on stderr and a non-zero exit (2; 130 for an interrupt); anything else
is one line too, exit 1. ``--debug`` or ``IVVAE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.names import DEFAULT_CRF, PRECISIONS
from .core.version import __version__

if TYPE_CHECKING:
    from .config import Settings
    from .train.config import TrainConfig
    from .train.trainer import Trainer

Handler = Callable[[argparse.Namespace], int]
DEBUG_ENV = "IVVAE_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A user error the CLI found itself (the message is the whole story)."""


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
    from .train.trainer import newest_checkpoint, run_lock

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.export_only:
        if not args.export:
            raise CLIError("--export-only needs --export PATH: the file to write")
        # The run's own settings (its data: the factors are fitted on it); the command line
        # gives only where it is and what runs it.
        newest = newest_checkpoint(Path(args.out))
        if newest is None:
            raise CLIError(f"--export-only: there is no checkpoint in {args.out} to export "
                           "(is --out the folder of the run?)")
        values = {**{k: v for k, v in newest[1]["config"].items() if k in fields},
                  **{k: values[k] for k in ("out", "device") if k in values}}
    if args.export:
        _check_export_path(args.export)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    # The run remembers which files it trained on, not how they were spelled from here.
    values["data"] = tuple(os.path.abspath(d) for d in values.get("data", ()))
    cfg = TrainConfig(**values)
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in cfg.warnings():
            print(f"ivvae train: warning: {warning}", file=sys.stderr)
    if args.threads < 0:
        raise CLIError(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.max_steps is not None and args.max_steps < 0:
        raise CLIError(f"--max-steps must be 0 or more, got {args.max_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # Rank 0 alone writes the folder (log, checkpoints), so it alone owns it; it takes the
    # lock before joining the process group: refused, it exits, and torchrun stops the
    # other workers. An export only reads, beside the run that owns the folder.
    owner = not args.export_only and int(os.environ.get("RANK", "0")) == 0
    with run_lock(Path(cfg.out)) if owner else contextlib.nullcontext():
        return _run_training(args, cfg, distributed)


def _check_export_path(path: str) -> None:
    """Refuse an ``--export`` file that cannot be written now, not after the whole run."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise CLIError(f"--export {path} is a folder: name the weights file to write")
    if not folder.is_dir():
        raise CLIError(f"--export {path}: its folder {folder} does not exist (create it, "
                       "or name another file)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--export {path}: its folder {folder} is not writable")


def _run_training(args: argparse.Namespace, cfg: TrainConfig, distributed: bool) -> int:
    import torch

    from .train.trainer import Trainer

    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        trainer = Trainer(cfg, say=lambda line: print(f"ivvae train: {line}",
                                                      file=sys.stderr))
        if trainer.rank == 0:
            for line in trainer.skipped:
                print(f"ivvae train: warning: left out {line}", file=sys.stderr)
        resumed = _resume(trainer, read_only=args.export_only)
        if trainer.rank == 0:
            if args.export_only:
                print(f"exporting the checkpoint of step {trainer.step} of {cfg.total_steps} "
                      f"in {cfg.out}", file=sys.stderr)
            else:
                where = (f"resumed at step {trainer.step}" if resumed
                         else f"from {cfg.init_weights}" if cfg.init_weights
                         else "from scratch")
                print(f"training {where}; {cfg.total_steps} steps in all; out={cfg.out}",
                      file=sys.stderr)
                from .model.precision import cpu_bfloat16_is_emulated

                if cfg.bf16 and trainer.device.type == "cpu" and cpu_bfloat16_is_emulated():
                    print("ivvae train: warning: --bf16 on a CPU that emulates bfloat16 (no "
                          "AVX512-BF16 or AMX) runs each step several times slower than "
                          "float32 (228 s against 67 s for two steps on an AVX2 machine)",
                          file=sys.stderr)
        if not args.export_only:
            try:
                trainer.fit(progress=not args.no_progress, max_steps=args.max_steps)
            except KeyboardInterrupt as exc:
                if trainer.rank == 0:
                    _say_interrupted(trainer, exc)
                raise
        if args.export and trainer.rank == 0:
            model_cfg = trainer.export_model(args.export)
            print(f"wrote {args.export} (scale {model_cfg.scale_factor}, "
                  f"shift {model_cfg.shift_factor})", file=sys.stderr)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _say_interrupted(trainer: Trainer, exc: KeyboardInterrupt) -> None:
    from .train.trainer import Interrupted, newest_checkpoint

    if isinstance(exc, Interrupted):
        saved = f"saved the checkpoint of step {exc.step}"
    else:
        newest = newest_checkpoint(trainer.out)
        if newest is None:
            print("ivvae train: no checkpoint was saved yet; the same command starts over",
                  file=sys.stderr)
            return
        saved = f"the newest checkpoint kept is of step {newest[1]['step']}"
    print(f"ivvae train: {saved} in {trainer.out}; the same command resumes there",
          file=sys.stderr)


def _resume(trainer: Trainer, *, read_only: bool) -> bool:
    """``trainer.resume()``. Read-only (an export while the run may still be going): the
    folder is left as it is, and a save that moves the checkpoint away under the read is
    met by reading the newest one again."""
    from .model.checkpoint import CheckpointError

    if not read_only:
        return trainer.resume()
    for attempt in range(3):
        try:
            return trainer.resume(recover=False)
        except (OSError, CheckpointError):  # a file moved away under the read
            if attempt == 2:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _settings(args: argparse.Namespace, **overrides: object) -> Settings:
    """Settings from IVVAE_* environment variables, overridden by explicit CLI options."""
    from pydantic import ValidationError

    from .config import Settings, settings_problems

    values = {k: v for k, v in vars(args).items()
              if k in Settings.model_fields and v is not None}
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:  # a message, not a traceback
        lines = [f"  {line}" for line in settings_problems(exc, set(values))]
        raise SystemExit("ivvae: invalid settings (IVVAE_* environment or options):\n"
                         + "\n".join(lines)) from None


def _setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from .core.ports import ensure_free
    from .server import serve

    settings = _settings(args)
    for enabled, what, port in ((settings.enable_http, "HTTP", settings.port),
                                (settings.enable_grpc, "gRPC", settings.grpc_port)):
        if enabled:
            ensure_free(settings.host, port, what)
    _setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0


def _windows(args: argparse.Namespace) -> int:
    from .dataset.windows import main

    return main(args)


def _encode_dataset(args: argparse.Namespace) -> int:
    from .dataset.command import main as encode_dataset

    if args.engine != "ray":
        return encode_dataset(args)
    try:
        from .ray import run_on_ray
    except ModuleNotFoundError as exc:
        print(f"encode-dataset: --engine ray needs ray: pip install 'ivvae[ray]' ({exc})",
              file=sys.stderr)
        return 2
    return encode_dataset(args, engine=run_on_ray)


def _compact_dataset(args: argparse.Namespace) -> int:
    from .compact import main as compact_dataset

    return compact_dataset(args)


def _encode(args: argparse.Namespace) -> int:
    import asyncio

    from .core.files import atomic_write
    from .pipeline import EncodeOptions
    from .service import Service
    from .video import Preprocess

    source = Path(args.input)
    if not source.is_file():
        raise CLIError(f"no such video file: {source}" + _not_a_file(source))
    out = args.output or str(source.with_suffix(".latent.safetensors"))
    _check_output(out, source)
    settings = _settings(args, backend="local", redis_url="")
    _setup_logging(settings.log_level if args.verbose else "warning")

    async def run() -> int:
        options = EncodeOptions(model=args.model or "", sample=args.sample, seed=args.seed,
                                dtype=args.dtype, include_moments=args.moments,
                                preprocess=Preprocess.parse(_pairs(args.options)))
        service = Service(settings)
        await service.start()
        try:
            # The header's count is the total unless preprocessing picks frames.
            total = None if args.options else _declared_frames(source)
            with _progress("encode", args.no_progress, total=total) as bar:
                result = await service.pipeline.encode(source, options, on_frames=bar)
        finally:
            await service.close()
        atomic_write(out, result.data)
        print(json.dumps({"output": out, "latent_shape": list(result.latent_shape),
                          "model": result.info.model_name, "frames": result.info.num_frames,
                          "seconds": round(result.seconds, 3)}))
        return 0

    return asyncio.run(run())


def _not_a_file(path: Path) -> str:
    """Why an existing ``path`` is not a file the command can read, for its error."""
    if path.is_dir():
        return " (it is a folder)"
    if path.exists():  # a pipe (/dev/stdin fed by |), a device: the model seeks its input
        return " (not a regular file: save the input to a file first)"
    return ""


def _check_output(out: str, source: Path) -> None:
    """Refuse, before any work, an output that cannot be written or would lose data."""
    if out == "-":
        raise CLIError("-o -: writing to standard output is not supported; name a file")
    path = Path(out)
    if path.exists() and os.path.samefile(path, source):
        raise CLIError(f"the output {out} is the input: it would be overwritten; name "
                       "another output with -o")
    if path.is_dir():
        raise CLIError(f"the output {out} is a folder: name a file")
    if not path.parent.is_dir():
        raise CLIError(f"the output's folder {path.parent} does not exist")


def _declared_frames(path: Path) -> int | None:
    """The frame count the container header declares, for the progress bar's total and ETA
    (None when it declares none, or cannot be read: the pipeline then says why)."""
    from .video import open_video

    try:
        with open_video(path) as reader:
            return reader.info.num_frames
    except Exception:  # the pipeline reports the real error, with its code
        return None


DECODE_SUFFIXES = {".mp4": "H.264 video", ".safetensors": "raw uint8 frames",
                   ".zip": "MP4s of a bare latent batch"}


def _decode(args: argparse.Namespace) -> int:
    import asyncio
    from collections.abc import AsyncIterator

    import numpy as np

    from .core.files import atomic_write, atomic_writer
    from .errors import InvalidInput
    from .outputs import OutputFormat, render, render_batch
    from .service import Service
    from .wire import DecodeTarget, is_ivvae_latent_file, read_bare_latent

    out = args.output or str(Path(args.input).with_suffix(".mp4"))
    suffix = Path(out).suffix.lower()
    if suffix not in DECODE_SUFFIXES:
        choices = " or ".join(f"{k} ({v})" for k, v in DECODE_SUFFIXES.items())
        raise CLIError(f"cannot write {out!r}: decode writes {choices}; the output's suffix "
                       "names the container")
    source = Path(args.input)
    if not source.is_file():
        raise CLIError(f"no such latent file: {source}" + _not_a_file(source))
    _check_output(out, source)
    settings = _settings(args, backend="local", redis_url="")
    _setup_logging(settings.log_level if args.verbose else "warning")
    fmt: OutputFormat = "frames" if suffix == ".safetensors" else "mp4"
    if args.frames_dtype != "uint8" and fmt != "frames":
        raise CLIError(f"--frames-dtype {args.frames_dtype} needs OUT.safetensors: an MP4 "
                       "holds uint8 frames")

    async def run() -> int:
        service = Service(settings)
        await service.start()
        try:
            data = source.read_bytes()
            target = _pairs(args.options)
            if not is_ivvae_latent_file(data):
                latent, dtype = read_bare_latent(data)
                batch = latent.shape[0]  # (B, z, t, h, w)
                if fmt == "mp4" and (batch > 1) != (suffix == ".zip"):
                    raise CLIError(
                        f"cannot write {out!r}: this latent holds {batch} video(s); write "
                        + ("OUT.zip (MP4s) or OUT.safetensors (frames)" if batch > 1
                           else "OUT.mp4 or OUT.safetensors"))
                info, items = await service.pipeline.decode_bare(
                    latent, dtype, DecodeTarget.parse(target), args.frames_dtype)
                body, _ = await render_batch(fmt, info, items, crf=args.crf,
                                             frames_dtype=args.frames_dtype)
                await asyncio.to_thread(atomic_write, out, body)
                print(json.dumps({"output": out, "batch": len(items),
                                  "frames": info.num_frames, "width": info.width,
                                  "height": info.height}))
                return 0
            if target:
                raise InvalidInput("--options are for bare latents: a latent file from "
                                   "encode records its own model, size and fps")
            if suffix == ".zip":
                raise CLIError(f"cannot write {out!r}: a latent file holds one video; write "
                               "OUT.mp4 or OUT.safetensors")
            info, frames = await service.pipeline.decode_frames(data, args.frames_dtype)
            with _progress("decode", args.no_progress, total=info.num_frames) as bar:
                async def counted() -> AsyncIterator[np.ndarray]:
                    async for part in frames:
                        bar(len(part))
                        yield part

                with atomic_writer(out) as f:
                    async for chunk in render(fmt, info, counted(), crf=args.crf,
                                              frames_dtype=args.frames_dtype):
                        await asyncio.to_thread(f.write, chunk)
        finally:
            await service.close()
        print(json.dumps({"output": out, "frames": info.num_frames, "width": info.width,
                          "height": info.height}))
        return 0

    return asyncio.run(run())  # atomic_writer leaves no partial file when interrupted


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


def _add_console_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log at IVVAE_LOG_LEVEL "
                   "(default: warnings only)")


def _add_service_options(p: argparse.ArgumentParser, *, encode: bool = True,
                         decode: bool = True) -> None:
    p.add_argument("--weights", help="weights file (.pth/.safetensors) or a folder "
                   "save_pretrained wrote; default: the bundled model (env IVVAE_WEIGHTS)")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:1 (default: cpu)")
    if encode:
        p.add_argument("--encode-precision", choices=PRECISIONS,
                       help="encoder compute precision (default: float32)")
    if decode:
        p.add_argument("--decode-precision", choices=PRECISIONS,
                       help="decoder compute precision (default: float32)")
    p.add_argument("--groups-per-step", type=int,
                   help="4-frame groups per model step: more is faster, uses more memory "
                   "(default: 4)")


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .model.precision import cpu_bfloat16_is_emulated
    from .train import evaluate
    from .weights import load_weights

    emulated = cpu_bfloat16_is_emulated()
    if args.precision is None:  # bfloat16 beside float32 only where it is not emulated
        args.precision = ["float32"] if emulated else ["float32", "bfloat16"]
    elif "bfloat16" in args.precision and emulated:
        print("ivvae eval: bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX): each "
              "bfloat16 pass takes tens of times a float32 one", file=sys.stderr)
    model, info = load_weights(args.weights or None)
    steps = len(args.videos) * (len(args.precision) + 2)  # decode, each precision, baseline
    with tqdm(total=steps, desc="eval", unit="step", disable=args.no_progress,
              dynamic_ncols=True) as bar:
        started = False

        def progress(what: str) -> None:  # called as each step starts: count the last one
            nonlocal started
            if started:
                bar.update()
            started = True
            bar.set_postfix_str(what)

        reports = evaluate.evaluate(model, args.videos, precisions=args.precision,
                                    max_frames=args.max_frames, progress=progress)
        bar.update(steps - bar.n)
    table = evaluate.format_table(reports)
    title = f"ivvae eval: model {info.name} (weights {info.weights_sha256[:12]})"
    header = f"# {title}\n\n"
    print(header + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text(header + table + "\n")
        (out / "eval.json").write_text(evaluate.to_json(reports))
        evaluate.plot(reports, out / "eval.png")
        evaluate.write_html(reports, out / "eval.html", title=title, table=table,
                            plot_png=(out / "eval.png").read_bytes())
        print(f"wrote {out / 'eval.md'}, eval.json, eval.png and eval.html", file=sys.stderr)
    return 0


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type,
                           helps: dict[str, str]) -> None:
    """One --option per dataclass field (defaults stay in the dataclass)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default
        text = helps[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default {default})")
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="+", type=item, default=None,
                                help=text if not default else f"{text} (default {default})")
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=None,
                                help=f"{text} (default {default})")
        else:
            required = default is dataclasses.MISSING
            parser.add_argument(flag, type=hint, default=None, required=required,
                                help=text if required else f"{text} (default {default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivvae", description="IV-VAE latents for video: encode, decode, evaluate, "
        "train, export and serve.",
        epilog=f"Run 'ivvae COMMAND --help' for a command's options. --debug (or "
        f"{DEBUG_ENV}=1) shows tracebacks.")
    parser.add_argument("--version", action="version", version=f"ivvae {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("verify-golden", help="check the model against golden vector files")
    p.add_argument("files", nargs="+", metavar="FILE", help="golden .safetensors files")
    p.set_defaults(handler=_verify_golden)

    p = sub.add_parser("eval", help="PSNR/SSIM per video, frame and group position vs a "
                       "same-size baseline; table, PNG plot and HTML report")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="video files to evaluate")
    p.add_argument("--weights", default="", help="weights file; default: the bundled model")
    p.add_argument("--precision", nargs="+", default=None,
                   choices=PRECISIONS, help="compute precisions to compare (default: "
                   "float32 bfloat16, or float32 alone where this CPU emulates bfloat16)")
    p.add_argument("--max-frames", type=int, default=None, help="evaluate the first N frames")
    p.add_argument("--out", default="", help="folder for eval.md, eval.json, eval.png and "
                   "eval.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("serve", help="run the HTTP and gRPC service (settings: IVVAE_* env)")
    _add_service_options(p)
    p.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: 50051)")
    p.add_argument("--backend", choices=["local", "triton"],
                   help="run the model in this process (local, default) or on Triton")
    p.add_argument("--triton-url", help="Triton gRPC endpoint(s) for --backend triton "
                   "(default: 127.0.0.1:8101, where 'ivvae triton-serve' listens)")
    p.add_argument("--redis-url", help="Redis for the result cache, redis://host:port/db "
                   "(default: an in-memory cache)")
    p.add_argument("--log-level", help="debug, info (default), warning, error")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS and gRPC over TLS")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("encode", help="encode a video file to a latent file (no server)")
    p.add_argument("input", metavar="IN", help="video or image file")
    p.add_argument("-o", "--output", help="latent file to write (default: IN with "
                   ".latent.safetensors)")
    p.add_argument("--model", default="", help="model name (default: the loaded weights')")
    p.add_argument("--sample", action="store_true", help="sample the posterior (default: "
                   "its mean)")
    p.add_argument("--seed", type=int, help="seed for --sample (default: drawn, recorded)")
    p.add_argument("--dtype", default=PRECISIONS[0], choices=PRECISIONS,
                   help="dtype of the stored latent (default: float32)")
    p.add_argument("--moments", action="store_true", help="also store mu and logvar")
    p.add_argument("--options", nargs="+", metavar="NAME=VALUE",
                   help="preprocessing, as HTTP /encode's parameters: resize=256, "
                   "bucket=480x272x17, crop=none, start_frame=0, start_s=1.5, num_frames=17, "
                   "max_frames=65, stride=2, fps=12")
    _add_console_options(p)
    _add_service_options(p, decode=False)
    p.set_defaults(handler=_encode)

    p = sub.add_parser("decode", help="decode a latent file to .mp4 (or .safetensors frames)")
    p.add_argument("input", metavar="IN", help="latent .safetensors file")
    p.add_argument("-o", "--output", help="OUT.mp4 (H.264), OUT.safetensors for raw frames, "
                   "OUT.zip (MP4s) for a bare latent batch; the suffix decides (default: IN "
                   "with .mp4)")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="H.264 quality, 0-51, lower "
                   f"is better (default: {DEFAULT_CRF})")
    p.add_argument("--frames-dtype", choices=("uint8", "float32"), default="uint8",
                   help="of OUT.safetensors frames: uint8 (default) or float32, the "
                   "decoder's own values (about [-1, 1], not clamped)")
    p.add_argument("--options", nargs="+", metavar="NAME=VALUE",
                   help="for a bare latent (a safetensors file holding only 'latent'), as "
                   "HTTP /decode's parameters: model, fps, num_frames, height, width, "
                   "latent_space; a batch of more than one writes OUT.zip (MP4s) or one "
                   "OUT.safetensors")
    _add_console_options(p)
    _add_service_options(p, encode=False)
    p.set_defaults(handler=_decode)

    from .dataset.command import add_arguments as _dataset_arguments

    p = sub.add_parser("encode-dataset", help="encode a dataset (folder, prefix, glob or "
                       "list; local or object storage) to latent files, webdataset or parquet "
                       "shards; exact resume, --shard I/N, Ray")
    _dataset_arguments(p)
    p.set_defaults(handler=_encode_dataset)

    from .dataset.windows import add_arguments as _windows_arguments

    p = sub.add_parser("windows", help="count each clip's frames and write a table of "
                       "fixed-length windows (chunk, slide or spread) for encode-dataset")
    _windows_arguments(p)
    p.set_defaults(handler=_windows)

    from .compact import add_arguments as _compact_arguments

    p = sub.add_parser("compact-dataset", help="rewrite an encode-dataset output's shards to "
                       "hold only what its manifest names (for readers that glob shards)")
    _compact_arguments(p)
    p.set_defaults(handler=_compact_dataset)

    from .train.config import FIELD_HELP, TrainConfig

    p = sub.add_parser(
        "train",
        help="train an IV-VAE (stage 1 image VAE, stage 2 video VAE); torchrun for DDP",
        description="Two-stage IV-VAE training. Resumes from OUT/checkpoint when present. "
        "Multi-GPU / multi-node: torchrun --nproc-per-node N -m ivvae.cli train ...",
    )
    _add_dataclass_options(p, TrainConfig, FIELD_HELP)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (0: load the data and checkpoint, and "
                   "train nothing)")
    p.add_argument("--export", default="", help="write inference weights here at the end")
    p.add_argument("--export-only", action="store_true",
                   help="only --export the checkpoint in --out, with the run's own settings "
                   "(other training options are ignored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=_train)

    from . import export_cli
    from .devtools import triton_serve

    export_cli.add_parser(sub)
    triton_serve.add_parser(sub)

    from . import stack

    stack.add_parser(sub)
    for command in sub.choices.values():  # `ivvae encode --debug ...` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error instead of one line")
    return parser


def _one_line(exc: BaseException) -> str:
    from .errors import IVVAEError

    if isinstance(exc, IVVAEError):
        return f"{exc.detail} ({exc.code})"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's mistake raises: bad paths and ports (OSError), bad values and files
    (ValueError: weights, checkpoints, artifacts, safetensors), the service's own errors."""
    from .dataset.job import DatasetError
    from .errors import IVVAEError
    from .stack import StackError

    return (CLIError, IVVAEError, DatasetError, StackError, OSError, ValueError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    from .memory import tune_allocator

    tune_allocator()
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    with _terminate_as_interrupt():
        if debug:
            return handler(args)
        return _handled(args, handler)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler) ends a command as Ctrl-C does: its temporary
    files removed, exit 130. (``serve`` and ``encode-dataset`` install their own; a worker
    of ``torchrun`` keeps the default, so that torchrun's SIGTERM ends it even while it
    waits inside a collective, where a Python handler would not run.)"""
    def interrupt(signum: int, frame: Any) -> None:
        # Whatever Ctrl-C does now: under asyncio.run, cancel the main task (its clean-ups
        # run in order, then KeyboardInterrupt); elsewhere, KeyboardInterrupt here.
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)

    if (threading.current_thread() is not threading.main_thread()
            or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        yield
        return
    before = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _handled(args: argparse.Namespace, handler: Handler) -> int:
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("ivvae: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        print(f"ivvae {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        print(f"ivvae {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
