"""Decoded frames as the bytes a client asked for: an MP4, a frames file, or for a batch
of bare latents a zip of MP4s, a batch frames file or a raw tensor.

One home for both output formats, so HTTP, gRPC and the CLI return byte-identical files for
the same latent. Both are produced as a stream of byte chunks while frames come out of the
decoder, so memory stays bounded by one decoder step:

* ``mp4``: H.264 in a fragmented MP4 (``ivvae.video.Mp4Writer`` on a non-seekable sink:
  the index first, then one fragment per keyframe), which players and PyAV read like any
  MP4, and which can be sent before the whole video is encoded.
* ``frames``: a safetensors file holding ``frames`` ``(T, H, W, 3)`` RGB and metadata
  ``FRAMES_METADATA_KEYS`` (and ``sample_aspect_ratio`` for frames of non-square pixels, as
  the latent and its MP4 say); its header is known from the latent before decoding. uint8 by
  default; float32 when asked (``frames_dtype``): the decoder's own values, about [-1, 1]
  and not clamped, the ones the uint8 frames are rounded from. An MP4 is always uint8.
"""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from .core import strict
from .core.names import DEFAULT_CRF
from .core.steps import FRAMES_DTYPES, FramesDtype
from .errors import InvalidInput
from .latents import SAR_KEY, LatentInfo
from .safetensors_io import dumps, header_bytes
from .video import Mp4Writer
from .wire import raw_tensor_body

OutputFormat = Literal["mp4", "frames"]
MEDIA_TYPES: dict[str, str] = {"mp4": "video/mp4", "frames": "application/x-safetensors"}
FRAMES_LAYOUT = "THWC uint8 RGB"
FLOAT_FRAMES_LAYOUT = "THWC float32 RGB [-1, 1]"
FRAMES_METADATA_KEYS = ("num_frames", "height", "width", "fps", "model_name", "layout")
_ST_DTYPE = {"uint8": "U8", "float32": "F32"}
# safetensors is little-endian
_NP_DTYPE: dict[str, np.dtype[Any]] = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}


def frames_dtype_for(fmt: OutputFormat, value: str | None) -> FramesDtype:
    """The frames dtype a request asks of an ``fmt`` output (none given: uint8). An unknown
    dtype, or float32 for an MP4, is ``InvalidInput`` naming it, before any work."""
    dtype = value or "uint8"
    if dtype not in FRAMES_DTYPES:
        raise InvalidInput(f"parameter 'frames_dtype' must be one of "
                           f"{', '.join(FRAMES_DTYPES)}, got {value!r}")
    if fmt == "mp4" and dtype != "uint8":
        raise InvalidInput("parameter 'frames_dtype=float32' needs the frames output "
                           "(format=frames): an MP4 holds uint8 frames")
    return dtype


def frames_metadata(info: LatentInfo, frames_dtype: FramesDtype = "uint8") -> dict[str, str]:
    meta = {"num_frames": str(info.num_frames), "height": str(info.height),
            "width": str(info.width), "fps": f"{info.fps.numerator}/{info.fps.denominator}",
            "model_name": info.model_name,
            "layout": FRAMES_LAYOUT if frames_dtype == "uint8" else FLOAT_FRAMES_LAYOUT}
    if info.sample_aspect_ratio != 1:
        # Frames of an anamorphic clip kept at their stored size: how wide a pixel is shown.
        meta[SAR_KEY] = strict.sample_aspect_ratio_text(info.sample_aspect_ratio)
    return meta


async def frames_file(info: LatentInfo, frames: AsyncIterator[np.ndarray],
                      frames_dtype: FramesDtype = "uint8") -> AsyncIterator[bytes]:
    """The frames file of ``frames`` (``(n, H, W, 3)`` parts of ``frames_dtype``,
    ``info.num_frames`` in all), header first."""
    shape = (info.num_frames, info.height, info.width, 3)
    head = header_bytes({"frames": (_ST_DTYPE[frames_dtype], shape)},
                        frames_metadata(info, frames_dtype))
    dtype = _NP_DTYPE[frames_dtype]
    async for part in frames:
        # the header goes out with frame 0: nothing is sent before the decoder ran once
        yield head + np.ascontiguousarray(part, dtype=dtype).tobytes()
        head = b""


