"""Tensors on the wire: raw tensor bodies (Hugging Face's remote-VAE conventions) and bare
latents (what a diffusion sampler generates), parsed defensively, without torch.

A **raw tensor body** is the tensor's bytes, little-endian, C order, with its ``shape`` and
``dtype`` given as request parameters, as ``diffusers.utils.remote_utils`` sends them:
``shape`` repeated once per dimension (``?shape=1&shape=16&...``), or one value
``1,16,5,8,8`` or ``[1, 16, 5, 8, 8]``; ``dtype`` one of ``WIRE_DTYPES``. Answers carry the
same two facts as response headers: ``shape`` as a JSON list, ``dtype`` as its name.

A **bare latent** is a safetensors file whose only tensor is ``latent``, ``(B, z, t, h, w)``
or ``(z, t, h, w)``, in float32, bfloat16 or float16, with no ivvae metadata (a latent
file from ``/encode`` carries its own; see ``ivvae.latents``).

``DecodeTarget`` holds what a bare latent does not say (the model, the output frame count,
size and fps, and in which space its values are), parsed from string parameters like
``ivvae.video.preprocess``, with ``InvalidInput`` naming the bad parameter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .core import strict
from .core.names import PRECISIONS
from .errors import InvalidInput, InvalidLatent
from .latents import DTYPE_NAMES, check_values
from .safetensors_io import DTYPES, SafetensorsError, Tensor, bf16_bits_to_float32, loads

# Wire dtype name -> safetensors dtype name (``ivvae.safetensors_io.DTYPES`` holds the bits):
# a latent's precisions, and uint8 frames.
WIRE_DTYPES = {**DTYPE_NAMES, "uint8": "U8"}
_ST_TO_WIRE = {v: k for k, v in WIRE_DTYPES.items()}
LATENT_DTYPES = PRECISIONS  # a latent is stored in one of the precisions
MAX_RANK = 5
MAX_SHAPE_TEXT = 256
# The fps a decoded bare latent gets when the request names none.
DEFAULT_DECODE_FPS = Fraction(24)
LATENT_SPACES = ("scaled", "raw")


# -- raw tensor bodies ---------------------------------------------------------------------


def parse_shape(values: Sequence[str]) -> tuple[int, ...]:
    """``shape`` parameter value(s) -> dimensions; see the module docstring."""
    if not values:
        raise InvalidInput("parameter 'shape' is missing")
    if len(values) == 1:
        text = values[0].strip()
        if text.startswith("["):
            if len(text) > MAX_SHAPE_TEXT:  # json.loads recurses: "[" * 20000 overflowed it
                raise InvalidInput(f"parameter 'shape' is {len(text):,} characters long; a "
                                   f"shape of {MAX_RANK} dimensions takes far fewer")
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise InvalidInput(f"parameter 'shape' is not a JSON list: {text!r}") from None
            if not isinstance(parsed, list):
                raise InvalidInput(f"parameter 'shape' is not a list: {text!r}")
            parts = [str(p) for p in parsed]
        else:
            parts = [p for p in text.split(",") if p.strip()]
    else:
        parts = list(values)
    if not parts or len(parts) > MAX_RANK:
        raise InvalidInput(f"parameter 'shape' must have 1 to {MAX_RANK} dimensions, "
                           f"got {values!r}")
    dims = []
    for part in parts:
        p = part.strip()
        if not strict.is_count(p) or int(p) < 1:
            raise InvalidInput(f"parameter 'shape' has a bad dimension {part!r} "
                               "(positive integers only)")
        dims.append(int(p))
    return tuple(dims)


def parse_wire_dtype(value: str, allowed: Collection[str] = tuple(WIRE_DTYPES)) -> str:
    """A ``dtype`` parameter (``float32``, also ``torch.float32``) -> its wire name."""
    name = value.strip().lower().removeprefix("torch.")
    if name not in allowed:
        raise InvalidInput(f"parameter 'dtype' must be one of {', '.join(allowed)}, "
                           f"got {value!r}")
    return name


def read_raw_tensor(data: bytes, shape: tuple[int, ...], dtype: str, *,
                    max_bytes: int | None = None) -> Tensor:
    """The raw body as a ``Tensor`` (a read-only view of ``data``); ``dtype`` a wire name.
    Raises ``InvalidInput`` when the byte count does not match ``shape`` and ``dtype``."""
    st = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * DTYPES[st].itemsize
    if max_bytes is not None and expected > max_bytes:
        raise InvalidInput(f"a {dtype} tensor of shape {list(shape)} is {expected} bytes, "
                           f"over the limit of {max_bytes}")
    if len(data) != expected:
        raise InvalidInput(f"the body has {len(data)} bytes but a {dtype} tensor of shape "
                           f"{list(shape)} has {expected}")
    bits = np.frombuffer(data, dtype={"F32": "<f4", "F16": "<f2", "BF16": "<u2",
                                      "U8": "u1"}[st]).reshape(shape)
    return Tensor(st, bits)


def raw_tensor_body(tensor: Tensor | np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A tensor (or a float32 / float16 / uint8 array) as a raw body and its ``shape`` /
    ``dtype`` headers."""
    if isinstance(tensor, np.ndarray):
        names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("u1"): "U8"}
        st = names.get(tensor.dtype)
        if st is None:
            raise TypeError(f"no wire dtype for numpy {tensor.dtype}")
        tensor = Tensor(st, tensor)
    body = np.ascontiguousarray(tensor.array).tobytes()
    return body, {"shape": json.dumps(list(tensor.shape)), "dtype": _ST_TO_WIRE[tensor.dtype]}


