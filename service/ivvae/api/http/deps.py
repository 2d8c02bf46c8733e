"""What the HTTP routes share: the service, the API-key check, the bounded body read, the
upload spooled to a temporary file, and work cancelled when its client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect

from ...core import strict
from ...core.tasks import finish
from ...errors import (
    ClientGone,
    DeadlineExceeded,
    EmptyInput,
    InvalidInput,
    IVVAEError,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnsupportedMedia,
)
from ...memory import BodyHold
from ...service import Service
from ..auth import check_bearer
from ..metering import count_outcome
from .protocol import BODY_TIMED_OUT

log = logging.getLogger("ivvae.http")

MULTIPART_SLACK = 64 * 1024  # boundary lines and part headers around the file


def get_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


Svc = Annotated[Service, Depends(get_service)]


def authorize(request: Request, svc: Svc) -> None:
    """``Authorization: Bearer <key>`` when API keys are configured."""
    check_bearer(request.headers.getlist("authorization"), svc.settings.api_key_set,
                 how="'Authorization: Bearer <key>'")


# Only what /openapi.json says (a bearer scheme on the routes that check a key, so that
# /docs can send one and generated clients know to): ``authorize`` decides, with or
# without keys configured.
_BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey",
                     description="an API key, when the server has IVVAE_API_KEYS")


def authorized(op: str) -> Any:
    """The key check of the routes of ``op`` (their label in the request meter), as a
    router dependency. It runs before the route's meter, so a refusal is counted here as a
    request of ``op`` (its error by the error handler, as every error's)."""

    def check(request: Request, svc: Svc,
              _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]) -> None:
        try:
            authorize(request, svc)
        except Unauthorized as exc:
            count_outcome(svc.metrics, op, "http", exc.code)
            raise

    return Depends(check)


