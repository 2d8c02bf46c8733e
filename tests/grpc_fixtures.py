"""A real ivvae server for client-side tests: one ``Service`` served over gRPC (and HTTP)
on free loopback ports, from a thread with its own event loop.

The thread keeps the server independent of the test's own loop, so blocking clients
(``ivvae.client.Client``, subprocesses) and asyncio clients can both talk to it. ``call``
runs a coroutine on the server's loop (to inspect or patch the service from a test).

While a server runs, torch uses one intra-op thread: the tiny test models run several
times faster so on a busy 2-core machine (several threads per core make every small op
wait for the slowest), and the test's client code gets the other core.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ivvae.api.grpc.server import GrpcServer, start_grpc_server
from ivvae.config import Settings
from ivvae.service import Service

T = TypeVar("T")


class ServerThread:
    def __init__(self, settings: Settings, *, http: bool = False,
                 health_poll_s: float = 0.1) -> None:
        self.settings = settings.model_copy(update={"host": "127.0.0.1", "grpc_port": 0})
        self.http = http
        self.health_poll_s = health_poll_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ivvae-test-server",
                                       daemon=True)
        self.service: Service
        self.grpc: GrpcServer
        self._uvicorn: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._torch_threads = 0
        self.http_port = 0

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc.port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        import torch

        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.service = Service(self.settings)
        await self.service.start()
        self.grpc = await start_grpc_server(self.service, self.settings,
                                            health_poll_s=self.health_poll_s)
        if self.http:
            import uvicorn

            from ivvae.api.http import create_app

            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.http_port = sock.getsockname()[1]
            app = create_app(self.settings, service=self.service)
            config = uvicorn.Config(app, log_level="warning", lifespan="on")
            self._uvicorn = uvicorn.Server(config)
            self._http_task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
            while not self._uvicorn.started:
                await asyncio.sleep(0.01)

    async def _stop(self) -> None:
        if self._uvicorn is not None and self._http_task is not None:
            self._uvicorn.should_exit = True
            await self._http_task
        await self.grpc.stop(1.0)
        await self.service.close()

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.close_loop()

    def close_loop(self) -> None:
        import torch

        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        torch.set_num_threads(self._torch_threads)


@contextmanager
def server_thread(settings: Settings, *, http: bool = False) -> Iterator[ServerThread]:
    server = ServerThread(settings, http=http).start()
    try:
        yield server
    finally:
        server.stop()
