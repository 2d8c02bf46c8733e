"""GET /models: the served models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ...metering import RequestMeter
from ..deps import Svc, authorized
from ..openapi import MODELS_SCHEMA, error_responses

router = APIRouter(tags=["models"], dependencies=[authorized("models")])


@router.get("/models", summary="Served models", response_model=None,
            responses={200: {"description": "the served models",
                             "content": {"application/json": {"schema": MODELS_SCHEMA}}},
                       **error_responses(401, 503)})
async def models(svc: Svc) -> dict[str, Any]:
    async with RequestMeter(svc.metrics, "models", "http"):
        return {"default": svc.default_model,
                "encode_precision": svc.settings.encode_precision,
                "models": [m.as_dict() for m in svc.models.values()]}