def _refuse_declared_size(request: Request, limit: int) -> None:
    """413 now for a body that says it is too large (more digits than any count: too
    large too; h11 has checked they are digits)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (
            not strict.is_count(declared) or int(declared) > limit + MULTIPART_SLACK):
        raise TooLarge(f"the upload is {declared} bytes; the limit is {limit}")


async def read_body(request: Request, limit: int, held: BodyHold) -> tuple[bytes, str]:
    """The uploaded file's bytes and content type: multipart field ``file`` or raw body.

    Reading stops as soon as the cap is passed (413), before any parsing. The bytes held in
    memory are counted in ``held`` as they arrive (it raises when they do not fit).
    """
    _refuse_declared_size(request, limit)
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit + MULTIPART_SLACK:
                raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
            held.take(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise _gone(request) from None
    body = b"".join(chunks)
    chunks.clear()
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        sub = Request(request.scope, receive)
        try:
            form = await sub.form(max_files=1, max_fields=16)
        except Exception as exc:  # the multipart parser raises several types
            raise InvalidInput(f"malformed multipart body: {exc}") from exc
        # The parser has the file (spooled to disk past 1 MB): the raw body can go before
        # the file is read back, so that a body is held once, not twice.
        del body, receive, sub
        held.give(total)
        try:
            upload = _the_file(form)
            held.take(upload.size or 0)
            data = await upload.read()
            ctype = (upload.content_type or "application/octet-stream").lower()
        finally:
            await finish(form.close())  # its files on disk go even when the client left
    else:
        data = body
    if len(data) > limit:
        raise TooLarge(f"the file is {len(data)} bytes; the limit is {limit}")
    if not data:
        raise EmptyInput("the request body is empty: send a file")
    return data, ctype


_T = TypeVar("_T")
SPOOL_CHUNK = 1 << 20
_VIDEO_TYPES = ("video/", "image/", "application/octet-stream")


def require_video_type(ctype: str, *, tensor_hint: bool = False) -> None:
    """Refuse (415) an upload whose content type says it is not a video or image."""
    if ctype and not ctype.startswith(_VIDEO_TYPES):
        raise UnsupportedMedia(
            f"content type {ctype[:60]!r} is not a video or image; send the file as multipart "
            "field 'file' or with a video/*, image/* or application/octet-stream content type"
            + (" (or frames as a raw tensor body with shape and dtype parameters)"
               if tensor_hint else ""))


def refuse_parameters(params: list[tuple[str, str]], endpoint: str) -> None:
    """Refuse (400) query parameters on an endpoint that takes none."""
    if params:
        raise InvalidInput(f"unknown parameter {params[0][0]!r}: {endpoint} takes none")


@contextlib.asynccontextmanager
async def spooled_upload(request: Request, limit: int) -> AsyncIterator[tuple[Path, str]]:
    """The uploaded file (multipart field ``file`` or the raw body) in a temporary file,
    and its content type; the file is removed afterwards.

    The body streams to disk as it arrives (multipart through Starlette's spooling
    parser), so an upload costs its size on disk, not two to four times it in memory.
    Reading stops as soon as the cap is passed (413), before any parsing.
    """
    _refuse_declared_size(request, limit)
    try:
        fd, name = tempfile.mkstemp(prefix="ivvae-upload-")
    except OSError as exc:
        raise _no_room(exc) from exc
    path = Path(name)
    try:
        with _spool_space(), os.fdopen(fd, "wb") as out:  # close's flush may be what fails
            ctype = request.headers.get("content-type", "").lower()
            if ctype.startswith("multipart/form-data"):
                ctype = await _multipart_to(request, limit, out)
            else:
                total = 0
                try:
                    async for chunk in request.stream():
                        total += len(chunk)
                        if total > limit:
                            raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
                        out.write(chunk)
                except ClientDisconnect:
                    raise _gone(request) from None
            size = out.tell()
        if size > limit:
            raise TooLarge(f"the file is {size} bytes; the limit is {limit}")
        if not size:
            raise EmptyInput("the request body is empty: send a file")
        yield path, ctype
    finally:
        path.unlink(missing_ok=True)


# A full (or over-quota) spool disk is the server's momentary trouble, not the client's: a
# 503 to retry (elsewhere), and a warning for the operator, instead of a 500.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def _no_room(exc: OSError) -> IVVAEError:
    if exc.errno not in _NO_ROOM:
        raise exc
    log.warning("no room to spool an upload in %s (%s): size the temporary folder for "
                "IVVAE_MAX_UPLOAD_BYTES x concurrent uploads (x2 for multipart)",
                tempfile.gettempdir(), exc.strerror)
    return Overloaded("the server has no room for this upload now; retry later",
                      retry_after_s=5)


@contextlib.contextmanager
def _spool_space() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise _no_room(exc) from exc


def _gone(request: Request) -> IVVAEError:
    """Why the upload ended early: the client went away, or the connection cut it off for
    its pace (``protocol.BODY_TIMED_OUT``; the client got a 408)."""
    if request.scope.get(BODY_TIMED_OUT):
        return DeadlineExceeded("the request body came too slowly (answered 408)")
    return ClientGone("the client disconnected during the upload")


async def _multipart_to(request: Request, limit: int, out: Any) -> str:
    total = 0

    async def counted() -> dict[str, Any]:
        nonlocal total
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise _gone(request)
        total += len(message.get("body", b""))
        if total > limit + MULTIPART_SLACK:
            raise TooLarge(f"the upload exceeds the limit of {limit} bytes")
        return dict(message)

    try:
        form = await Request(request.scope, counted).form(max_files=1, max_fields=16)
    except (TooLarge, ClientGone, DeadlineExceeded):
        raise
    except OSError as exc:  # its own spool file (a full disk), not a malformed body
        raise _no_room(exc) from exc
    except Exception as exc:  # the multipart parser raises several types
        raise InvalidInput(f"malformed multipart body: {exc}") from exc
    try:
        upload = _the_file(form)
        upload.file.seek(0)
        await asyncio.to_thread(shutil.copyfileobj, upload.file, out, SPOOL_CHUNK)
        return (upload.content_type or "application/octet-stream").lower()
    finally:
        await finish(form.close())  # its files on disk go even when the client left


def _the_file(form: FormData) -> UploadFile:
    """A multipart body's field ``file``; any other field is refused, naming it: options
    are query parameters, and a form field would be ignored without a word."""
    for name, _ in form.multi_items():
        if name != "file":
            raise InvalidInput(f"multipart field {name!r} is not read: the upload is field "
                               f"'file', and options are query parameters (?{name}=...)")
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("the multipart body has no complete file field named 'file' (none "
                           "was sent, it has another name, or the body was cut short)")
    return upload


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """``await work``, cancelled as soon as the client disconnects (``ClientGone``).

    Call after the body is read: the next ``receive`` then only ever says "disconnect"."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # seen
            if watcher.done() and not watcher.cancelled():
                raise ClientGone("the client went away; its work was cancelled")
    return task.result()