class _Chunks:
    """A non-seekable byte sink (so ``Mp4Writer`` writes a fragmented MP4) that hands out
    what was written so far. Written on the writer's thread, drained on the event loop
    between writes, never both at once."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def seekable(self) -> bool:
        return False

    def take(self) -> bytes:
        out, self._buffer = bytes(self._buffer), bytearray()
        return out


async def mp4_file(info: LatentInfo, frames: AsyncIterator[np.ndarray], *,
                   crf: int = DEFAULT_CRF) -> AsyncIterator[bytes]:
    """The MP4 of ``frames``, in chunks as the encoder writes them.

    The writer lives on its own thread: its calls stay in order even when the consumer is
    cancelled mid-write (the close queues behind the write)."""
    loop = asyncio.get_running_loop()
    sink = _Chunks()
    # An anamorphic latent's frames are shown as its metadata says (bare latents: square).
    writer = Mp4Writer(sink, width=info.width, height=info.height, fps=info.fps, crf=crf,
                       sample_aspect_ratio=info.sample_aspect_ratio)
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivvae-mp4")
    try:
        async for part in frames:
            await loop.run_in_executor(thread, writer.write, part)
            if chunk := sink.take():
                yield chunk
        await loop.run_in_executor(thread, writer.close)
        if chunk := sink.take():
            yield chunk
    finally:
        thread.submit(writer.close)  # a no-op after a clean close
        thread.shutdown(wait=False)


def render(fmt: OutputFormat, info: LatentInfo, frames: AsyncIterator[np.ndarray], *,
           crf: int = DEFAULT_CRF, frames_dtype: FramesDtype = "uint8",
           ) -> AsyncIterator[bytes]:
    """The output file of ``fmt`` as byte chunks."""
    if fmt == "frames":
        return frames_file(info, frames, frames_dtype)
    if frames_dtype != "uint8":
        raise ValueError("an MP4 holds uint8 frames")
    return mp4_file(info, frames, crf=crf)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


# -- batches (bare latents of more than one video) ----------------------------------------

BATCH_MEDIA_TYPES: dict[str, str] = {"mp4": "application/zip",
                                     "frames": "application/x-safetensors"}
BATCH_FRAMES_LAYOUT = "BTHWC uint8 RGB"
BATCH_FLOAT_FRAMES_LAYOUT = "BTHWC float32 RGB [-1, 1]"


async def _stack(items: list[AsyncIterator[np.ndarray]]) -> np.ndarray:
    """Every item's frames, in order: ``(B, T, H, W, 3)``."""
    stacks = []
    for item in items:
        stacks.append(np.concatenate([part async for part in item]))
    return np.stack(stacks)


async def render_batch(fmt: OutputFormat, info: LatentInfo,
                       items: list[AsyncIterator[np.ndarray]], *,
                       crf: int = DEFAULT_CRF, frames_dtype: FramesDtype = "uint8",
                       ) -> tuple[bytes, str]:
    """The output of a batch of videos of one size (``info``): ``(body, media type)``.

    One item is ``render`` 's file. More: ``mp4`` is a zip holding ``0.mp4``, ``1.mp4``, ...
    (stored, MP4s do not compress), ``frames`` one frames file of ``(B, T, H, W, 3)``
    (layout ``BATCH_FRAMES_LAYOUT``, or ``BATCH_FLOAT_FRAMES_LAYOUT`` in float32).
    """
    if len(items) == 1:
        return (await collect(render(fmt, info, items[0], crf=crf, frames_dtype=frames_dtype)),
                MEDIA_TYPES[fmt])
    if fmt == "frames":
        layout = BATCH_FRAMES_LAYOUT if frames_dtype == "uint8" else BATCH_FLOAT_FRAMES_LAYOUT
        meta = {**frames_metadata(info, frames_dtype), "layout": layout,
                "batch": str(len(items))}
        frames = (await _stack(items)).astype(_NP_DTYPE[frames_dtype], copy=False)
        return dumps({"frames": frames}, meta), BATCH_MEDIA_TYPES[fmt]
    if frames_dtype != "uint8":
        raise ValueError("an MP4 holds uint8 frames")
    sink = io.BytesIO()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, item in enumerate(items):
            archive.writestr(f"{index}.mp4", await collect(mp4_file(info, item, crf=crf)))
    return sink.getvalue(), BATCH_MEDIA_TYPES[fmt]


async def tensor_output(items: list[AsyncIterator[np.ndarray]],
                        ) -> tuple[bytes, dict[str, str]]:
    """Decoded frames as a raw tensor body and its ``shape`` / ``dtype`` headers (Hugging
    Face's remote-VAE output): uint8 frames as the frames file holds them, ``(T, H, W, 3)``
    for one video (what diffusers makes a list of PIL frames of) and ``(B, T, H, W, 3)``
    for a batch; float32 frames (the decoder's own values, about [-1, 1], not clamped) as
    the video ``(B, 3, T, H, W)``."""
    video = await _stack(items)
    if video.dtype == np.uint8:
        return raw_tensor_body(np.ascontiguousarray(video[0] if len(video) == 1 else video))
    return raw_tensor_body(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3),
                                                dtype=np.float32))
