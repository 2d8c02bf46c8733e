"""IV-VAE with the diffusers autoencoder surface, for training code written against diffusers.

::

    from ivvae.diffusers import IVVAEAutoencoder

    vae = IVVAEAutoencoder.from_ivvae_weights("ivvae_z16_dim64.pth")  # or .from_pretrained(dir)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        z = vae.encode(video).latent_dist.sample(generator)     # (B, z, t, h, w), unscaled
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
    ...
    video = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample

Conventions, as in diffusers' video VAEs: ``video`` ``(B, 3, T, H, W)`` float in [-1, 1]
(any ``T``, ``H``, ``W``: padded as ``ivvae.model.vae`` says); ``latent_dist`` is over the
unscaled posterior ``s`` (``mode() == model.encode_moments(video)[0]``), and ``decode``
takes unscaled latents and returns ``(B, 3, 1 + 4(t-1), 8h, 8w)`` float, not clamped
(``num_frames`` / ``height`` / ``width`` crop). The service's latent files hold the scaled
form ``scaling_factor * (s - shift_factor)``.

With diffusers installed the class is a ``diffusers.ModelMixin`` + ``ConfigMixin``:
``from_pretrained`` / ``save_pretrained`` (a folder with ``config.json`` and
``diffusion_pytorch_model.safetensors``), ``.to(device, dtype)``, ``vae.config`` and the
output classes are diffusers' own. Without it a small stand-in gives the same surface, so
the rest of ivvae never needs diffusers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from .core.geometry import SPACE_COMPRESSION, TIME_COMPRESSION
from .model.checkpoint import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_NAME_KEY,
    DIFFUSERS_WEIGHTS,
    CheckpointError,
    default_name,
    is_diffusers_folder,
    load_model,
    official_state_dict,
    read_weights,
    weights_sha256,
)
from .model.config import IVVAEConfig
from .model.vae import IVVAE

CONFIG_NAME = DIFFUSERS_CONFIG
WEIGHTS_NAME = DIFFUSERS_WEIGHTS

_F = TypeVar("_F", bound=Callable[..., Any])

if TYPE_CHECKING:
    _Base = nn.Module
    _ConfigBase = object
    HAVE_DIFFUSERS: bool
    _DiffusersKLOutput: Any
    _DiffusersDecoderOutput: Any

    def register_to_config(init: _F) -> _F: ...
else:
    try:
        from diffusers import ConfigMixin as _ConfigBase
        from diffusers import ModelMixin as _Base
        from diffusers.configuration_utils import register_to_config
        from diffusers.models.autoencoders.vae import DecoderOutput as _DiffusersDecoderOutput
        from diffusers.models.modeling_outputs import AutoencoderKLOutput as _DiffusersKLOutput

        HAVE_DIFFUSERS = True
    except ImportError:
        HAVE_DIFFUSERS = False
        _Base = nn.Module
        _ConfigBase = object

        def register_to_config(init: _F) -> _F:
            """Records the constructor's arguments as ``self.config`` (diffusers' way)."""
            import functools
            import inspect

            signature = inspect.signature(init)

            @functools.wraps(init)
            def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                values = {k: v for k, v in bound.arguments.items() if k != "self"}
                self._internal_dict = self.config = _Config(values)
                init(self, *args, **kwargs)

            return wrapper  # type: ignore[return-value]


class _Config(dict[str, Any]):
    """Without diffusers, its ``FrozenDict`` in short: a dict whose keys read as attributes
    too (``vae.config.scaling_factor``, ``vae.config["scaling_factor"]``, ``.get``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))``, elementwise, as diffusers' VAEs return it.

    ``mean`` and ``logvar``: ``(B, z, t, h, w)``, in the unscaled latent space;
    ``parameters`` is the two concatenated along ``dim=1``, as in diffusers.
    """

    deterministic = False  # diffusers' flag for a zero-variance posterior; never so here

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar
        self.std = torch.exp(0.5 * logvar)
        self.var = torch.exp(logvar)

    @property
    def parameters(self) -> Tensor:
        return torch.cat([self.mean, self.logvar], dim=1)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None
               ) -> Tensor:
        """``mean + std * eps``. ``generator``: one, or one per batch item (a list); a CPU
        generator draws on the CPU whatever the model's device (the same draws on any
        device), as diffusers' ``randn_tensor`` does."""
        return self.mean + self.std * _randn(self.mean, generator)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) (default: the standard normal), summed per item: ``(B,)``."""
        dims = list(range(1, self.mean.dim()))
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
            - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: Tensor, dims: list[int] | tuple[int, ...] | None = None) -> Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims`` (default: all but
        the batch)."""
        dims = list(range(1, self.mean.dim())) if dims is None else list(dims)
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar
                               + (sample - self.mean) ** 2 / self.var, dim=dims)