def tensor_to_float32(tensor: Tensor) -> np.ndarray:
    if tensor.dtype == "BF16":
        return bf16_bits_to_float32(tensor.array)
    return tensor.array.astype(np.float32)


# -- bare latents ------------------------------------------------------------------------


def check_latent_values(latent: np.ndarray, dtype: str) -> np.ndarray:
    """``latent`` float32 ``(B, z, t, h, w)`` (or rank 4, given a batch of 1), its values
    finite and in range (``ivvae.latents.check_values``)."""
    if latent.ndim == 4:
        latent = latent[None]
    if latent.ndim != 5:
        raise InvalidLatent(f"a latent is (B, z, t, h, w) or (z, t, h, w); got shape "
                            f"{list(latent.shape)}")
    if dtype not in LATENT_DTYPES:
        raise InvalidLatent(f"latent dtype {dtype} is not float32, bfloat16 or float16")
    check_values(latent)
    return np.ascontiguousarray(latent, dtype=np.float32)


def read_bare_latent(data: bytes) -> tuple[np.ndarray, str]:
    """A bare latent file -> (latent float32 ``(B, z, t, h, w)``, stored dtype name).
    Raises ``InvalidLatent`` naming the problem."""
    try:
        tensors, _ = loads(data)
    except SafetensorsError as exc:
        raise InvalidLatent(f"not a readable safetensors file: {exc}") from exc
    if set(tensors) != {"latent"}:
        raise InvalidLatent("neither an ivvae latent file (its metadata has no 'format') nor a "
                            "bare latent file (exactly one tensor, named 'latent'); this one "
                            f"has tensors {sorted(tensors) or 'none'}")
    t = tensors["latent"]
    dtype = _ST_TO_WIRE.get(t.dtype, t.dtype)
    if dtype not in LATENT_DTYPES:
        raise InvalidLatent(f"latent dtype {t.dtype} is not float32, bfloat16 or float16")
    return check_latent_values(tensor_to_float32(t), dtype), dtype


def safetensors_problem(data: bytes) -> str | None:
    """Why ``data`` is no safetensors file at all (None: it is one)."""
    try:
        loads(data)
    except SafetensorsError as exc:
        return str(exc)
    return None


def is_ivvae_latent_file(data: bytes) -> bool:
    """Whether ``data`` is safetensors carrying ivvae latent metadata (``/encode``'s
    output) rather than a bare latent."""
    try:
        _, meta = loads(data)
    except SafetensorsError:
        return True  # let the latent-file parser name the problem
    return "format" in meta


# -- what a bare latent does not say -----------------------------------------------------

DECODE_KEYS = ("model", "fps", "num_frames", "height", "width", "latent_space",
               "scaling_factor", "shift_factor", "do_scaling")


