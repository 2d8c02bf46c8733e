"""POST /encode: a video (or image, or frames as a tensor) to an IV-VAE latent."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ....errors import InvalidInput
from ....latents import decode_latent_file
from ....pipeline import FramesUpload
from ...metering import RequestMeter
from .. import tensors
from ..deps import (
    Svc,
    authorized,
    read_body,
    require_video_type,
    spooled_upload,
    unless_disconnected,
)
from ..openapi import binary_answer, encode_parameters, error_responses, video_body

router = APIRouter(tags=["encode"], dependencies=[authorized("encode")])

LATENT_MEDIA_TYPE = "application/octet-stream"


DESCRIPTION = """\
The body is a video or image file (multipart field `file`, or the raw file with its content
type), or frames as a raw tensor body with `shape` and `dtype`: `(T, H, W, 3)` uint8, or a
float video `(B, 3, T, H, W)` / images `(B, 3, H, W)` in [-1, 1] (rounded to 8-bit frames,
as every video is read). The preprocessing options resize, crop, bucket and cut the clip as
it is decoded. The answer is the latent `.safetensors` file (its metadata: the model, the
size, the fps, the preprocessing), or with `output_type=pt` the latent `(B, z, t, h, w)` as
a raw tensor body in the model's scaled space. An unknown parameter, or one that takes one value
given twice, is a 400 naming it."""


@router.post(
    "/encode",
    summary="Encode a video (or image, or frames as a tensor) to an IV-VAE latent",
    description=DESCRIPTION,
    response_class=Response,
    responses={200: binary_answer(
                   [LATENT_MEDIA_TYPE], "the latent file, or with output_type=pt the latent "
                   "as a raw tensor body (headers shape, dtype)",
                   ["X-Cache", "X-Latent-Shape", "X-Model", "Content-Disposition", "shape",
                    "dtype"]),
               **error_responses(400, 401, 413, 415, 422, 500, 503, 504)},
    openapi_extra={**video_body("the video or image file: as multipart field 'file', or as "
                                "the raw body with its content type; or frames as a raw "
                                "tensor body (with shape and dtype parameters)"),
                   "parameters": encode_parameters()},
)
async def encode(request: Request, svc: Svc) -> Response:
    async with RequestMeter(svc.metrics, "encode", "http"):
        form = tensors.parse_encode(request.query_params.multi_items())
        limit = svc.settings.max_upload_bytes
        if form.tensor_shape is not None:
            with svc.pipeline.bodies.hold() as held:
                data, _ = await read_body(request, limit, held)
                sources = [FramesUpload(f, fps=form.fps)
                           for f in tensors.frames_of_tensor(data, form, limit)]
                del data
                if form.output == "file" and len(sources) > 1:
                    raise InvalidInput(f"a latent file holds one video; this tensor has a "
                                       f"batch of {len(sources)}: ask for output_type=pt")
                # Held while the frames are encoded: they are the body's bytes, converted.
                results = [await unless_disconnected(request, svc.pipeline.encode(
                    src, form.options.for_item(i))) for i, src in enumerate(sources)]
        else:
            # A file upload goes to disk as it arrives, not into memory.
            async with spooled_upload(request, limit) as (path, ctype):
                require_video_type(ctype, tensor_hint=True)
                results = [await unless_disconnected(request, svc.pipeline.encode(
                    path, form.options))]
        info = results[0].info
        headers = {
            "X-Cache": "hit" if all(r.cache_hit for r in results) else "miss",
            "X-Latent-Shape": ",".join(str(s) for s in results[0].latent_shape),
            "X-Model": info.model_name,
        }
        if form.output == "pt":
            latents = [decode_latent_file(r.data)[0] for r in results]
            body, tensor_headers = tensors.latent_answer(latents, form, info.scale_factor,
                                                         info.shift_factor)
            return Response(body, media_type=tensors.TENSOR_MEDIA_TYPE,
                            headers={**headers, **tensor_headers})
        name = f"{info.content_sha256[:16]}.latent.safetensors"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(results[0].data, media_type=LATENT_MEDIA_TYPE, headers=headers)
