"""Is a TCP port free to listen on? Asked before a server loads models or exports anything,
so a busy port is a one-line error within a second, not a failure a minute later."""

from __future__ import annotations

import contextlib
import errno
import socket


class PortInUse(OSError):
    """Something already listens on the port a server was asked to use."""

    def __init__(self, host: str, port: int, what: str) -> None:
        super().__init__(errno.EADDRINUSE, f"{what} port {port} on {host} is already in use "
                         "(another server is running there: stop it or pick another port)")
        self.host, self.port, self.what = host, port, what


def ensure_free(host: str, port: int, what: str) -> None:
    """Raise ``PortInUse`` when ``host:port`` cannot be bound (port 0 is always free).

    The probe binds with ``SO_REUSEADDR``, as uvicorn, gRPC and tritonserver do, so a port
    in TIME_WAIT after a restart counts as free and only a live listener as busy."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(host, port, what) from None
            raise


def listening(host: str, port: int, timeout: float = 0.3) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout):
        return True
    return False
