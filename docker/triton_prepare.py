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

The preparing is ``ivvae.devtools.repository`` (torch-free), the same code that
``ivvae triton-serve`` and the local stack use.
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

from ivvae.core.artifacts import FORMATS
from ivvae.devtools.repository import (
    INSTANCE_KINDS,
    PrepareError,
    check_parameters,
    prepare_repository,
)

FINGERPRINT_CHARS = 16
CHUNK_BYTES = 8 * 1024 * 1024


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
        out[key] = value
    check_parameters(out, known_names=True)
    return out


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fp = sub.add_parser("fingerprint", help="print the artifact fingerprint")
    fp.add_argument("--weights", type=Path, required=True)
    fp.add_argument("--format", choices=FORMATS, required=True)

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
            if args.dst.exists():  # the container's scratch copy: always made anew
                shutil.rmtree(args.dst)
            dst = prepare_repository(
                args.src,
                args.dst,
                parameters={"*": _parse_assignments(args.set)},
                env_path=None,
                instance_kind=args.instance_kind,
                instance_count=args.instance_count,
            )
            print(" ".join(sorted(p.parent.name for p in dst.glob("*/config.pbtxt"))))
    except PrepareError as exc:
        print(f"triton_prepare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
