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


# The codes of what no route served: a path or method that is none of ivvae's, or another
# status the framework answers with itself.
UNSERVED_CODES = {404: "not_found", 405: "method_not_allowed"}
OTHER_HTTP_CODE = "http_error"


def http_status(exc: IVVAEError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def retry_after(exc: IVVAEError) -> str | None:
    """The ``Retry-After`` value (whole seconds) an error asks for, if any."""
    seconds = getattr(exc, "retry_after_s", None)
    return None if seconds is None else str(max(1, round(seconds)))
