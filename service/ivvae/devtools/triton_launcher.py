"""Start a real Triton Inference Server from the ``nvidia-pytriton`` wheel, without Docker.

The wheel bundles a Triton 2.51 ``tritonserver`` binary with only the python backend. Tests
and the local stack use it on the CPU; production runs the NGC image. Three steps:

1. :func:`find_triton_install` locates the binary and copies the python-backend stub that
   matches the running interpreter into ``backends/python/`` (the server looks for it there).
2. ``ivvae.devtools.repository.prepare_repository`` copies a committed model repository and
   writes the machine-specific parameters (``EXECUTION_ENV_PATH``: which venv the stub
   activates) into the copy. Committed ``config.pbtxt`` files stay free of absolute paths.
3. :func:`start_triton` runs the server on loopback ports in its own process group and waits
   until ``/v2/health/ready`` answers; :class:`TritonServer` stops it together with its
   python stub processes.

``python -m ivvae.devtools.triton_launcher --repository DIR --workdir DIR`` does all three
and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import functools
import http.client
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ..config import LOCAL_TRITON_GRPC_PORT, LOCAL_TRITON_HTTP_PORT, LOCAL_TRITON_METRICS_PORT
from .repository import prepare_repository

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STUB_NAME = "triton_python_backend_stub"
LOG_EXCERPT_BYTES = 1 << 20
_GLOG_ERROR = re.compile(r"^E\d{4} ")
# Logged at every start on a machine without a GPU.
_LOG_NOISE = ("CudaDriverHelper has not been initialized",)


# -- where the wheel put things ------------------------------------------------------------


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside the installed ``nvidia-pytriton`` wheel."""

    binary: Path  # bin/tritonserver
    backend_dir: Path  # backends/ (holds python/libtriton_python.so)
    cache_dir: Path  # caches/ (holds local/libtritoncache_local.so)
    stub: Path  # backends/python/triton_python_backend_stub, for this Python version


def find_triton_install() -> TritonInstall:
    """Locate the tritonserver binary of the ``nvidia-pytriton`` wheel.

    Copies the python-backend stub built for the running interpreter's Python version into
    ``backends/python/`` unless an identical copy is already there (idempotent, and atomic
    so that parallel test workers do not see a half-written executable).

    Raises ``RuntimeError`` when the wheel is not installed or lacks a piece.
    """
    # find_spec does not import pytriton (its own imports need dependencies we do not install).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "Triton Inference Server not found: install it with "
            "`pip install --no-deps nvidia-pytriton==0.7.0` (the wheel ships the tritonserver "
            "binary), or run the NGC Triton image."
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    backend_dir = root / "backends"
    cache_dir = root / "caches"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub_source = root / "python_backend_stubs" / version / STUB_NAME
    for needed in (binary, backend_dir / "python", cache_dir, stub_source):
        if not needed.exists():
            raise RuntimeError(
                f"incomplete nvidia-pytriton install: {needed} is missing "
                f"(Python {version} needs a stub built for it)"
            )
    stub = backend_dir / "python" / STUB_NAME
    if not (stub.exists() and filecmp.cmp(stub_source, stub, shallow=False)):
        try:
            _copy_atomically(stub_source, stub)
        except OSError as exc:
            raise RuntimeError(f"cannot copy the python-backend stub to {stub}: {exc}") from exc
    return TritonInstall(binary=binary, backend_dir=backend_dir, cache_dir=cache_dir, stub=stub)


def _copy_atomically(src: Path, dst: Path) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# -- the server process --------------------------------------------------------------------


