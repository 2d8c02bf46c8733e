"""``ivvae triton-serve``: Triton with the ivvae models, without Docker.

    ivvae triton-serve --weights W [--format torchscript|onnx] --workdir DIR \\
        [--http-port 8100 --grpc-port 8101 --metrics-port 8102]

1. :func:`ensure_artifacts` exports the weights into ``DIR/artifacts/<format>-<key>/``
   unless a complete export is there; the key covers the weights hash, the format, the
   ivvae version, the artifact contract version and the model code.
2. :func:`prepare` copies ``model_repository/`` to ``DIR/model_repository`` and writes the
   parameters the models read (``ARTIFACT_DIR``, ``ARTIFACT_FORMAT``, ``MODEL_INFO``,
   ``PRECISION``, optionally ``SEQUENCE_TTL_S`` and ``NUM_THREADS``) and the venv the python
   stub activates (``ivvae.devtools.repository``); ``SEQUENCE_TTL_S`` also becomes Triton's
   ``max_sequence_idle_microseconds``.
3. ``tritonserver`` from the ``nvidia-pytriton`` wheel starts on 127.0.0.1 and serves until
   SIGTERM or SIGINT.

:func:`start` does all three and returns the running server: ``ivvae triton-serve`` (which
the local stack runs as a process) and ``bench/bench_triton.py`` use it. The container image
does the same with ``docker/triton-entrypoint.sh``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LOCAL_TRITON_GRPC_PORT, LOCAL_TRITON_HTTP_PORT, LOCAL_TRITON_METRICS_PORT
from ..core.artifacts import (
    DEFAULT_FORMAT,
    EXPORT_VERSION,
    FORMATS,
    ArtifactError,
    read_manifest,
)
from ..core.names import PRECISIONS
from ..core.version import __version__
from ..triton import contract as c
from .repository import prepare_repository
from .triton_launcher import TritonServer, serve_until, start_triton, stop_on_signals

log = logging.getLogger("ivvae.devtools.triton_serve")

REPOSITORY_ENV = "IVVAE_MODEL_REPOSITORY"
# The committed repository, in a source checkout (service/ivvae/devtools/x.py -> root).
_CHECKOUT_REPOSITORY = Path(__file__).resolve().parents[3] / "model_repository"


def default_repository() -> Path:
    """``$IVVAE_MODEL_REPOSITORY``, else ``model_repository/`` of this source checkout."""
    path = Path(os.environ.get(REPOSITORY_ENV) or _CHECKOUT_REPOSITORY)
    if not (path / c.ENCODER_MODEL / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no ivvae model repository at {path}: pass --repository or set "
                                f"{REPOSITORY_ENV}")
    return path


def artifact_key(weights_sha256: str, fmt: str) -> str:
    """What an export depends on, as a short hex id: the weights, the format, the ivvae
    version, the artifact contract and the model code (``ivvae/model/*.py``), so that a
    changed network is exported again even within one version."""
    code = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted([*(package / "model").glob("*.py"), *(package / "core").glob("*.py")]):
        code.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    text = f"{weights_sha256}|{fmt}|{__version__}|{EXPORT_VERSION}|{code.hexdigest()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_artifacts(weights: str, fmt: str, root: Path, *, name: str = "") -> Path:
    """The artifact directory for ``weights`` in ``fmt`` under ``root``, exported first when
    missing or stale. Other exports of the same format under ``root`` are removed."""
    from ..model.export import export_artifacts
    from ..weights import load_weights

    model, info = load_weights(weights or None, name=name)  # the hash is of the tensors
    target = root / f"{fmt}-{artifact_key(info.weights_sha256, fmt)}"
    try:
        manifest = read_manifest(target)
        if manifest.weights_sha256 == info.weights_sha256 and manifest.model["name"] == (
                info.name):
            log.info("artifacts are current: %s", target)
            return target
    except ArtifactError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    try:
        log.info("exporting %s artifacts of %s to %s", fmt, info.name, target)
        export_artifacts(model, partial, fmt, info.as_dict())
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    for old in root.glob(f"{fmt}-*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return target


def model_parameters(artifact_dir: Path, *, precision: str = PRECISIONS[0],
                     sequence_ttl_s: float | None = None,
                     num_threads: int | None = None) -> dict[str, str]:
    """The model-config parameters for serving ``artifact_dir`` (both models)."""
    manifest = read_manifest(artifact_dir)
    params = {
        c.ARTIFACT_DIR: str(Path(artifact_dir).absolute()),
        c.ARTIFACT_FORMAT: manifest.format,
        c.MODEL_INFO: manifest.model_info.to_json(),
        c.PRECISION: precision,
    }
    if sequence_ttl_s is not None:
        params[c.SEQUENCE_TTL_S] = f"{sequence_ttl_s:g}"
    if num_threads:
        params[c.NUM_THREADS] = str(num_threads)
    return params


def prepare(artifact_dir: Path, workdir: Path, *, repository: Path | None = None,
            parameters: Mapping[str, str] | None = None, **options: Any) -> Path:
    """A runnable copy of the model repository in ``workdir/model_repository``.

    ``options`` go to :func:`model_parameters`; ``parameters`` are set on top (both models).
    """
    values = model_parameters(artifact_dir, **options)
    values.update(parameters or {})
    return prepare_repository(repository or default_repository(),
                              Path(workdir) / "model_repository", parameters={"*": values})


@dataclass(frozen=True)
class ServeOptions:
    weights: str = ""
    format: str = DEFAULT_FORMAT
    name: str = ""
    precision: str = PRECISIONS[0]
    sequence_ttl_s: float | None = None
    num_threads: int | None = None
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    ready_timeout: float = 300


def start(workdir: Path, options: ServeOptions, *,
          repository: Path | None = None) -> TritonServer:
    """Export if needed, prepare the repository, start tritonserver (ready on return)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts = ensure_artifacts(options.weights, options.format, workdir / "artifacts",
                                 name=options.name)
    prepared = prepare(artifacts, workdir, repository=repository, precision=options.precision,
                       sequence_ttl_s=options.sequence_ttl_s, num_threads=options.num_threads)
    return start_triton(prepared, http_port=options.http_port, grpc_port=options.grpc_port,
                        metrics_port=options.metrics_port,
                        log_path=workdir / "tritonserver.log",
                        ready_timeout=options.ready_timeout)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..core.ports import ensure_free

    # Before the export (tens of seconds): a busy port would otherwise be found only after
    # it, with the other server answering the readiness checks meanwhile.
    for what, port in (("Triton HTTP", args.http_port), ("Triton gRPC", args.grpc_port),
                       ("Triton metrics", args.metrics_port)):
        ensure_free("127.0.0.1", port, what)
    stop = stop_on_signals()
    options = ServeOptions(
        weights=args.weights, format=args.format, name=args.name, precision=args.precision,
        sequence_ttl_s=args.sequence_ttl, num_threads=args.threads, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        ready_timeout=args.ready_timeout,
    )
    try:
        server = start(Path(args.workdir), options, repository=args.repository)
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return serve_until(server, stop)


def add_parser(sub: Any) -> None:
    """Register ``triton-serve`` on the ``ivvae`` subcommand parsers."""
    p = sub.add_parser("triton-serve", help="export (if needed) and serve the ivvae models "
                       "with the tritonserver of the nvidia-pytriton wheel, on 127.0.0.1")
    p.add_argument("--weights", default="", help="weights file; default: the bundled model")
    p.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                   help=f"artifact format (default: {DEFAULT_FORMAT})")
    p.add_argument("--name", default="", help="model name (default: from the weights)")
    p.add_argument("--workdir", default=".ivvae/triton",
                   help="artifacts, the prepared repository and the server log go here")
    p.add_argument("--repository", type=Path, default=None,
                   help=f"committed model repository (default: ${REPOSITORY_ENV} or the "
                   "checkout's model_repository/)")
    for flag, default, what in (("--http-port", LOCAL_TRITON_HTTP_PORT, "HTTP"),
                                ("--grpc-port", LOCAL_TRITON_GRPC_PORT, "gRPC (the gateway's "
                                 "IVVAE_TRITON_URL)"),
                                ("--metrics-port", LOCAL_TRITON_METRICS_PORT, "metrics")):
        p.add_argument(flag, type=int, default=default,
                       help=f"Triton's {what} port on 127.0.0.1 (default: {default})")
    p.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                   help="compute precision (TorchScript only)")
    p.add_argument("--sequence-ttl", type=float, default=None, metavar="SECONDS",
                   help="drop a video's state after this long without a step")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per model instance (default: the library's)")
    p.add_argument("--ready-timeout", type=float, default=300, metavar="SECONDS",
                   help="how long tritonserver may take to load the models (default: 300)")
    p.set_defaults(handler=_serve)
