"""The API-key check, one for every transport.

With ``IVVAE_API_KEYS`` set, a request must carry exactly one ``Authorization: Bearer <key>``
(HTTP header or gRPC metadata) naming one of the keys; keys are compared in constant time.
Two ``Authorization`` values are refused rather than read first-wins (a proxy and a client
that disagree must not be resolved silently).
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence

from ..errors import Unauthorized


def check_bearer(values: Sequence[str], keys: Collection[str], *, how: str) -> None:
    """``values``: every ``Authorization`` value the request carries; ``how``: how to send
    the key, for the error message. Raises ``Unauthorized``."""
    if not keys:
        return
    if len(values) > 1:
        raise Unauthorized(f"the request carries {len(values)} Authorization values; send one")
    scheme, _, token = (values[0] if values else "").partition(" ")
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys
    ):
        raise Unauthorized(f"missing or invalid API key: send {how}")