@dataclass(frozen=True)
class DecodeTarget:
    """How to decode a bare latent ``(B, z, t, h, w)``.

    ``model`` (empty: the served default); ``num_frames`` (default ``1 + 4(t-1)``),
    ``height`` / ``width`` (defaults ``8h`` / ``8w``): crop to the original size; ``fps``
    of an MP4 (default ``DEFAULT_DECODE_FPS``). Values are in the model's scaled space
    ``scale * (s - shift)`` (``latent_space="scaled"``, what ``/encode`` returns and a
    diffusion model learns) or are the raw posterior space ``s`` (``"raw"``). Hugging
    Face's remote-VAE parameters say the same another way: ``scaling_factor`` /
    ``shift_factor`` mean ``s = latent / scaling_factor + shift_factor`` (each applied when
    given), ``do_scaling=false`` means raw.
    """

    model: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: Fraction = DEFAULT_DECODE_FPS
    latent_space: str = "scaled"
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def __post_init__(self) -> None:
        if self.latent_space not in LATENT_SPACES:
            raise InvalidInput(f"parameter 'latent_space' must be one of "
                               f"{', '.join(LATENT_SPACES)}, got {self.latent_space!r}")
        if self.latent_space == "raw" and (self.scaling_factor is not None
                                           or self.shift_factor is not None):
            raise InvalidInput("parameters 'latent_space=raw' and 'scaling_factor' / "
                               "'shift_factor' contradict each other: give one")
        for name in ("num_frames", "height", "width"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= 1 << 20:
                raise InvalidInput(f"parameter {name!r} must be a positive integer")
        if not strict.fps_in_range(self.fps):
            raise InvalidInput(f"parameter 'fps' must be in {strict.FPS_RANGE}")
        if self.scaling_factor is not None and (
                not math.isfinite(self.scaling_factor) or self.scaling_factor == 0):
            raise InvalidInput("parameter 'scaling_factor' must be finite and non-zero")
        if self.shift_factor is not None and not math.isfinite(self.shift_factor):
            raise InvalidInput("parameter 'shift_factor' must be finite")

    @classmethod
    def parse(cls, params: Mapping[str, str] | Iterable[tuple[str, str]], *,
              other_keys: Collection[str] = ()) -> DecodeTarget:
        """From string parameters; names in ``other_keys`` are the caller's, any other
        unknown name raises ``InvalidInput``."""
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        seen: dict[str, str] = {}
        for name, value in items:
            if name in other_keys:
                continue
            if name not in DECODE_KEYS:
                raise InvalidInput(f"unknown parameter {name!r}; decode parameters are "
                                   f"{', '.join(sorted({*DECODE_KEYS, *other_keys}))}")
            if name in seen:
                raise InvalidInput(f"parameter {name!r} is given more than once")
            seen[name] = value.strip()
        space = seen.get("latent_space", "scaled")
        if "do_scaling" in seen:
            flag = _bool("do_scaling", seen["do_scaling"])
            if not flag and "latent_space" not in seen:
                space = "raw"
        return cls(
            model=seen.get("model", ""),
            num_frames=_int(seen, "num_frames"),
            height=_int(seen, "height"),
            width=_int(seen, "width"),
            fps=DEFAULT_DECODE_FPS if "fps" not in seen else _fraction(seen, "fps"),
            latent_space=space,
            scaling_factor=_float(seen, "scaling_factor"),
            shift_factor=_float(seen, "shift_factor"),
        )

    def to_model_space(self, latent: np.ndarray, scale: float, shift: float) -> np.ndarray:
        """``latent`` as the model's scaled latent ``scale * (s - shift)`` (float32)."""
        unscaled = self.scaling_factor is None and self.shift_factor is None
        if unscaled and self.latent_space == "scaled":
            return latent
        # Overflow gives inf, not a warning: the caller checks the result and names it.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            s = latent if unscaled else (
                latent / (self.scaling_factor or 1.0) + (self.shift_factor or 0.0))
            return np.asarray(scale * (s - shift), dtype=np.float32)


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise InvalidInput(f"parameter {name!r} must be true or false, got {value!r}")


def _int(seen: Mapping[str, str], name: str) -> int | None:
    if name not in seen:
        return None
    if not strict.is_count(seen[name]):
        raise InvalidInput(f"parameter {name!r} must be a positive integer, got "
                           f"{seen[name]!r}")
    return int(seen[name])


def _float(seen: Mapping[str, str], name: str) -> float | None:
    if name not in seen:
        return None
    try:
        value = float(seen[name])
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be a number, got {seen[name]!r}") from None
    return value


def _fraction(seen: Mapping[str, str], name: str) -> Fraction:
    """A number, negative ones too: the caller's range check names what is wanted (a
    negative frame rate was "not a number")."""
    text = seen[name]
    sign = -1 if text.startswith("-") else 1
    try:
        return sign * strict.number(text[1:] if sign < 0 else text).limit_denominator(1_000_000)
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be a number, got {seen[name]!r}") from None
