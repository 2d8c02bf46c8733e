"""ivvae: IV-VAE latents for video, as a library, a CLI and a service.

``import ivvae`` is light: torch is imported only when a model name below is first used,
so the gateway can run without torch when inference happens on Triton.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.version import __version__

_MODEL_NAMES = {
    "IVVAE", "IVVAEConfig", "PRESETS", "FeatureCache", "StreamEncoder", "StreamDecoder",
    "load_model", "CheckpointError",
}

if TYPE_CHECKING:
    from .model import (  # noqa: F401
        IVVAE,
        PRESETS,
        CheckpointError,
        FeatureCache,
        IVVAEConfig,
        StreamDecoder,
        StreamEncoder,
        load_model,
    )


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'ivvae' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_MODEL_NAMES)]
