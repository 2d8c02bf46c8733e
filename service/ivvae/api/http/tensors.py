"""HTTP request forms of /encode and /decode beyond a plain file upload.

Query parameters are read here, all of them, so that an unknown or repeated one is a 400
naming it rather than silently ignored (``/encode?resize=64`` resizes; ``/encode?rezise=64``
is refused).

``/encode``: a video or image file (multipart field ``file`` or the raw body), or frames as
a raw tensor body (``shape`` + ``dtype`` parameters, Hugging Face's remote-VAE convention):
``(T, H, W, 3)`` uint8, or ``(B, 3, T, H, W)`` / ``(B, 3, H, W)`` float in [-1, 1]
(float32 / bfloat16 / float16; clipped to [-1, 1] and rounded to uint8 frames as the
encoder reads every video; past +-1.25 another scale is refused). Options:
``model``, ``sample``, ``seed``, ``moments``, ``fps`` of tensor frames (default 24; as a
preprocessing option it is the target rate), the preprocessing options of
``ivvae.video.preprocess``, ``output_type`` (``file``: the latent .safetensors file,
the default for file uploads; ``pt``: a raw tensor body with ``shape`` / ``dtype``
headers, the default for tensor bodies and for any request with ``scaling_factor`` or
``shift_factor``, as diffusers' ``remote_encode`` sends a PIL image), and for ``pt`` the
remote-VAE ``scaling_factor`` /
``shift_factor`` (the answer is ``(s - shift_factor) * scaling_factor``; default: the
model's own, i.e. the latent file's values). ``dtype`` is the stored latent dtype for file
uploads and the body's dtype for tensor bodies (whose answer is float32, or the body's
dtype when it is bfloat16 / float16).

``/decode``: a latent file from /encode, a bare latent file (only a ``latent`` tensor), or a
raw tensor body (``shape`` + ``dtype``). Bare and raw latents take ``ivvae.wire``'s
``DecodeTarget`` parameters; a raw body from diffusers' ``remote_decode`` (it always sends
``image_format`` and ``partial_postprocess``) with no scaling parameter at all is
``do_scaling=False``'s, and is decoded as raw, as Hugging Face's endpoints do. The answer:
``format=mp4`` / ``output_type=mp4`` (default; a batch of more than one gives
``application/zip`` holding ``0.mp4``, ``1.mp4``, ...), ``format=frames`` (or ``Accept:
application/x-safetensors``: a safetensors file with ``frames`` ``(T, H, W, 3)``, or
``(B, T, H, W, 3)`` for a batch; uint8, or with ``frames_dtype=float32`` the decoder's own
float values), ``output_type=pt``: a raw tensor body, with ``partial_postprocess=true``
uint8 frames as the frames file holds them (``(T, H, W, 3)`` for one video, as Hugging
Face's video endpoints answer and diffusers turns into a list of PIL frames; ``(B, T, H, W,
3)`` for a batch), else the video ``(B, 3, T, H, W)`` float32, the decoder's own values
(about [-1, 1], not clamped; what the uint8 frames are rounded from), as diffusers'
``vae.decode(z).sample`` gives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ...core import strict
from ...core.frames import uint8_frames
from ...core.steps import FramesDtype
from ...errors import InvalidInput
from ...outputs import frames_dtype_for
from ...pipeline import EncodeOptions
from ...safetensors_io import Tensor, float32_to_bf16_bits
from ...video import Preprocess
from ...wire import (
    DECODE_KEYS,
    LATENT_DTYPES,
    parse_shape,
    parse_wire_dtype,
    raw_tensor_body,
    read_raw_tensor,
    tensor_to_float32,
)

ENCODE_KEYS = ("model", "sample", "seed", "dtype", "moments", "shape", "output_type",
               "scaling_factor", "shift_factor")
DECODE_OUTPUT_KEYS = ("format", "crf", "output_type", "partial_postprocess", "image_format",
                      "shape", "dtype", "frames_dtype")
TENSOR_MEDIA_TYPE = "application/octet-stream"
# Only the frames file's own type picks it: a generic octet-stream Accept is not a request
# for raw frames.
FRAMES_ACCEPT = "application/x-safetensors"
MP4_ACCEPT = "video/mp4"

Params = Sequence[tuple[str, str]]


def _single(params: Params, name: str) -> str | None:
    values = [v for k, v in params if k == name]
    if len(values) > 1:
        raise InvalidInput(f"parameter {name!r} is given more than once")
    return values[0] if values else None


def _bool(name: str, value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise InvalidInput(f"parameter {name!r} must be true or false, got {value!r}")


def _float(name: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}") from None
    if not np.isfinite(out) or (name == "scaling_factor" and out == 0):
        raise InvalidInput(f"parameter {name!r} must be finite (and scaling_factor non-zero)")
    return out


# -- /encode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeForm:
    options: EncodeOptions
    output: Literal["file", "pt"]
    tensor_shape: tuple[int, ...] | None  # a raw tensor body's shape, else None
    tensor_dtype: str
    fps: float  # of tensor frames
    scaling_factor: float | None
    shift_factor: float | None


def parse_encode(params: Params) -> EncodeForm:
    """All of /encode's query parameters; see the module docstring."""
    shape_values = [v for k, v in params if k == "shape"]
    tensor = bool(shape_values)
    dtype = _single(params, "dtype")
    fps_value = _single(params, "fps")
    # A tensor's fps is its own rate unless a resample is asked together with its rate.
    preprocess = Preprocess.parse(
        [(k, v) for k, v in params if k != "fps" or not tensor],
        other_keys=(*ENCODE_KEYS, "fps") if tensor else ENCODE_KEYS)
    seed_value = _single(params, "seed")
    if seed_value is not None and not strict.is_count(seed_value.strip()):
        raise InvalidInput(f"parameter 'seed' must be an integer in [0, 2**63), got "
                           f"{strict.shown(seed_value)}")
    scaling = _float("scaling_factor", _single(params, "scaling_factor"))
    shift = _float("shift_factor", _single(params, "shift_factor"))
    # A raw tensor body answers a raw tensor, as does a factor (diffusers' remote_encode
    # sends its PIL images as a PNG body with only these): they mean the diffusers wire.
    wire = tensor or scaling is not None or shift is not None
    output = _single(params, "output_type") or ("pt" if wire else "file")
    if output not in ("file", "pt"):
        raise InvalidInput(f"parameter 'output_type' must be file or pt, got {output!r}")
    include_moments = _bool("moments", _single(params, "moments"))
    if output == "pt" and include_moments:
        raise InvalidInput("parameters 'moments' and 'output_type=pt' contradict each other: "
                           "a raw tensor answer holds the latent only; the latent file "
                           "(output_type=file) holds mu and logvar too")
    if output == "file" and (scaling is not None or shift is not None):
        raise InvalidInput("parameters 'scaling_factor' / 'shift_factor' apply to "
                           "output_type=pt only: a latent file is in the model's own scale")
    tensor_dtype = "float32"
    stored = "float32"
    if tensor:
        tensor_dtype = parse_wire_dtype(dtype or "")
        if tensor_dtype in ("bfloat16", "float16"):
            stored = tensor_dtype
    elif dtype is not None:
        stored = parse_wire_dtype(dtype, allowed=LATENT_DTYPES)
    fps = 24.0
    if tensor and fps_value is not None:
        try:  # as gRPC's TensorSpec.fps and the fps option read it: 30000/1001 too
            rate = strict.number(fps_value.strip())
        except ValueError as exc:
            raise InvalidInput(f"parameter 'fps': {exc}") from None
        if not strict.fps_in_range(rate):
            raise InvalidInput(f"parameter 'fps' must be in {strict.FPS_RANGE}")
        fps = float(rate)
    options = EncodeOptions(
        model=_single(params, "model") or "",
        sample=_bool("sample", _single(params, "sample")),
        seed=int(seed_value) if seed_value is not None else None,
        dtype=stored,
        include_moments=include_moments,
        preprocess=preprocess,
    )
    return EncodeForm(options, "pt" if output == "pt" else "file",
                      parse_shape(shape_values) if tensor else None, tensor_dtype, fps,
                      scaling, shift)


