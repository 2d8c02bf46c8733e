"""Container health probe for images without curl: exit 0 when an HTTP GET answers 2xx.

    python healthcheck.py                                  # http://127.0.0.1:$IVVAE_PORT/healthz
    python healthcheck.py http://127.0.0.1:8000/v2/health/ready

With ``IVVAE_TLS_CERT`` set the gateway speaks HTTPS, and so does the default probe. A
loopback liveness probe sends nothing secret, so it does not verify the certificate (which
names the service, not 127.0.0.1).

Standard library only, so it runs in the slim gateway image and in the Triton image alike.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

DEFAULT_PATH = "/healthz"
TIMEOUT_S = 4.0


def default_url() -> str:
    """The gateway's liveness endpoint on the port the gateway was told to use."""
    port = os.environ.get("IVVAE_PORT", "8000")
    scheme = "https" if os.environ.get("IVVAE_TLS_CERT") else "http"
    return f"{scheme}://127.0.0.1:{port}{DEFAULT_PATH}"


def probe(url: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """GET ``url``; (True, status) on 2xx, (False, reason) otherwise. Never raises."""
    # An empty ProxyHandler: an HTTP(S)_PROXY set for the service must not catch loopback.
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=unverified))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return 200 <= status < 300, f"HTTP {status}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url()
    ok, reason = probe(url)
    if not ok:
        print(f"unhealthy: GET {url}: {reason}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
