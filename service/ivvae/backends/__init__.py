"""Inference backends: ``local`` (in-process torch) and ``triton`` (Triton over gRPC)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend, DecodeSession, EncodeSession, ModelInfo

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Metrics


def create_backend(settings: Settings, metrics: Metrics) -> Backend:
    """The backend named by ``settings.backend``; heavy imports happen here, lazily."""
    if settings.backend == "local":
        from .local import LocalBackend

        return LocalBackend(settings, metrics)
    if settings.backend == "triton":
        from .triton import TritonBackend

        return TritonBackend(settings, metrics)
    raise ValueError(f"unknown backend {settings.backend!r}")


__all__ = ["Backend", "DecodeSession", "EncodeSession", "ModelInfo", "create_backend"]
