"""What the HTTP routes share: the service, the API-key check, the metered body read."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.datastructures import UploadFile

from ...errors import EmptyInput, InvalidInput, TooLarge
from ...service import Service
from ..auth import check_bearer

MULTIPART_SLACK = 64 * 1024  # boundary lines and part headers around the file


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


Svc = Annotated[Service, Depends(get_service)]


def authorize(request: Request, svc: Svc) -> None:
    """``Authorization: Bearer <key>`` when API keys are configured."""
    check_bearer(request.headers.getlist("authorization"), svc.settings.api_key_set,
                 how="'Authorization: Bearer <key>'")


Authorized = Depends(authorize)


async def read_body(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded file's bytes and content type: multipart field ``file`` or raw body.

    Reading stops as soon as the cap is passed (413), before any parsing.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise TooLarge(f"the upload is {int(declared)} bytes; the limit is {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit + MULTIPART_SLACK:
            raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        sub = Request(request.scope, receive)
        try:
            form = await sub.form(max_files=1, max_fields=16)
        except Exception as exc:  # the multipart parser raises several types
            raise InvalidInput(f"malformed multipart body: {exc}") from exc
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("the multipart body needs a file field named 'file'")
        data = await upload.read()
        await form.close()
        ctype = (upload.content_type or "application/octet-stream").lower()
    else:
        data = body
    if len(data) > limit:
        raise TooLarge(f"the file is {len(data)} bytes; the limit is {limit}")
    if not data:
        raise EmptyInput("the request body is empty: send a file")
    return data, ctype