def frames_of_tensor(data: bytes, form: EncodeForm, max_bytes: int) -> list[np.ndarray]:
    """A raw tensor body as frames, ``(T, H, W, 3)`` uint8 per batch item."""
    assert form.tensor_shape is not None
    shape, dtype = form.tensor_shape, form.tensor_dtype
    t = read_raw_tensor(data, shape, dtype, max_bytes=max_bytes)
    if dtype == "uint8":
        if len(shape) != 4 or shape[3] != 3:
            raise InvalidInput(f"uint8 frames are (T, H, W, 3); got shape {list(shape)}")
        return [np.ascontiguousarray(t.array)]
    if len(shape) not in (4, 5) or shape[1] != 3:
        raise InvalidInput(f"float video is (B, 3, T, H, W) or images (B, 3, H, W); got "
                           f"shape {list(shape)}")
    x = tensor_to_float32(t)
    return list(uint8_frames(x[:, :, None] if len(shape) == 4 else x))


def latent_answer(latents: list[np.ndarray], form: EncodeForm, scale: float,
                  shift: float) -> tuple[bytes, dict[str, str]]:
    """Scaled latents ``(1, z, t, h, w)`` per item -> a raw tensor body ``(B, z, t, h, w)``
    in the caller's scaling (``form.scaling_factor`` / ``shift_factor``, default the
    model's), float32 or the body's half dtype."""
    z = np.concatenate(latents)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, named in the error
        if form.scaling_factor is not None or form.shift_factor is not None:
            s = z / scale + shift
            z = (s - (form.shift_factor or 0.0)) * (form.scaling_factor or 1.0)
        z = np.ascontiguousarray(z, dtype=np.float32)
        out = z.astype(np.float16) if form.options.dtype == "float16" else z
    if not np.isfinite(out).all():
        raise InvalidInput(f"parameters 'scaling_factor' / 'shift_factor' put the latent "
                           f"outside the range of {form.options.dtype or 'float32'}")
    if form.options.dtype == "bfloat16":
        return raw_tensor_body(Tensor("BF16", float32_to_bf16_bits(z)))
    return raw_tensor_body(out)


