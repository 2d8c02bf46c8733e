"""The service's one error hierarchy.

Every error a request can meet is one of these. Each carries a stable machine-readable
``code`` (it becomes the ``error`` field of the HTTP JSON body and the gRPC status details)
and a human ``detail``. Transports map the classes to status codes in one table each
(``ivvae.api.http.errors`` and ``ivvae.api.grpc.errors``); nothing else decides a status.

The model package (``ivvae.model``) does not import this module: it raises ``ValueError``
subclasses, which the pipeline wraps.
"""

from __future__ import annotations


class IVVAEError(Exception):
    """Base class. ``code`` is stable API; ``detail`` is for people."""

    code = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# -- the client sent something wrong (4xx / INVALID_ARGUMENT and friends) -------------------


class InvalidInput(IVVAEError):
    """The request is malformed: bad option, bad field, unreadable body."""

    code = "invalid_input"


class EmptyInput(InvalidInput):
    code = "empty_input"


class UnsupportedMedia(IVVAEError):
    """The upload is not a video or image FFmpeg can read (or has no video stream)."""

    code = "unsupported_media"


class CorruptMedia(InvalidInput):
    """A recognised container whose data cannot be decoded (truncated, damaged)."""

    code = "corrupt_media"


class TooLarge(IVVAEError):
    """The upload exceeds a configured limit (bytes, frames, pixels per frame)."""

    code = "too_large"


class InvalidLatent(InvalidInput):
    """A latent file with a wrong shape, dtype, metadata or non-finite values."""

    code = "invalid_latent"


class UnknownModel(InvalidInput):
    code = "unknown_model"


class Unauthorized(IVVAEError):
    code = "unauthorized"


# -- the service cannot do it right now (5xx / UNAVAILABLE, DEADLINE_EXCEEDED) --------------


class BackendUnavailable(IVVAEError):
    """The inference backend (e.g. Triton) is down or lost the request's sequence."""

    code = "backend_unavailable"


class Overloaded(IVVAEError):
    """Too busy now. ``retry_after_s``: when a retry may succeed (HTTP ``Retry-After``)."""

    code = "overloaded"

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(IVVAEError):
    code = "deadline_exceeded"


class NotTakenInTime(DeadlineExceeded):
    """The client did not read an answer already begun in time. It cannot be told so:
    the transport ends the connection or the stream instead of answering."""


class ClientGone(IVVAEError):
    """The client disconnected; its work was cancelled. Nobody reads the answer."""

    code = "cancelled"


# -- raised by the clients only -------------------------------------------------------------


class UntrustedCertificate(IVVAEError):
    """The server's TLS certificate is not signed by a trusted CA (a wrong or missing
    ``ca_cert``): no retry fixes it. Never sent by the service."""

    code = "tls_untrusted"