@dataclass
class TritonServer:
    """A running tritonserver, leader of its own process group (its python stubs included).

    Endpoints listen on 127.0.0.1 only. ``stop()`` and ``kill()`` end the whole group.
    """

    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    log_path: Path
    _ended: bool = field(default=False, init=False, repr=False)

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{LOOPBACK}:{self.metrics_port}"

    def is_ready(self) -> bool:
        """Whether ``GET /v2/health/ready`` answers 200 (all models loaded, server live)."""
        if self.has_exited():
            return False
        # http.client rather than urllib: urllib would send loopback requests to an HTTP proxy.
        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=2)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def log_excerpt(self, lines: int = 20) -> str:
        """The server log's error lines, then its last lines (the wide tables left out).

        The log holds the server's stdout and stderr, python stubs included.
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_EXCERPT_BYTES))
                text = f.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        all_lines = text.splitlines()
        errors = [
            line
            for line in all_lines
            if _GLOG_ERROR.match(line) and not any(noise in line for noise in _LOG_NOISE)
        ]
        tail = [line for line in all_lines if not line.startswith(("|", "+"))][-lines:]
        excerpt = ["error lines:", *errors[-lines:]] if errors else []
        return "\n".join([*excerpt, "last lines:", *tail])

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the server (it unloads models, ending its stubs), then SIGKILL the group.

        Waits at most ``timeout`` seconds for a graceful exit. Idempotent.
        """
        if self._ended:
            return
        if not self.has_exited():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self.has_exited() and time.monotonic() < deadline:
                time.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the server and every process of its group at once (a crash). Idempotent."""
        if self._ended:
            return
        pgid = self.process.pid
        if self.process.returncode is None:
            # Safe while the server is unreaped (alive or a zombie): its pid, which is the
            # group id, cannot be reused until it is reaped.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        else:
            # Someone reaped the server (process.poll()), so the group id may have been
            # reused: end only leftover processes that are ours by session and name.
            for pid in process_group_members(pgid, session=pgid, names=_OUR_PROCESS_NAMES):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._ended = True
        # The stubs' parent is gone; init reaps them, give it a moment.
        deadline = time.monotonic() + 5
        while process_group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def has_exited(self) -> bool:
        """Whether the server process has exited. Unlike ``process.poll()`` it does not reap
        the process, so its pid keeps identifying the process group until ``stop()``."""
        if self.process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# /proc/<pid>/comm is cut at 15 characters.
_OUR_PROCESS_NAMES = ("tritonserver", STUB_NAME[:15])


def process_group_members(
    pgid: int, *, session: int | None = None, names: Sequence[str] | None = None
) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid``, from ``/proc``;
    optionally only those of ``session`` whose command name is one of ``names``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name is in parentheses and may contain anything: split after it.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, pgrp, sid = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(pgrp) != pgid or state in ("Z", "X"):
            continue
        if session is not None and int(sid) != session:
            continue
        if names is not None and comm not in names:
            continue
        members.append(int(entry.name))
    return members


def _pick_ports(requested: dict[str, int]) -> dict[str, int]:
    """Replace each 0 with a loopback port that is free now (another process may take it
    before the server binds it). All sockets stay open until all are picked, so the picked
    ports differ from each other."""
    with contextlib.ExitStack() as stack:
        ports = dict(requested)
        for name, port in requested.items():
            if port == 0:
                sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                sock.bind((LOOPBACK, 0))
                ports[name] = int(sock.getsockname()[1])
    if len(set(ports.values())) != len(ports):
        raise ValueError(f"the ports must differ: {ports}")
    return ports


@functools.cache
def _accepted_flags(binary: Path) -> str:
    """The binary's ``--help`` text (flags differ between Triton releases)."""
    result = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout + result.stderr


