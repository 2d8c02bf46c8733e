"""POST /decode: a latent (file, bare latent, raw tensor) to an MP4, frames or a tensor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from ....core.names import CRF_RANGE, DEFAULT_CRF
from ....core.tasks import aclose_all, finish
from ....errors import InvalidInput, InvalidLatent, TooLarge
from ....latents import LatentInfo
from ....outputs import BATCH_MEDIA_TYPES, MEDIA_TYPES, render, render_batch, tensor_output
from ....wire import (
    DecodeTarget,
    check_latent_values,
    is_ivvae_latent_file,
    read_bare_latent,
    read_raw_tensor,
    safetensors_problem,
    tensor_to_float32,
)
from ...metering import RequestMeter
from .. import tensors
from ..answers import HELD_COPIES, HeldResponse, StreamedInTime
from ..deps import Svc, authorized, read_body, unless_disconnected
from ..openapi import binary_answer, decode_parameters, error_responses

router = APIRouter(tags=["decode"], dependencies=[authorized("decode")])


DESCRIPTION = """\
The body is a latent file from /encode, a bare latent (a safetensors file holding only
`latent`, `(B, z, t, h, w)` or one video `(z, t, h, w)`), or the same as a raw tensor body
with `shape` and `dtype` (Hugging Face's remote-VAE form: a raw body from diffusers'
`remote_decode` with no scaling parameter is decoded as raw, as Hugging Face's endpoints
do). A bare latent is in the model's scaled space unless `latent_space` (or
`scaling_factor` / `shift_factor` / `do_scaling`) says otherwise. The answer: an MP4 (a zip
of `0.mp4`, `1.mp4`, ... for a batch), a frames file (`format=frames`, or an `Accept` that
prefers `application/x-safetensors` to `video/mp4`), or with `output_type=pt` a raw tensor
body. One MP4 or frames file streams as it is decoded. An unknown parameter, or one that takes
one value given twice, is a 400 naming it."""


@router.post(
    "/decode",
    summary="Decode a latent (file, bare latent or raw tensor) to video/mp4, frames or a "
            "tensor",
    description=DESCRIPTION,
    response_class=Response,
    responses={200: binary_answer(
                   dict.fromkeys([*MEDIA_TYPES.values(), *BATCH_MEDIA_TYPES.values(),
                                  tensors.TENSOR_MEDIA_TYPE]),
                   "the output; one mp4 or frames file is streamed as it is decoded",
                   ["X-Model", "X-Frames", "X-Width", "X-Height", "X-Batch", "shape",
                    "dtype"]),
               **error_responses(400, 401, 413, 422, 500, 503, 504)},
    openapi_extra={"requestBody": {
        "required": True,
        "description": "a latent file (.safetensors) made by /encode, a bare latent, or a "
                       "raw tensor body (with shape and dtype parameters)",
        "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "parameters": decode_parameters()},
)
async def decode(request: Request, svc: Svc) -> Response:
    async with RequestMeter(svc.metrics, "decode", "http") as meter:
        form = tensors.parse_decode(request.query_params.multi_items(),
                                    request.headers.get("accept", ""), CRF_RANGE, DEFAULT_CRF)
        # The body counts against the memory for bodies until it has become a latent
        # and the decode has started.
        items: list[AsyncIterator[np.ndarray]]
        with svc.pipeline.bodies.hold() as held:
            data, _ = await read_body(request, svc.settings.max_upload_bytes, held)
            if form.tensor_shape is not None:
                raw = read_raw_tensor(data, form.tensor_shape, form.tensor_dtype)
                latent = check_latent_values(tensor_to_float32(raw), form.tensor_dtype)
                info, items = await unless_disconnected(request, svc.pipeline.decode_bare(
                    latent, form.tensor_dtype, DecodeTarget.parse(form.target_params),
                    form.frames_dtype))
            elif (problem := safetensors_problem(data)) is not None:
                raise InvalidLatent(f"not a readable latent file ({problem}); a raw tensor body "
                                    "needs its ?shape=...&dtype=... as query parameters")
            elif is_ivvae_latent_file(data):
                if form.target_params:
                    raise InvalidInput(
                        f"parameter {form.target_params[0][0]!r} is for bare latents: a latent "
                        "file from /encode records its own model, size and fps")
                info, frames = await unless_disconnected(request, svc.pipeline.decode_frames(
                    data, form.frames_dtype))
                items = [frames]
            else:
                latent, dtype = read_bare_latent(data)
                info, items = await unless_disconnected(request, svc.pipeline.decode_bare(
                    latent, dtype, DecodeTarget.parse(form.target_params), form.frames_dtype))
            del data
        headers = {"X-Model": info.model_name, "X-Frames": str(info.num_frames),
                   "X-Width": str(info.width), "X-Height": str(info.height),
                   "X-Batch": str(len(items))}
        if form.output != "pt" and len(items) == 1:
            # One file streams: memory stays at one decoder step, not the whole video.
            chunks = render(form.output, info, items[0], crf=form.crf,
                            frames_dtype=form.frames_dtype)
            try:
                # The first step runs before the status goes out: what fails there (a
                # backend down, a deadline) still gets its own status; later failures end
                # the stream.
                first = await unless_disconnected(request, anext(chunks, b""))
            except BaseException:
                await finish(aclose_all(chunks, items[0]))
                raise
            return StreamedInTime(_stream(first, chunks, items[0]),
                                  seconds=svc.settings.request_timeout_s,
                                  counted=meter.hand_over(),
                                  media_type=MEDIA_TYPES[form.output], headers=headers)
        # The rest is answered whole: a tensor, or a batch's file. It is decoded only while
        # the client waits for it (a client gone cancels it, and closing the items gives
        # the budget back at once), and is in the budget until the client has it; a batch's
        # MP4s are compressed, its frames file is held like a tensor.
        try:
            need = (_held_bytes(svc, info, len(items), form.frames_dtype)
                    if form.output != "mp4" else 0)
            if form.output == "pt":
                body, extra = await unless_disconnected(request, tensor_output(items))
                media, headers = tensors.TENSOR_MEDIA_TYPE, {**headers, **extra}
            else:
                body, media = await unless_disconnected(
                    request, render_batch(form.output, info, items, crf=form.crf,
                                          frames_dtype=form.frames_dtype))
        finally:
            await finish(aclose_all(*items))
        release = await svc.pipeline.budget.acquire(need)
        return HeldResponse(body, release=release, seconds=svc.settings.request_timeout_s,
                            counted=meter.hand_over(), media_type=media, headers=headers)


def _held_bytes(svc: Svc, info: LatentInfo, count: int, frames_dtype: str) -> int:
    """The memory a whole answer of ``count`` videos holds (``HELD_COPIES`` of its frames);
    a 413 before any decoding when it could never fit the budget."""
    frame = info.num_frames * info.height * info.width * 3 * (4 if frames_dtype == "float32"
                                                                else 1)
    need = HELD_COPIES * count * frame
    capacity = svc.pipeline.budget.capacity
    if need > capacity:
        raise TooLarge(f"the answer is {count * frame:,} bytes, and holding it takes "
                       f"{need:,} of the memory budget's {capacity:,} (IVVAE_MEMORY_BUDGET_MB): "
                       "decode fewer latents at once, or ask for mp4 (one video streams)")
    return need


async def _stream(first: bytes, rest: AsyncIterator[bytes], frames: AsyncIterator[np.ndarray]
                  ) -> AsyncIterator[bytes]:
    """The response body; closing it (done, failed, or the client gone) ends the decode
    and gives its share of the memory budget back."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        # The client gone, Starlette cancels this task and every await left in it.
        await finish(aclose_all(rest, frames))