# -- /decode ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeForm:
    output: Literal["mp4", "frames", "pt"]
    frames_dtype: FramesDtype  # for pt: uint8 (B, T, H, W, 3), float32 (B, 3, T, H, W)
    crf: int
    tensor_shape: tuple[int, ...] | None
    tensor_dtype: str
    target_params: list[tuple[str, str]]


def _from_remote_decode(params: Params) -> bool:
    """Whether the request is diffusers' ``remote_decode``: it always sends these two."""
    names = {k for k, _ in params}
    return "image_format" in names and "partial_postprocess" in names


def _quality(accept: str, media_type: str) -> tuple[int, float]:
    """How an ``Accept`` header wants ``media_type`` (RFC 9110 12.5.1): its most specific
    matching range (2 ``type/sub``, 1 ``type/*``, 0 ``*/*``; -1 none) and that range's
    ``q`` (0 when none matches). A malformed ``q`` counts as 1, as most servers read it."""
    kind = media_type.split("/")[0]
    best: tuple[int, float] = (-1, 0.0)
    for item in accept.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        name = name.lower()
        rank = (2 if name == media_type else 1 if name == f"{kind}/*" else
                0 if name == "*/*" else -1)
        if rank <= best[0]:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 1.0
        best = (rank, q)
    return best


