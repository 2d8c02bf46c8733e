"""The gRPC status of every service error: one table.

The status message is the error's ``detail`` and the trailing metadata ``ivvae-error-code``
its stable ``code``: together the same facts as the HTTP API's JSON body.

``UnsupportedMedia`` is ``INVALID_ARGUMENT``, not ``FAILED_PRECONDITION``: the request's
own bytes are at fault and resending them never works, whatever the server's state
(``FAILED_PRECONDITION`` means "fix the system first, then retry"). The error code tells it
apart from other bad input.
"""

from __future__ import annotations

import grpc

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

ERROR_CODE_KEY = "ivvae-error-code"

# Most specific first: the first matching class decides.
STATUS: tuple[tuple[type[IVVAEError], grpc.StatusCode], ...] = (
    (EmptyInput, grpc.StatusCode.INVALID_ARGUMENT),
    (CorruptMedia, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidLatent, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (UnsupportedMedia, grpc.StatusCode.INVALID_ARGUMENT),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthorized, grpc.StatusCode.UNAUTHENTICATED),
    (BackendUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ClientGone, grpc.StatusCode.CANCELLED),
)


def grpc_status(exc: IVVAEError) -> grpc.StatusCode:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return grpc.StatusCode.INTERNAL
