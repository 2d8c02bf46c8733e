"""The ``ivvae encode-dataset`` command line: its arguments, the job and encoder they make,
and its exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..core.names import PRECISIONS
from ..errors import IVVAEError
from ..storage import (
    storage_errors,
)
from .encoders import EncoderSpec
from .job import FORMATS, SHARD_CLIPS, SHARD_MB, ClipOptions, DatasetError
from .run import Job, Summary, run_job
from .sources import CAPTION_COLUMNS, PATH_COLUMNS, Columns

if TYPE_CHECKING:
    pass

_T = TypeVar("_T")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _index_shard(args: argparse.Namespace) -> tuple[int, int]:
    """``--shard``, or a Kubernetes Indexed Job's pod index and completions."""
    if args.shard is not None:
        i, n = args.shard
        return i, n
    index = os.environ.get("JOB_COMPLETION_INDEX")
    count = os.environ.get("IVVAE_SHARD_COUNT")
    if index is not None and count is not None:
        return _shard(f"{index}/{count}")
    return 0, 1


# Options that mean something only with another: given without it they would be ignored,
# and a run that silently did something else than asked (another model's weights, one
# shard size for files) is worse than a refusal. (option, where it applies, applies?)
_APPLIES: tuple[tuple[tuple[str, ...], str, Callable[[argparse.Namespace], bool]], ...] = (
    (("weights", "device", "encode_precision"),
     "only to the in-process model: with --server the server's model encodes (choose it "
     "with --model)", lambda a: not a.server),
    (("api_key", "ca_cert"), "only with --server", lambda a: bool(a.server)),
    (("address", "workers", "cpus_per_worker", "gpus_per_worker"),
     "only with --engine ray", lambda a: a.engine == "ray"),
)


def _given(value: _T | None, default: _T) -> _T:
    """An option's value, or its default when not given (not ``or``: 0 is a value, and
    refused by name where it is out of range)."""
    return default if value is None else value


def _check_applicable(args: argparse.Namespace) -> None:
    for names, where, applies in _APPLIES:
        given = [n for n in names if getattr(args, n, None) is not None]
        if given and not applies(args):
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise DatasetError(f"{flags} {'applies' if len(given) == 1 else 'apply'} {where}")


def job_from_args(args: argparse.Namespace) -> tuple[Job, EncoderSpec]:
    from ..video.preprocess import PREPROCESS_KEYS, Preprocess

    _check_applicable(args)
    if args.ca_cert is not None and not os.path.isfile(args.ca_cert):
        raise DatasetError(f"--ca-cert {args.ca_cert}: no such file")
    params: list[tuple[str, str]] = []
    for name in PREPROCESS_KEYS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value] if value is not None else []:
            params.append((name, str(v)))
    try:
        preprocess = Preprocess.parse(params)
    except IVVAEError as exc:
        raise DatasetError(exc.detail) from exc
    options = ClipOptions(model=args.model, sample=args.sample, seed=args.seed,
                          dtype=args.dtype, moments=args.moments,
                          preprocess="" if preprocess.is_identity else preprocess.canonical())
    job = Job(args.src, args.out, format=args.format, options=options,
              shard=_index_shard(args), concurrency=args.concurrency,
              shard_clips=_given(args.shard_clips, SHARD_CLIPS),
              shard_bytes=int(_given(args.shard_mb, SHARD_MB) * 2**20),
              new_version=args.new_version,
              columns=Columns(args.path_column or "", args.caption_column or "",
                              Columns.parse_options(args.option_column or [])))
    spec = EncoderSpec(server=args.server or "", weights=args.weights or "",
                       device=args.device or "cpu",
                       encode_precision=args.encode_precision or PRECISIONS[0],
                       api_key=args.api_key or os.environ.get("IVVAE_API_KEY"),
                       ca_cert=args.ca_cert, timeout=args.timeout, retries=args.retries)
    return job, spec


class Engine(Protocol):
    """Runs a whole job elsewhere (``ivvae.ray.run_on_ray``)."""

    def __call__(self, job: Job, spec: EncoderSpec, *, address: str | None, workers: int,
                 cpus_per_worker: float, gpus_per_worker: float,
                 summary: Summary) -> Summary: ...


