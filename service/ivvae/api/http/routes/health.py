"""Liveness, readiness and Prometheus metrics (open: probes and scrapers carry no key)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..deps import Svc
from ..protocol import LIVENESS_PATH

router = APIRouter(tags=["health"])


@router.get(LIVENESS_PATH, summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: models loaded and backend ready",
            responses={503: {"description": "not ready (the body says why)",
                             "content": {"application/json": {}}}})
async def readyz(svc: Svc) -> JSONResponse:
    ok, body = await svc.readiness()
    return JSONResponse(body, status_code=200 if ok else 503)


# HEAD as well: some load balancers probe with it (the status is the answer).
@router.head(LIVENESS_PATH, include_in_schema=False)
async def healthz_head() -> Response:
    return Response()


@router.head("/readyz", include_in_schema=False)
async def readyz_head(svc: Svc) -> Response:
    ok, _ = await svc.readiness()
    return Response(status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(svc: Svc) -> PlainTextResponse:
    return PlainTextResponse(svc.metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")
