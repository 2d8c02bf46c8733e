"""``ivvae export``: weights -> verified TorchScript or ONNX step artifacts + manifest.

    ivvae export --format torchscript|onnx --weights W --out DIR [--verify-input GOLDEN]

Writes the encoder and decoder steps (``ivvae.core.artifacts`` lists the files) and
``export_manifest.json``, after streaming a clip through the artifacts and the eager model
(``ivvae.model.export.verify_artifacts``). Exit status 1 when verification fails; the
manifest is then not written. Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.artifacts import DEFAULT_FORMAT, FORMATS

if TYPE_CHECKING:
    from .core.artifacts import ExportManifest



def export_weights(weights: str, out: Path, fmt: str, *, name: str = "",
                   verify_input: str | None = None) -> ExportManifest:
    """Load ``weights`` (empty: the bundled model) and export them to ``out``.

    ``verify_input``: a golden ``.safetensors`` whose ``input.video`` is the verification
    clip (default: the built-in clip). Raises ``ExportError`` when verification fails.
    """
    from .model.export import clip_from_golden, export_artifacts
    from .weights import load_weights

    model, info = load_weights(weights or None, name=name)
    frames = clip_from_golden(verify_input) if verify_input else None
    return export_artifacts(model, out, fmt, info.as_dict(), verify_frames=frames)


def _export(args: argparse.Namespace) -> int:
    import torch

    from .model.export import ExportError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        manifest = export_weights(args.weights, Path(args.out), args.format, name=args.name,
                                  verify_input=args.verify_input)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary: dict[str, Any] = {
        "out": str(args.out), "format": manifest.format, "model": manifest.model["name"],
        "weights_sha256": manifest.weights_sha256, "files": sorted(manifest.files.values()),
        "verification": manifest.verification,
    }
    print(json.dumps(summary))
    return 0


def add_parser(sub: Any) -> None:
    """Register ``export`` on the ``ivvae`` subcommand parsers."""
    p = sub.add_parser("export", help="export the encoder/decoder steps as TorchScript or ONNX "
                       "artifacts for Triton, verified against the eager model")
    p.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                   help="artifact format (default: torchscript)")
    p.add_argument("--weights", default="", help="weights file (.pth/.safetensors); "
                   "default: the bundled model")
    p.add_argument("--out", required=True, help="artifact directory (created)")
    p.add_argument("--name", default="", help="model name (default: from the weights)")
    p.add_argument("--verify-input", default=None, metavar="GOLDEN",
                   help="verify on this golden file's input.video (default: built-in clip)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.set_defaults(handler=_export)