def main(args: argparse.Namespace, engine: Engine | None = None) -> int:
    """The ``encode-dataset`` subcommand (arguments: see ``add_arguments``); ``engine``
    runs it when ``--engine`` is not ``local`` (the CLI passes Ray's: nothing here may
    import it)."""
    summary = Summary()

    def report(code: int) -> int:
        print(json.dumps(summary.as_dict()))
        return code

    try:
        job, spec = job_from_args(args)
        if args.engine != "local":
            if engine is None:
                raise DatasetError(f"--engine {args.engine} is not available here")
            engine(job, spec, address=_given(args.address, "auto"),
                   workers=_given(args.workers, 1),
                   cpus_per_worker=_given(args.cpus_per_worker, 1.0),
                   gpus_per_worker=_given(args.gpus_per_worker, 0.0), summary=summary)
            return report(1 if summary.failed else 0)

        async def run() -> Summary:
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run_job(job, spec.build(), progress=not args.no_progress,
                                 summary=summary)

        asyncio.run(run())
    except DatasetError as exc:
        print(f"encode-dataset: {exc}", file=sys.stderr)
        return report(2) if summary.output else 2  # given up mid-run: what it had done
    except storage_errors() as exc:  # the output failed mid-run (a full disk, no endpoint)
        print(f"encode-dataset: stopped: {exc}; what was published is kept: run it again "
              "to finish", file=sys.stderr)
        return report(2) if summary.output else 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("encode-dataset: interrupted; run it again to finish", file=sys.stderr)
        summary.interrupted = True
        return report(130)
    return report(1 if summary.failed else 0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``encode-dataset`` arguments."""
    from ..video.preprocess import OPTION_HELP, PREPROCESS_KEYS

    p.add_argument("src", metavar="SRC", help="a folder, URL prefix, glob or list file")
    p.add_argument("out", metavar="OUT", help="a folder or URL prefix")
    p.add_argument("--path-column", help="a .csv/.jsonl/.json list's column naming the clips "
                   f"(default: the first of {', '.join(PATH_COLUMNS)})")
    p.add_argument("--caption-column", help="its column of captions, stored as the .txt "
                   f"sidecar (default: the first of {', '.join(CAPTION_COLUMNS)})")
    p.add_argument("--option-column", action="append", metavar="OPTION[=COLUMN]",
                   help="a preprocessing option each row of a .csv/.jsonl/.json list sets "
                   "for its clip, from its column COLUMN (default: the column named OPTION); "
                   "repeatable. One file in rows with other options is a clip per row: "
                   "windows of a long video (--option-column start_s --option-column "
                   "num_frames)")
    p.add_argument("--format", choices=FORMATS, default="files",
                   help="files: one latent file per video; webdataset: tar shards; parquet: "
                   "parquet shards (default: files)")
    p.add_argument("--server", help="encode through this service: grpc://HOST:PORT, "
                   "HOST:PORT or http(s)://HOST:PORT (default: in-process model)")
    p.add_argument("--weights", help="in-process weights file (default: bundled)")
    p.add_argument("--device", help="in-process torch device (cpu, cuda:0; default: cpu)")
    p.add_argument("--encode-precision", choices=PRECISIONS,
                   help=f"in-process encoder compute precision (default: {PRECISIONS[0]})")
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="this worker's share (default: $JOB_COMPLETION_INDEX/"
                   "$IVVAE_SHARD_COUNT when both are set, else 0/1)")
    p.add_argument("--shard-clips", type=int, help="clips per shard; with --format files, "
                   f"per published part of the manifest (default: {SHARD_CLIPS})")
    p.add_argument("--shard-mb", type=float,
                   help=f"MiB per shard (or part) at most (default: {SHARD_MB:g})")
    p.add_argument("--new-version", action="store_true",
                   help="OUT holds a different job: write this one to OUT/versions/<key>/")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: encode actors on a Ray cluster "
                   "(default: local)")
    p.add_argument("--address", help="Ray cluster address (--engine ray; default 'auto': "
                   "the cluster this machine belongs to, 'local': start one here)")
    p.add_argument("--workers", type=int, help="Ray encode actors (default: 1)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs per Ray encode actor (default: 1)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="with --device cuda: GPUs per Ray encode actor (e.g. 1; default 0)")
    p.add_argument("--concurrency", type=int, default=4, help="clips in flight (default 4)")
    p.add_argument("--api-key", help="default: $IVVAE_API_KEY")
    p.add_argument("--ca-cert", help="PEM CA bundle for https:// or grpcs:// servers with a "
                   "private CA (default: the system's roots)")
    p.add_argument("--model", default="", help="model name (default: the service's default)")
    p.add_argument("--sample", action="store_true", help="sample the posterior")
    p.add_argument("--seed", type=int, help="seed for --sample (default: drawn per video, "
                   "recorded in each latent)")
    p.add_argument("--dtype", default=PRECISIONS[0], choices=PRECISIONS,
                   help=f"dtype of the stored latents (default: {PRECISIONS[0]})")
    p.add_argument("--moments", action="store_true", help="also store mu and logvar")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per video")
    p.add_argument("--retries", type=int, default=6,
                   help="retries of a video on UNAVAILABLE / no connection (default 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    for name in PREPROCESS_KEYS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=OPTION_HELP[name],
                       action="append" if name == "bucket" else "store")
