"""The latent file: what /encode returns and /decode accepts (HTTP, gRPC and the CLI).

A ``.safetensors`` file holding

* ``latent``: ``(1, z, n, h, w)`` in one of ``PRECISIONS``, the diffusion latent
  ``scale_factor * (s - shift_factor)``, shaped by ``ivvae.core.geometry.latent_shape``;
* optionally ``mu`` and ``logvar`` (float32, same shape): the posterior moments, for
  training with fresh samples each epoch;

and string metadata (``__metadata__``) recording everything needed to decode it and to
train on it. ``META_KEYS`` is the one list of those keys every file holds; optional keys
(``preprocess*``, ``source_*``, ``SAR_KEY``) come beside them, which readers of this
``FORMAT_VERSION`` that do not know them keep as ``LatentInfo.extra``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from .core import strict
from .core.geometry import latent_shape
from .core.model_info import ModelInfo
from .core.names import PRECISIONS
from .core.version import __version__
from .errors import InvalidLatent, UnknownModel
from .safetensors_io import SafetensorsError, Tensor, dumps, float32_to_bf16_bits, loads

FORMAT = "ivvae.latent"
FORMAT_VERSION = "1"

# A latent file's header holds a few tensor entries and a few dozen short metadata strings.
MAX_HEADER_BYTES = 64 * 1024
MODES = ("mean", "sample")
# precision name -> safetensors dtype code
DTYPE_NAMES: dict[str, str] = dict(zip(PRECISIONS, ("F32", "BF16", "F16"), strict=True))
_ST_TO_NAME = {v: k for k, v in DTYPE_NAMES.items()}

META_KEYS = (
    "format", "format_version", "model_name", "weights_sha256", "scale_factor",
    "shift_factor", "z_dim", "num_frames", "height", "width", "fps", "padding_policy",
    "dtype", "content_sha256", "mode", "seed", "latent_shape", "ivvae_version",
)
# Optional: the frames' sample aspect ratio (``"32:27"``: a pixel is shown 32/27 as wide as
# it is high), only where it is not 1:1, i.e. an anamorphic clip encoded at its stored
# size. Decoding to MP4 writes it into the video stream, so players show the right shape.
SAR_KEY = "sample_aspect_ratio"
# Optional: the precision the encoder computed in (``float32``, ``bfloat16``...), which
# decides the latent's last bits. Files from before it was recorded lack it.
ENCODE_PRECISION_KEY = "encode_precision"


@dataclass(frozen=True)
class LatentInfo:
    """Metadata of one latent file (see ``META_KEYS``)."""

    model_name: str
    weights_sha256: str
    scale_factor: float
    shift_factor: float
    z_dim: int
    num_frames: int
    height: int
    width: int
    fps: Fraction
    padding_policy: str
    dtype: str  # one of PRECISIONS
    content_sha256: str
    # mean | sample; "external" only in memory, for a bare latent a request sent (never in a
    # file: from_metadata refuses it)
    mode: str
    seed: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        return latent_shape(self.z_dim, self.num_frames, self.height, self.width)

    @property
    def sample_aspect_ratio(self) -> Fraction:
        """How wide a pixel of the frames is shown for 1 high (``SAR_KEY``; 1 without)."""
        text = self.extra.get(SAR_KEY)
        return Fraction(1) if text is None else strict.sample_aspect_ratio(text)

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "weights_sha256": self.weights_sha256,
            "scale_factor": repr(self.scale_factor),
            "shift_factor": repr(self.shift_factor),
            "z_dim": str(self.z_dim),
            "num_frames": str(self.num_frames),
            "height": str(self.height),
            "width": str(self.width),
            "fps": f"{self.fps.numerator}/{self.fps.denominator}",
            "padding_policy": self.padding_policy,
            "dtype": self.dtype,
            "content_sha256": self.content_sha256,
            "mode": self.mode,
            "seed": "" if self.seed is None else str(self.seed),
            "latent_shape": ",".join(str(s) for s in self.latent_shape),
            "ivvae_version": __version__,
        }
        meta.update(self.extra)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> LatentInfo:
        if meta.get("format") != FORMAT:
            raise InvalidLatent(
                "not an ivvae latent file: metadata 'format' is "
                f"{strict.shown(meta.get('format', ''))}, expected {FORMAT!r}"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise InvalidLatent("unsupported latent format_version "
                                f"{strict.shown(meta.get('format_version', ''))}")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise InvalidLatent(f"latent metadata is missing {', '.join(missing)}")
        def parsed(key: str, parse: Callable[[str], Any]) -> Any:
            try:
                return parse(meta[key])
            except (ValueError, ZeroDivisionError) as exc:
                raise InvalidLatent(f"latent metadata {key!r}: {exc}") from exc

        def size(text: str) -> int:
            return strict.count(text, minimum=1)

        def seed(text: str) -> int | None:
            if not text:
                return None
            value = strict.count(text)
            if value >= 2**63:
                raise ValueError(f"seed {value} is not below 2**63")
            return value

        info = cls(
            model_name=parsed("model_name", strict.model_name),
            weights_sha256=parsed("weights_sha256", strict.sha256_hex),
            scale_factor=parsed("scale_factor", strict.decimal),
            shift_factor=parsed("shift_factor", strict.decimal),
            z_dim=parsed("z_dim", size),
            num_frames=parsed("num_frames", size),
            height=parsed("height", size),
            width=parsed("width", size),
            fps=parsed("fps", strict.frame_rate),
            padding_policy=meta["padding_policy"],
            dtype=meta["dtype"],
            content_sha256=parsed("content_sha256", strict.sha256_hex),
            mode=meta["mode"],
            seed=parsed("seed", seed),
            extra={k: v for k, v in meta.items() if k not in META_KEYS},
        )
        if info.scale_factor == 0:
            raise InvalidLatent("latent metadata has a zero scale factor")
        if info.mode not in MODES:
            raise InvalidLatent(f"latent metadata 'mode' must be one of {MODES}, got "
                                f"{strict.shown(info.mode)}")
        if info.dtype not in DTYPE_NAMES:
            raise InvalidLatent(f"latent metadata has an unknown dtype {strict.shown(info.dtype)}")
        if SAR_KEY in meta:
            parsed(SAR_KEY, strict.sample_aspect_ratio)
        return info


def encode_latent_file(latent: np.ndarray, info: LatentInfo, *,
                       mu: np.ndarray | None = None, logvar: np.ndarray | None = None) -> bytes:
    """``latent`` float32 ``info.latent_shape``, stored in ``info.dtype``."""
    if latent.shape != info.latent_shape:
        raise ValueError(f"latent shape {latent.shape} != {info.latent_shape}")
    st = DTYPE_NAMES[info.dtype]
    if st == "BF16":
        stored = Tensor("BF16", float32_to_bf16_bits(latent))
    else:
        stored = Tensor(st, latent.astype(np.float32 if st == "F32" else np.float16))
    tensors: dict[str, Tensor | np.ndarray] = {"latent": stored}
    if mu is not None and logvar is not None:
        tensors["mu"] = np.ascontiguousarray(mu, dtype=np.float32)
        tensors["logvar"] = np.ascontiguousarray(logvar, dtype=np.float32)
    return dumps(tensors, info.to_metadata())


def decode_latent_file(data: bytes) -> tuple[np.ndarray, LatentInfo]:
    """Parse and validate an uploaded latent file: ``(latent float32, info)``.

    Raises ``InvalidLatent`` naming the problem: not safetensors, missing metadata, a shape
    that does not match the recorded video size, a dtype that is not floating point or not
    the recorded one, non-finite values.
    """
    if not data:
        raise InvalidLatent("empty latent file")
    try:
        tensors, meta = loads(data, max_header_bytes=MAX_HEADER_BYTES)
    except SafetensorsError as exc:
        raise InvalidLatent(f"not a readable latent file: {exc}") from exc
    info = LatentInfo.from_metadata(meta)
    if "latent" not in tensors:
        raise InvalidLatent(f"latent file has no 'latent' tensor (has {sorted(tensors)})")
    t = tensors["latent"]
    if t.dtype not in _ST_TO_NAME:
        raise InvalidLatent(f"latent dtype {t.dtype} is not one of {', '.join(PRECISIONS)}")
    if _ST_TO_NAME[t.dtype] != info.dtype:
        raise InvalidLatent(f"latent dtype {_ST_TO_NAME[t.dtype]} disagrees with metadata "
                            f"dtype {info.dtype}")
    if t.shape != info.latent_shape:
        raise InvalidLatent(
            f"latent shape {t.shape} does not match the metadata: a {info.num_frames}-frame "
            f"{info.width}x{info.height} video with z_dim {info.z_dim} has latent shape "
            f"{info.latent_shape}"
        )
    latent = t.as_float32()
    check_values(latent)
    return np.ascontiguousarray(latent), info


# Far past anything an encoder makes or a sampler should (scaled latents have about unit
# variance): the decoder's normalisations make larger values decode as these do, until
# float32 overflows inside it (about 1e19) into NaN or black frames, answered 200.
MAX_MAGNITUDE = 1e4


def check_values(latent: np.ndarray) -> None:
    """Refuse (``InvalidLatent``) a latent with non-finite values or values past
    ``MAX_MAGNITUDE``; every latent a client sends passes here."""
    finite = np.isfinite(latent)
    if not finite.all():
        raise InvalidLatent(f"latent has {int((~finite).sum())} non-finite values (NaN or inf)")
    peak = float(np.abs(latent).max(initial=0.0))
    if peak > MAX_MAGNITUDE:
        raise InvalidLatent(f"latent values reach {peak:.3g}, past the {MAX_MAGNITUDE:g} no "
                            "encoder makes (a diverged sampler, or a latent in another scale?)")


def served_model_for(info: LatentInfo, models: Mapping[str, ModelInfo]) -> ModelInfo:
    """The served model that made the latent ``info`` describes: by name, else by weights.

    Raises ``UnknownModel`` when none is served, ``InvalidLatent`` when the model of that
    name has other weights, another z, or other scale/shift factors (decoding would give
    garbage)."""
    model = models.get(info.model_name)
    if model is None:
        same = [m for m in models.values() if m.weights_sha256 == info.weights_sha256]
        if not same:
            raise UnknownModel(
                f"the latent was made by model {info.model_name!r} (weights "
                f"{info.weights_sha256[:12]}), which is not loaded here (a server's "
                f"models, or the CLI's --weights); loaded: {sorted(models)}"
            )
        model = same[0]
    if model.weights_sha256 != info.weights_sha256:
        raise InvalidLatent(
            f"the latent was made by weights {info.weights_sha256[:12]} but model "
            f"{model.name!r} here has weights {model.weights_sha256[:12]}: decoding it "
            "would give garbage"
        )
    if model.z_dim != info.z_dim:
        raise InvalidLatent(f"latent z_dim {info.z_dim} != model z_dim {model.z_dim}")
    if (info.scale_factor, info.shift_factor) != (model.scale_factor, model.shift_factor):
        raise InvalidLatent("latent scale/shift factors differ from the model's")
    return model
