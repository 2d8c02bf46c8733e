"""grpc.health.v1 follows the service's readiness (SERVING / NOT_SERVING, and NOT_SERVING
during shutdown); reflection lists the services."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ivvae.api.grpc.server import SERVICE_NAME
from tests.grpc_fixtures import ServerThread
from tests.service_fixtures import tiny_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(target: str, service: str) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def _wait_for(target: str, want: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = [await _status(target, name) for name in ("", SERVICE_NAME)]
        if got == [want, want]:
            return
        assert time.monotonic() < deadline, f"health is {got}, not {want}"
        await asyncio.sleep(0.05)


async def test_health_follows_readiness_and_shutdown(tiny_weights: Path) -> None:
    server = ServerThread(tiny_settings(tiny_weights), health_poll_s=0.05).start()
    stopped = False
    try:
        target = server.grpc_target
        await _wait_for(target, SERVING)

        ready = server.service.readiness

        async def not_ready() -> tuple[bool, dict[str, Any]]:
            return False, {"status": "not_ready"}

        server.service.readiness = not_ready  # type: ignore[method-assign]
        await _wait_for(target, NOT_SERVING)
        server.service.readiness = ready  # type: ignore[method-assign]
        await _wait_for(target, SERVING)

        # Shutdown: a watcher sees NOT_SERVING before the server goes away.
        async with grpc.aio.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""))
            seen = [(await watch.read()).status]
            # A long grace: the watcher must not be cut off before the news reaches it on a
            # loaded machine; it hangs up itself once it has seen NOT_SERVING.
            stopping = asyncio.ensure_future(
                asyncio.to_thread(server.call, server.grpc.stop(30)))
            try:
                while (reply := await watch.read()) is not grpc.aio.EOF:
                    seen.append(reply.status)
                    if reply.status == NOT_SERVING:
                        watch.cancel()
                        break
            except grpc.aio.AioRpcError:
                pass  # the server ended the stream first
            await asyncio.wait_for(stopping, 60)  # and the server did stop
            stopped = True
        assert seen[0] == SERVING and NOT_SERVING in seen[1:]
    finally:
        if not stopped:
            server.call(server.grpc.stop(None))
        server.call(server.service.close())
        server.close_loop()


async def test_reflection_lists_services(tiny_weights: Path) -> None:
    server = ServerThread(tiny_settings(tiny_weights)).start()
    try:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def ask() -> Any:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            replies = [r async for r in stub.ServerReflectionInfo(ask())]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
    finally:
        server.stop()
