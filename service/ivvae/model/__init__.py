"""The IV-VAE network in pure PyTorch. Imports only ``ivvae.core`` (torch-free facts)."""

from ..core.geometry import PADDING_POLICY, latent_frames, latent_size, padded_frames
from .cache import FeatureCache
from .checkpoint import (
    CheckpointError,
    infer_config,
    load_model,
    official_state_dict,
    read_weights,
    save_safetensors,
    weights_sha256,
)
from .config import PRESETS, IVVAEConfig
from .vae import IVVAE, StreamDecoder, StreamEncoder, pad_space

__all__ = [
    "IVVAE",
    "PADDING_POLICY",
    "PRESETS",
    "CheckpointError",
    "FeatureCache",
    "IVVAEConfig",
    "StreamDecoder",
    "StreamEncoder",
    "infer_config",
    "latent_frames",
    "latent_size",
    "load_model",
    "official_state_dict",
    "pad_space",
    "padded_frames",
    "read_weights",
    "save_safetensors",
    "weights_sha256",
]
