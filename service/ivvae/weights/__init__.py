"""Which weights a server or CLI uses: configured, bundled, or (last resort) untrained.

The bundled model ships in this folder as a safetensors file with its model card. When no
weights are configured it is the default. If it is absent (a trimmed install), an
untrained model with a fixed seed is used and flagged as such everywhere (logs, /models,
latent metadata carries its weights hash), so its latents are never confused with real ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.model_info import ModelInfo
    from ..model import IVVAE

log = logging.getLogger("ivvae.weights")

BUNDLED_DIR = Path(__file__).parent
BUNDLED_FILE = BUNDLED_DIR / "ivvae_z16_dim16_bundled.safetensors"
UNTRAINED_NAME = "ivvae_z16_dim16_untrained"
UNTRAINED_SEED = 0


def bundled_weights() -> Path | None:
    return BUNDLED_FILE if BUNDLED_FILE.is_file() else None


def load_weights(path: str | Path | None, *, name: str = "", device: str = "cpu",
                 ) -> tuple[IVVAE, ModelInfo]:
    """Load ``path`` (or the bundled/untrained default when empty) for inference."""
    import torch

    from ..core.model_info import ModelInfo
    from ..model import IVVAE, IVVAEConfig, load_model
    from ..model.checkpoint import weights_sha256
    from ..model.device import torch_device

    torch_device(device)  # a bad device is an error before the weights are read
    trained = True
    if path:
        source = str(path)
        model = load_model(path, device=device)
    elif (bundled := bundled_weights()) is not None:
        source = "bundled"
        model = load_model(bundled, device=device)
    else:
        source, trained = "untrained", False
        log.warning("no weights configured and no bundled weights found: serving an "
                    "UNTRAINED model (latents are meaningless); set IVVAE_WEIGHTS")
        torch.manual_seed(UNTRAINED_SEED)
        model = IVVAE(IVVAEConfig(z_dim=16, dim=16)).to(device).eval().requires_grad_(False)
        model.name = UNTRAINED_NAME
        model.weights_sha256 = weights_sha256(dict(model.state_dict()))
    if name:
        model.name = name
    cfg = model.cfg
    info = ModelInfo(
        name=model.name, z_dim=cfg.z_dim, dim=cfg.dim, scale_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor, weights_sha256=model.weights_sha256, trained=trained,
        source=source, num_params=sum(p.numel() for p in model.parameters()),
    )
    return model, info
