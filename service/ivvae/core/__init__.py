"""Torch-free facts that every layer shares (standard library and numpy only).

* :mod:`.geometry`: the 4x time / 8x8 space compression, latent sizes, the padding policy,
  the step plans (which frames go into which step), moments to latent.
* :mod:`.names`: the precision names and output defaults.
* :mod:`.artifacts`: exported step artifacts: formats, file names, the export manifest.
* :mod:`.model_info`: :class:`ModelInfo`, what a gateway knows about a served model.
* :mod:`.steps`: the step protocol (:class:`Steps`) and the one step engine
  (:class:`SequenceTable`) that the local backend and the Triton models both run.
* :mod:`.files`: atomic file writing.
* :mod:`.strict`: strict parsers for untrusted text (counts, frame rates and their range,
  model names).

Nothing here imports torch or anything above it in the package (see docs/architecture.md).
"""

from .geometry import (
    GROUP,
    PADDING_POLICY,
    SPACE_COMPRESSION,
    TEMPORAL_DOWNSAMPLE,
    TIME_COMPRESSION,
    decode_plan,
    latent_frames,
    latent_shape,
    latent_size,
    moments_to_latent,
    pad_frames,
    padded_frames,
)
from .model_info import ModelInfo
from .names import CRF_RANGE, DEFAULT_CRF, PRECISIONS, Precision
from .version import __version__

__all__ = [
    "CRF_RANGE",
    "DEFAULT_CRF",
    "GROUP",
    "PADDING_POLICY",
    "PRECISIONS",
    "SPACE_COMPRESSION",
    "TEMPORAL_DOWNSAMPLE",
    "TIME_COMPRESSION",
    "ModelInfo",
    "Precision",
    "__version__",
    "decode_plan",
    "latent_frames",
    "latent_shape",
    "latent_size",
    "moments_to_latent",
    "pad_frames",
    "padded_frames",
]
