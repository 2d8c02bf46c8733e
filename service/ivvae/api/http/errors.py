"""The HTTP status of every service error: one table."""

from __future__ import annotations

from ...errors import (
    BackendUnavailable,
    ClientGone,
    CorruptMedia,
    DeadlineExceeded,
    EmptyInput,
    InvalidInput,
    InvalidLatent,
    IVVAEError,
    Overloaded,
    TooLarge,
    Unauthorized,
    UnknownModel,
    UnsupportedMedia,
)

# Most specific first: the first matching class decides.
STATUS: tuple[tuple[type[IVVAEError], int], ...] = (
    (EmptyInput, 400),
    (CorruptMedia, 422),
    (InvalidLatent, 422),
    (UnknownModel, 400),
    (InvalidInput, 400),
    (UnsupportedMedia, 415),
    (TooLarge, 413),
    (Unauthorized, 401),
    (BackendUnavailable, 503),
    (Overloaded, 503),
    (DeadlineExceeded, 504),
    (ClientGone, 499),  # nginx's "client closed request": only logs and metrics see it
)


def http_status(exc: IVVAEError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def retry_after(exc: IVVAEError) -> str | None:
    """The ``Retry-After`` value (whole seconds) an error asks for, if any."""
    seconds = getattr(exc, "retry_after_s", None)
    return None if seconds is None else str(max(1, round(seconds)))


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "stable machine-readable code"},
        "detail": {"type": "string", "description": "what went wrong, for people"},
    },
}
_WHY = {400: "malformed request", 401: "missing or invalid API key",
        413: "too large for a limit (bytes, frames, pixels, the memory budget)",
        415: "not a video or image", 422: "unreadable media, latent or parameters",
        431: "too many request headers",
        500: "internal error", 503: "backend down or server overloaded (see Retry-After)",
        504: "the request's deadline passed"}


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` entries for ``statuses``: the JSON error body."""
    return {status: {"description": _WHY.get(status, "error"),
                     "content": {"application/json": {"schema": ERROR_SCHEMA}}}
            for status in statuses}


def video_body(description: str) -> dict[str, object]:
    """OpenAPI ``openapi_extra`` for a route whose body is a video or image upload."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {
        "required": True,
        "description": description,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
            "video/*": binary, "image/*": binary, "application/octet-stream": binary,
        }}}
