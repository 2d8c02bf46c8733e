"""Start-up helpers for the Triton container (called by ``triton-entrypoint.sh``).

Two jobs, one subcommand each:

``fingerprint --weights FILE --format FMT``
    Print a short hex id of everything an exported artifact depends on: the weights' bytes,
    the artifact format, and the installed ``ivvae`` code (version and source hash) and torch
    version. The entrypoint keeps artifacts in ``<artifact root>/<fingerprint>/``, so a
    changed weights file or a new image means a new directory and a fresh export.

``repository --src DIR --dst DIR [--set KEY=VALUE ...] [--instance-kind K] [--instance-count N]``
    Copy the committed model repository to a writable place and rewrite each
    ``config.pbtxt`` through Triton's own ``ModelConfig`` protobuf (shipped by tritonclient):
    set model parameters (``ARTIFACT_DIR``, ``ARTIFACT_FORMAT``, ``PRECISION``,
    ``SEQUENCE_TTL_S``) and, when asked, the instance group (``KIND_GPU`` in production).
    With ``ARTIFACT_DIR`` the export manifest there also gives ``MODEL_INFO`` (what the
    gateway learns about the served model); ``SEQUENCE_TTL_S`` also sets Triton's own
    ``max_sequence_idle_microseconds``, so that the slot and the model's state go together.
    The committed files stay as the CPU tests use them; only the copy changes.

Standard library, tritonclient and protobuf, and ``ivvae.triton.contract`` (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CONFIG_NAME = "config.pbtxt"
FINGERPRINT_CHARS = 16
CHUNK_BYTES = 8 * 1024 * 1024

ARTIFACT_FORMATS = ("torchscript", "onnx")
PRECISIONS = ("float32", "bfloat16", "float16")
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
# Parameters the ivvae python models read; a typo in a --set key fails here, not in Triton.
KNOWN_PARAMETERS = ("ARTIFACT_DIR", "ARTIFACT_FORMAT", "PRECISION", "SEQUENCE_TTL_S")
# Written by `ivvae export` next to the artifacts (ivvae.model.artifacts.MANIFEST_NAME; that
# module imports torch, which this helper must not).
MANIFEST_NAME = "export_manifest.json"


class PrepareError(Exception):
    """A start-up problem the operator must fix; the message says what."""


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _package_dirs(package: str) -> list[Path]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"python package {package!r} is not installed")
    return sorted(Path(location) for location in spec.submodule_search_locations)


def _source_hash(dirs: Iterable[Path]) -> str:
    """Hash of every .py file's relative path and bytes: changes whenever the code does."""
    digest = hashlib.sha256()
    for root in dirs:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def fingerprint(weights: Path, artifact_format: str, package: str = "ivvae") -> str:
    """A stable id of (weights bytes, format, ivvae code, torch version)."""
    if not weights.is_file():
        raise PrepareError(f"weights file {weights} does not exist")
    parts = [
        f"weights={_file_sha256(weights)}",
        f"format={artifact_format}",
        f"ivvae={_version(package)}",
        f"ivvae_source={_source_hash(_package_dirs(package))}",
        f"torch={_version('torch')}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:FINGERPRINT_CHARS]


def _parse_assignments(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PrepareError(f"--set {item!r} is not KEY=VALUE")
        if key not in KNOWN_PARAMETERS:
            raise PrepareError(f"--set {key}: unknown parameter (known: {KNOWN_PARAMETERS})")
        out[key] = value
    if out.get("ARTIFACT_FORMAT", ARTIFACT_FORMATS[0]) not in ARTIFACT_FORMATS:
        raise PrepareError(f"ARTIFACT_FORMAT must be one of {ARTIFACT_FORMATS}")
    if out.get("PRECISION", PRECISIONS[0]) not in PRECISIONS:
        raise PrepareError(f"PRECISION must be one of {PRECISIONS}")
    ttl = out.get("SEQUENCE_TTL_S")
    if ttl is not None:
        try:
            if float(ttl) <= 0:
                raise ValueError
        except ValueError:
            raise PrepareError(f"SEQUENCE_TTL_S must be a positive number, got {ttl!r}") from None
    return out


def _model_config_module() -> Any:
    """tritonclient's generated ``model_config_pb2`` (Triton's ModelConfig message).

    Loaded from its file when it is where tritonclient keeps it: importing it through
    ``tritonclient.grpc`` first runs that package's ``__init__``, which pulls in grpcio and
    the whole client for one message class (most of this helper's start-up time).
    """
    spec = importlib.util.find_spec("tritonclient")
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(locations[0]) / "grpc" / "model_config_pb2.py" if locations else None
    if path is None or not path.is_file():
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    file_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    if file_spec is None or file_spec.loader is None:
        raise PrepareError(f"cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def rewrite_config(
    text: str,
    parameters: dict[str, str],
    instance_kind: str | None = None,
    instance_count: int | None = None,
) -> str:
    """Return ``text`` (a config.pbtxt) with parameters and instance group replaced."""
    from google.protobuf import text_format

    model_config_pb2 = _model_config_module()
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise PrepareError(f"cannot parse model config: {exc}") from exc
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    ttl = parameters.get("SEQUENCE_TTL_S")
    if ttl and config.HasField("sequence_batching"):
        config.sequence_batching.max_sequence_idle_microseconds = round(float(ttl) * 1e6)
    if instance_kind is not None or instance_count is not None:
        # One group replaces whatever was there; what the caller leaves out is kept from the
        # first committed group (count 0 in a config means Triton's default of 1).
        kinds = model_config_pb2.ModelInstanceGroup.Kind
        first = config.instance_group[0] if config.instance_group else None
        kind_name = instance_kind or (kinds.Name(first.kind) if first else "KIND_AUTO")
        count = instance_count or (first.count if first and first.count else 1)
        del config.instance_group[:]
        config.instance_group.add(kind=kinds.Value(kind_name), count=count)
    return str(text_format.MessageToString(config))


def model_info(artifact_dir: Path, artifact_format: str | None) -> str:
    """The ``MODEL_INFO`` parameter for the export in ``artifact_dir``."""
    import json

    from ivvae.triton.contract import model_info_parameter

    path = artifact_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        value = model_info_parameter(manifest["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(f"cannot read the export manifest {path} ({exc}); export with "
                           "`ivvae export`") from None
    if artifact_format is not None and manifest.get("format") != artifact_format:
        raise PrepareError(f"ARTIFACT_FORMAT={artifact_format} but {artifact_dir} holds "
                           f"{manifest.get('format')} artifacts")
    return str(value)


def prepare_repository(
    src: Path,
    dst: Path,
    parameters: dict[str, str],
    instance_kind: str | None = None,
    instance_count: int | None = None,
) -> list[str]:
    """Copy ``src`` to ``dst`` (replacing it) and rewrite every model's config. Returns names."""
    configs = sorted(src.glob(f"*/{CONFIG_NAME}"))
    if not configs:
        raise PrepareError(f"no */{CONFIG_NAME} under model repository {src}")
    if parameters.get("ARTIFACT_DIR"):
        parameters = {**parameters, "MODEL_INFO": model_info(
            Path(parameters["ARTIFACT_DIR"]), parameters.get("ARTIFACT_FORMAT"))}
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    names = []
    for config in configs:
        target = dst / config.parent.name / CONFIG_NAME
        try:
            rewritten = rewrite_config(
                target.read_text(), parameters, instance_kind, instance_count
            )
        except PrepareError as exc:
            raise PrepareError(f"{config}: {exc}") from exc
        target.write_text(rewritten)
        names.append(config.parent.name)
    return names


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fp = sub.add_parser("fingerprint", help="print the artifact fingerprint")
    fp.add_argument("--weights", type=Path, required=True)
    fp.add_argument("--format", choices=ARTIFACT_FORMATS, required=True)

    repo = sub.add_parser("repository", help="write a prepared copy of the model repository")
    repo.add_argument("--src", type=Path, required=True)
    repo.add_argument("--dst", type=Path, required=True)
    repo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    repo.add_argument("--instance-kind", choices=INSTANCE_KINDS)
    repo.add_argument("--instance-count", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "fingerprint":
            print(fingerprint(args.weights, args.format))
        else:
            if args.instance_count is not None and args.instance_count < 1:
                raise PrepareError("--instance-count must be >= 1")
            names = prepare_repository(
                args.src,
                args.dst,
                _parse_assignments(args.set),
                args.instance_kind,
                args.instance_count,
            )
            print(" ".join(names))
    except PrepareError as exc:
        print(f"triton_prepare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