def start_triton(
    repository: Path,
    *,
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
    log_path: Path | None = None,
    ready_timeout: float = 60,
    models: Sequence[str] | None = None,
) -> TritonServer:
    """Start tritonserver on a prepared repository and wait until it is ready.

    A port of 0 means a free loopback port. All endpoints bind to 127.0.0.1. With ``models``
    the server runs in explicit model-control mode and loads only those; otherwise it loads
    every model of the repository. stdout and stderr go to ``log_path`` (default: a new
    file in the temp directory). Raises ``RuntimeError`` with an excerpt of the log if the
    server exits or is not ready within ``ready_timeout`` seconds (it is stopped then).
    """
    install = find_triton_install()
    repository = Path(repository).absolute()
    if not repository.is_dir():
        raise ValueError(f"model repository {repository} is not a directory")
    ports = _pick_ports({"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    args = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--backend-directory={install.backend_dir}",
        f"--cache-directory={install.cache_dir}",
        f"--http-address={LOOPBACK}",
        f"--http-port={ports['http']}",
        f"--grpc-address={LOOPBACK}",
        f"--grpc-port={ports['grpc']}",
        f"--metrics-address={LOOPBACK}",
        f"--metrics-port={ports['metrics']}",
        # Config comes from the committed files only: ready in ~1 s instead of ~3 s.
        "--disable-auto-complete-config",
        "--pinned-memory-pool-byte-size=0",
    ]
    if "--allow-gpu-metrics" in _accepted_flags(install.binary):
        args.append("--allow-gpu-metrics=false")
    if models is not None:
        args.append("--model-control-mode=explicit")
        args += [f"--load-model={model}" for model in models]

    log.info("starting %s", " ".join(args))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches the stubs too
        )
    server = TritonServer(
        process=process,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        repository=repository,
        log_path=log_path,
    )
    deadline = time.monotonic() + ready_timeout
    while not server.is_ready():
        if server.has_exited():
            server.kill()
            raise RuntimeError(
                f"tritonserver exited with status {process.returncode} before it was ready; "
                f"log {log_path}:\n{server.log_excerpt()}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"tritonserver was not ready after {ready_timeout:g} s; "
                f"log {log_path}:\n{server.log_excerpt()}"
            )
        time.sleep(0.05)
    log.info("tritonserver ready: http %s grpc %s", server.http_url, server.grpc_url)
    return server


# -- python -m ivvae.devtools.triton_launcher ----------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare a repository copy, start tritonserver, serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m ivvae.devtools.triton_launcher", description=main.__doc__
    )
    parser.add_argument("--repository", type=Path, required=True, help="committed repository")
    parser.add_argument(
        "--workdir", type=Path, required=True, help="where the prepared copy and the log go"
    )
    # Beside a gateway on its default port, as ``ivvae triton-serve`` starts it.
    parser.add_argument("--http-port", type=int, default=LOCAL_TRITON_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=LOCAL_TRITON_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=LOCAL_TRITON_METRICS_PORT)
    parser.add_argument(
        "--env-path", type=Path, default=None, help="venv the stubs activate (default: this one)"
    )
    parser.add_argument(
        "--model", dest="models", action="append", default=None, help="load only these models"
    )
    parser.add_argument("--ready-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    stop = stop_on_signals()
    args.workdir.mkdir(parents=True, exist_ok=True)
    repository = args.workdir / "model_repository"
    prepare_repository(args.repository, repository, env_path=args.env_path or sys.prefix)
    try:
        server = start_triton(
            repository,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_path=args.workdir / "tritonserver.log",
            ready_timeout=args.ready_timeout,
            models=args.models,
        )
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    return serve_until(server, stop)


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set (install before starting a server, so that a
    signal during start-up still stops it). Call from the main thread."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping tritonserver", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop_requested


def serve_until(server: TritonServer, stop: threading.Event) -> int:
    """Print the endpoints, then block until ``stop`` is set (stop the server, return 0) or
    the server exits on its own (return 1)."""
    with server:
        print(
            f"tritonserver ready: http {server.http_url} grpc {server.grpc_url} "
            f"metrics {server.metrics_url} log {server.log_path}",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.has_exited():
                server.kill()
                log.error(
                    "tritonserver exited with status %s:\n%s",
                    server.process.returncode,
                    server.log_excerpt(),
                )
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