def prefers_frames(accept: str) -> bool:
    """Whether an ``Accept`` header asks for the frames file over the MP4 (the default): it
    must name the frames file's type and want it more than an MP4, by ``q`` and then by
    how specifically (``application/x-safetensors, */*`` asks for frames, as most servers'
    negotiation reads it). A client that lists every type of the operation at once (a
    generated one) gets the default."""
    rank, frames = _quality(accept, FRAMES_ACCEPT)
    mp4_rank, mp4 = _quality(accept, MP4_ACCEPT)
    return rank == 2 and frames > 0 and (frames, rank) > (mp4, mp4_rank)


def parse_decode(params: Params, accept: str, crf_range: tuple[int, int],
                 default_crf: int) -> DecodeForm:
    known = (*DECODE_OUTPUT_KEYS, *DECODE_KEYS)
    for name, _ in params:
        if name not in known:
            raise InvalidInput(f"unknown parameter {name!r}; /decode takes "
                               f"{', '.join(sorted(set(known)))}")
    fmt = _single(params, "format")
    output_type = _single(params, "output_type")
    if fmt is not None and fmt not in ("mp4", "frames"):
        raise InvalidInput(f"parameter 'format' must be mp4 or frames, got {fmt!r}")
    if output_type is not None and output_type not in ("mp4", "pt"):
        raise InvalidInput(f"parameter 'output_type' must be mp4 or pt, got {output_type!r} "
                           "(pil is not served: ask for pt or mp4)")
    if fmt is not None and output_type is not None and (fmt, output_type) != ("mp4", "mp4"):
        raise InvalidInput("parameters 'format' and 'output_type' contradict each other: "
                           "give one")
    output: Literal["mp4", "frames", "pt"] = "mp4"
    if output_type == "pt":
        output = "pt"
    elif fmt == "frames" or (fmt is None and output_type is None and prefers_frames(accept)):
        output = "frames"
    image_format = _single(params, "image_format")
    if image_format is not None and image_format not in ("jpg", "png"):
        raise InvalidInput(f"parameter 'image_format' must be jpg or png, got {image_format!r}")
    crf_text = _single(params, "crf")
    crf = default_crf
    if crf_text is not None:
        if not strict.is_count(crf_text) or not crf_range[0] <= int(crf_text) <= crf_range[1]:
            raise InvalidInput(f"parameter 'crf' must be an integer in "
                               f"[{crf_range[0]}, {crf_range[1]}], got {crf_text!r}")
        crf = int(crf_text)
    shape_values = [v for k, v in params if k == "shape"]
    dtype = _single(params, "dtype")
    shape = parse_shape(shape_values) if shape_values else None
    if shape is None and dtype is not None:
        raise InvalidInput("parameter 'dtype' describes a raw tensor body: give 'shape' too")
    tensor_dtype = parse_wire_dtype(dtype or "", allowed=LATENT_DTYPES) if shape else ""
    target = [(k, v) for k, v in params if k in DECODE_KEYS]
    if shape is not None and _from_remote_decode(params) and not any(
            k in ("do_scaling", "scaling_factor", "shift_factor", "latent_space")
            for k, _ in params):
        # diffusers' remote_decode(do_scaling=False) sends no scaling parameter at all, and
        # Hugging Face's endpoints then decode the tensor as it is: raw, not scaled.
        target.append(("latent_space", "raw"))
    # Checked whatever the output: diffusers' client sends it always; only pt reads it.
    postprocess = _bool("partial_postprocess", _single(params, "partial_postprocess"))
    frames_dtype = _single(params, "frames_dtype")
    if output == "pt":
        if frames_dtype is not None:
            raise InvalidInput("parameters 'frames_dtype' and 'output_type=pt' contradict each "
                               "other: pt takes 'partial_postprocess' (true: uint8 frames, "
                               "false: the float video)")
        dtype_of: FramesDtype = "uint8" if postprocess else "float32"
    else:
        dtype_of = frames_dtype_for(output, frames_dtype)
    return DecodeForm(output, dtype_of, crf, shape, tensor_dtype, target)