def _randn(like: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([_randn(like[i : i + 1], g) for i, g in enumerate(generator)])
    device = like.device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw a {device} tensor from a {generator.device} "
                             "generator")
        device = torch.device("cpu")
    return torch.randn(like.shape, generator=generator, device=device,
                       dtype=like.dtype).to(like.device)


@dataclass
class _EncoderOutput:
    latent_dist: DiagonalGaussian

    def __getitem__(self, index: int) -> DiagonalGaussian:
        return (self.latent_dist,)[index]


@dataclass
class _DecoderOutput:
    sample: Tensor

    def __getitem__(self, index: int) -> Tensor:
        return (self.sample,)[index]


def _check_loading_info(source: Any, info: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` for every key diffusers' loader found missing, unexpected
    or mis-shaped (``info`` is its ``output_loading_info``)."""
    problems = []
    for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"),
                       ("mis-shaped", "mismatched_keys")):
        # mismatched_keys are (key, shape in the file, shape in the model)
        items = sorted(f"{k[0]}: file {tuple(k[1])} != model {tuple(k[2])}"
                       if isinstance(k, (tuple, list)) else str(k)
                       for k in info.get(key) or ())
        if items:
            shown = ", ".join(items[:20]) + (
                f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"{len(items)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"weights in {source} do not match {IVVAEAutoencoder.__name__}'s "
                              "config: " + "; ".join(problems))


def _encoder_output(dist: DiagonalGaussian) -> Any:
    return _DiffusersKLOutput(latent_dist=dist) if HAVE_DIFFUSERS else _EncoderOutput(dist)


def _decoder_output(video: Tensor) -> Any:
    return _DiffusersDecoderOutput(sample=video) if HAVE_DIFFUSERS else _DecoderOutput(video)


# The constructor's arguments, as config.json holds them.
_CONFIG_NAMES = ("z_dim", "dim", "dim_mult", "num_res_blocks", "scaling_factor",
                 "shift_factor", "latent_channels", "temporal_compression_ratio",
                 "spatial_compression_ratio")


def _take_identity(vae: IVVAEAutoencoder, folder: Path | None) -> None:
    """Name the model and hash its weights as ``ivvae.model`` does when it serves the
    folder (its file's tensors, whatever dtype they are loaded in here): a folder served
    with ``IVVAE_WEIGHTS`` and the same folder loaded here agree on which weights made a
    latent. A Hub repository has no local folder: its loaded weights, and its config's
    name."""
    if folder is not None and is_diffusers_folder(folder):
        stored, meta = read_weights(folder)
    else:
        stored, meta = official_state_dict(vae.model), {}
    vae.model.name = (vae.config.get(DIFFUSERS_NAME_KEY) or meta.get("model_name")
                      or default_name(vae.model.cfg))
    vae.model.weights_sha256 = weights_sha256(stored)


class IVVAEAutoencoder(_Base, _ConfigBase):
    """IV-VAE behind diffusers' autoencoder API; see the module docstring.

    Weights live in ``self.model`` (an ``ivvae.model.IVVAE``). A freshly built one trains
    (parameters require gradients); call ``requires_grad_(False).eval()`` to freeze it.
    """

    config_name = CONFIG_NAME
    _supports_gradient_checkpointing = False
    config: Any  # diffusers' FrozenDict, or _Config without diffusers
    _internal_dict: dict[str, Any]

    @register_to_config
    def __init__(
        self,
        z_dim: int = 16,
        dim: int = 64,
        dim_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        latent_channels: int | None = None,
        temporal_compression_ratio: int = TIME_COMPRESSION,
        spatial_compression_ratio: int = SPACE_COMPRESSION,
    ) -> None:
        super().__init__()
        if latent_channels is not None and latent_channels != z_dim:
            raise ValueError(f"latent_channels ({latent_channels}) must equal z_dim ({z_dim})")
        if (temporal_compression_ratio, spatial_compression_ratio) != (
                TIME_COMPRESSION, SPACE_COMPRESSION):
            raise ValueError(f"IV-VAE compresses {TIME_COMPRESSION}x in time and "
                             f"{SPACE_COMPRESSION}x in space; the config says otherwise")
        self.model = IVVAE(IVVAEConfig(z_dim=z_dim, dim=dim, dim_mult=tuple(dim_mult),
                                       num_res_blocks=num_res_blocks,
                                       scale_factor=scaling_factor, shift_factor=shift_factor))
        self.use_slicing = False
        self.use_tiling = False
        if HAVE_DIFFUSERS:
            # Written to config.json, read by pipelines that ask for latent_channels.
            register: Callable[..., None] = getattr(self, "register_to_config")  # noqa: B009
            register(latent_channels=z_dim)
        else:
            self._internal_dict["latent_channels"] = z_dim
            self.config.latent_channels = z_dim

    # -- building ----------------------------------------------------------------------

    @classmethod
    def from_ivvae(cls, model: IVVAE) -> IVVAEAutoencoder:
        """An autoencoder holding a copy of ``model``'s weights (frozen if it was)."""
        c = model.cfg
        vae = cls(z_dim=c.z_dim, dim=c.dim, dim_mult=c.dim_mult,
                  num_res_blocks=c.num_res_blocks, scaling_factor=c.scale_factor,
                  shift_factor=c.shift_factor)
        vae.model.load_state_dict(model.state_dict())
        vae.model.name, vae.model.weights_sha256 = model.name, model.weights_sha256
        frozen = not any(p.requires_grad for p in model.parameters())
        vae.requires_grad_(not frozen)
        # nn.Module's own .to: diffusers' warns of fp32-only modules on any dtype given,
        # and this model has none.
        nn.Module.to(vae, device=model.device, dtype=model.param_dtype)
        return vae.eval() if frozen else vae

    @classmethod
    def from_ivvae_weights(cls, path: str | os.PathLike[str]) -> IVVAEAutoencoder:
        """From an official ``.pth`` or an ivvae ``.safetensors`` (``ivvae.model``'s loader:
        strict key mapping, shape checks, factors from the file or the official preset)."""
        return cls.from_ivvae(load_model(path))

    # -- the diffusers surface ---------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one batch item at a time (less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, *args: Any, **kwargs: Any) -> None:
        """Less peak memory, the same result: IV-VAE already runs group by group in time
        with a carried cache; tiled, each step is one group of 4 frames (instead of 4
        groups). Frames are not split in space (the cache makes time the exact cut), so
        diffusers' tile sizes, accepted for compatibility, are not used."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def _steps(self) -> dict[str, int]:
        """The model's step options: one group per step when tiled, else its own default."""
        return {"groups_per_step": 1} if self.use_tiling else {}

    def encode(self, x: Tensor, return_dict: bool = True) -> Any:
        """``x`` ``(B, 3, T, H, W)`` float in [-1, 1] -> ``.latent_dist`` over
        ``(B, z, 1 + ceil((T-1)/4), ceil(H/8), ceil(W/8))`` in ``x``'s dtype."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, T, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():  # uint8 frames would be encoded as [0, 255]
            raise ValueError(f"x must be float in [-1, 1], got {x.dtype}")
        parts = [self.model.encode_moments(item, **self._steps) for item in self._slices(x)]
        mean = torch.cat([p[0] for p in parts]).to(x.dtype)
        logvar = torch.cat([p[1] for p in parts]).to(x.dtype)
        dist = DiagonalGaussian(mean, logvar)
        return _encoder_output(dist) if return_dict else (dist,)

    def decode(self, z: Tensor, return_dict: bool = True,
               generator: torch.Generator | None = None, *, num_frames: int | None = None,
               height: int | None = None, width: int | None = None) -> Any:
        """Unscaled ``z`` ``(B, z, t, h, w)`` -> ``.sample`` ``(B, 3, T, H, W)`` float in
        ``z``'s dtype (about [-1, 1], not clamped), ``T = 1 + 4(t-1)``, ``H = 8h``,
        ``W = 8w`` unless cropped by ``num_frames`` / ``height`` / ``width``.
        ``generator`` is accepted as diffusers' ``decode`` does (pipelines pass it) and, as
        there, unused: decoding draws nothing."""
        c = self.model.cfg
        if z.dim() != 5 or z.shape[1] != c.z_dim:
            raise ValueError(f"z must be (B, {c.z_dim}, t, h, w), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"z must be a float tensor, got {z.dtype}")
        videos = [self.model.decode(c.scale_factor * (item.float() - c.shift_factor),
                                    num_frames=num_frames, height=height, width=width,
                                    **self._steps)
                  for item in self._slices(z)]
        video = torch.cat(videos).to(z.dtype)
        return _decoder_output(video) if return_dict else (video,)

    def forward(self, sample: Tensor, sample_posterior: bool = False,
                return_dict: bool = True, generator: torch.Generator | None = None) -> Any:
        """Encode then decode ``sample`` (the mean, or a posterior sample), cropped back to
        ``sample``'s frame count and size."""
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        t, h, w = sample.shape[2:]
        return self.decode(z, return_dict, num_frames=t, height=h, width=w)

    def _slices(self, x: Tensor) -> Iterator[Tensor] | tuple[Tensor]:
        return x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)

    if HAVE_DIFFUSERS:

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            """diffusers' loader, strict: a weight the folder lacks, one it holds that the
            model has not, or one of another shape (``ignore_mismatched_sizes=True``) is a
            ``CheckpointError`` naming them; diffusers only logs these, and leaves the
            model's tensor randomly initialised. ``output_loading_info=True`` returns
            ``(model, info)`` as in diffusers.
            Without ``accelerate`` installed it loads the plain way instead of printing
            that it would like ``accelerate``."""
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                kwargs.setdefault("low_cpu_mem_usage", False)
            wants_info = bool(kwargs.pop("output_loading_info", False))
            model, info = super().from_pretrained(  # type: ignore[misc]
                *args, output_loading_info=True, **kwargs)
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            _check_loading_info(source, info)
            folder = Path(str(source)) / (kwargs.get("subfolder") or "")
            _take_identity(model, folder if folder.is_dir() else None)
            return (model, info) if wants_info else model

        def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any,
                            **kwargs: Any) -> None:
            """diffusers' ``save_pretrained``, with the model's name in ``config.json``
            (``_ivvae_model_name``): the folder served (``IVVAE_WEIGHTS=folder``) or loaded
            again keeps it."""
            register: Callable[..., None] = getattr(self, "register_to_config")  # noqa: B009
            register(**{DIFFUSERS_NAME_KEY: self.model.name or None})
            super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]

    # -- saving without diffusers ------------------------------------------------------

    if not HAVE_DIFFUSERS:

        def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any,
                            **kwargs: Any) -> None:
            """``config.json`` + ``diffusion_pytorch_model.safetensors``, as diffusers
            writes them (so diffusers' ``from_pretrained`` reads the folder too). Always
            safetensors; diffusers' other keywords (hub pushing, sharding) do nothing
            here."""
            if not kwargs.get("safe_serialization", True):
                raise ValueError("without diffusers only safetensors is written "
                                 "(safe_serialization=True)")
            from safetensors.torch import save_file

            folder = Path(save_directory)
            folder.mkdir(parents=True, exist_ok=True)
            config = {"_class_name": type(self).__name__, **dict(self._internal_dict),
                      DIFFUSERS_NAME_KEY: self.model.name or None}
            config["dim_mult"] = list(config["dim_mult"])
            (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

        @classmethod
        def from_config(cls, config: Mapping[str, Any]) -> IVVAEAutoencoder:
            """A new (untrained) autoencoder of ``config`` (``vae.config`` or its JSON)."""
            return cls(**{k: config[k] for k in _CONFIG_NAMES if k in config})

        @classmethod
        def from_pretrained(cls, folder: str | os.PathLike[str],
                            torch_dtype: torch.dtype | None = None,
                            subfolder: str | None = None) -> IVVAEAutoencoder:
            """A local folder written by ``save_pretrained`` (diffusers' or this one)."""
            from safetensors.torch import load_file

            path = Path(folder) / subfolder if subfolder else Path(folder)
            if not (path / CONFIG_NAME).is_file():
                raise OSError(f"{path} holds no {CONFIG_NAME}: not a folder that "
                              "save_pretrained wrote")
            config = json.loads((path / CONFIG_NAME).read_text())
            vae = cls.from_config(config)
            vae.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
            if torch_dtype is not None:
                vae.to(dtype=torch_dtype)
            _take_identity(vae, path)
            return vae.eval()

        @property
        def dtype(self) -> torch.dtype:
            return self.model.param_dtype

        @property
        def device(self) -> torch.device:
            return self.model.device
