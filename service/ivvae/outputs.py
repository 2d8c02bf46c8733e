"""Decoded frames as the bytes a client asked for: an MP4 or a frames file.

One home for both output formats, so HTTP, gRPC and the CLI return byte-identical files for
the same latent. Both are produced as a stream of byte chunks while frames come out of the
decoder, so memory stays bounded by one decoder step:

* ``mp4``: H.264 in a fragmented MP4 (``ivvae.video.Mp4Writer`` on a non-seekable sink:
  the index first, then one fragment per keyframe), which players and PyAV read like any
  MP4, and which can be sent before the whole video is encoded.
* ``frames``: a safetensors file holding ``frames`` ``(T, H, W, 3)`` uint8 RGB and
  metadata ``FRAMES_METADATA_KEYS``; its header is known from the latent before decoding.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from .core.names import DEFAULT_CRF
from .latents import LatentInfo
from .safetensors_io import header_bytes
from .video import Mp4Writer

OutputFormat = Literal["mp4", "frames"]
MEDIA_TYPES: dict[str, str] = {"mp4": "video/mp4", "frames": "application/x-safetensors"}
FRAMES_LAYOUT = "THWC uint8 RGB"
FRAMES_METADATA_KEYS = ("num_frames", "height", "width", "fps", "model_name", "layout")


def frames_metadata(info: LatentInfo) -> dict[str, str]:
    return {"num_frames": str(info.num_frames), "height": str(info.height),
            "width": str(info.width), "fps": f"{info.fps.numerator}/{info.fps.denominator}",
            "model_name": info.model_name, "layout": FRAMES_LAYOUT}


async def frames_file(info: LatentInfo, frames: AsyncIterator[np.ndarray]
                      ) -> AsyncIterator[bytes]:
    """The frames file of ``frames`` (``(n, H, W, 3)`` uint8 parts, ``info.num_frames`` in
    all), header first."""
    shape = (info.num_frames, info.height, info.width, 3)
    head = header_bytes({"frames": ("U8", shape)}, frames_metadata(info))
    async for part in frames:
        # the header goes out with frame 0: nothing is sent before the decoder ran once
        yield head + np.ascontiguousarray(part, dtype=np.uint8).tobytes()
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
    writer = Mp4Writer(sink, width=info.width, height=info.height, fps=info.fps, crf=crf)
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
           crf: int = DEFAULT_CRF) -> AsyncIterator[bytes]:
    """The output file of ``fmt`` as byte chunks."""
    if fmt == "frames":
        return frames_file(info, frames)
    return mp4_file(info, frames, crf=crf)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])
