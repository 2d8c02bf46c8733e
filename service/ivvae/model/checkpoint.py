"""Checkpoints: official ``.pth`` state dicts and ``.safetensors``, strictly checked.

Our module names differ from the official ones (``encoder.stem`` vs ``encoder.conv1``,
``norm1`` vs ``residual.0`` ...). The mapping is explicit: one rename table per module type,
walked over the module tree, so every parameter has exactly one official name and the two
directions cannot drift apart. The config is inferred from tensor shapes; loading fails with
an error naming every missing, unexpected or mis-shaped key.

``.pth`` files are read with ``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.files import FILE_MODE
from .config import PRESETS, IVVAEConfig, preset_for
from .device import torch_device
from .layers import (
    PAC_DILATIONS,
    Attention,
    Downsample,
    FrameAttention,
    PACHead,
    ResBlock2D,
    ResBlock3D,
    Upsample,
)
from .network import Decoder, Encoder
from .vae import IVVAE

StateDict = Mapping[str, Tensor]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A weights file that is unreadable or does not match the IV-VAE layout."""


def _pac_renames() -> dict[str, str]:
    renames = {"branch_0": "PAC_0.conv", "fuse": "PAC_conv.conv"}
    for i, d in enumerate(PAC_DILATIONS):
        renames[f"dilated.{i}"] = f"PAC_{d}.conv"
    return renames


# internal child/parameter name -> official name, per module type. Names not listed are
# the same in both (e.g. conv_2d / conv_3d inside a SepConv3d, list indices).
_RENAMES: dict[type, dict[str, str]] = {
    IVVAE: {"quant_conv": "conv1", "post_quant_conv": "conv2"},
    Encoder: {"stem": "conv1", "head_norm": "head.0", "head": "head.2"},
    Decoder: {"conv_in": "conv1.conv", "head_norm": "head.0", "head": "head.2"},
    ResBlock3D: {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                 "conv2": "residual.6"},
    ResBlock2D: {"norm1": "residual.0", "conv1": "residual.2.conv", "norm2": "residual.3",
                 "conv2": "residual.6.conv"},
    Attention: {"attn_2d": "Attention_2d", "attn_3d": "Attention_3d"},
    FrameAttention: {"norm_gamma": "norm.gamma"},
    Downsample: {"conv_2d": "resample_2d.1", "conv_3d": "resample_3d.1"},
    Upsample: {"conv_2d": "resample_2d.1", "conv_3d": "resample_3d.1"},
    PACHead: _pac_renames(),
}


def official_names(model: nn.Module) -> dict[str, str]:
    """Map every internal parameter name of ``model`` to its official checkpoint name."""
    out: dict[str, str] = {}

    def walk(module: nn.Module, internal: str, official: str) -> None:
        renames = _RENAMES.get(type(module), {})
        for name, _ in module.named_parameters(recurse=False):
            out[internal + name] = official + renames.get(name, name)
        for name, child in module.named_children():
            if isinstance(child, nn.ModuleList):
                for idx, sub in enumerate(child):
                    key = f"{name}.{idx}"
                    walk(sub, f"{internal}{key}.", official + renames.get(key, key) + ".")
            else:
                walk(child, f"{internal}{name}.", official + renames.get(name, name) + ".")

    walk(model, "", "")
    return out


def official_state_dict(model: IVVAE) -> dict[str, Tensor]:
    """The model's parameters under the official names (what an official .pth holds)."""
    names = official_names(model)
    return {names[k]: v.detach() for k, v in model.named_parameters()}


def expected_shapes(cfg: IVVAEConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a config, without allocating real weights."""
    with torch.device("meta"):
        model = IVVAE(cfg)
    return {k: tuple(v.shape) for k, v in official_state_dict(model).items()}


def _first(sd: StateDict, key: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"not an IV-VAE checkpoint: missing key {key!r}")
    return sd[key]


def infer_config(sd: StateDict) -> IVVAEConfig:
    """Config from tensor shapes; scale/shift from the matching official preset, else 1/0."""
    z = int(_first(sd, "conv1.conv_2d.weight").shape[0])
    d = int(_first(sd, "encoder.conv1.conv_2d.weight").shape[0])
    down = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")}
    n_down = max(down) + 1 if down else 0
    # encoder.downsamples: 3 stages x (nrb ResBlock3D + 1 resampler) + 1 + 2*nrb 2-D blocks
    nrb, rem = divmod(n_down - 4, 5)
    if rem or nrb < 1:
        raise CheckpointError(f"cannot infer num_res_blocks from {n_down} encoder.downsamples")
    mult = []
    for i in range(3):
        w = _first(sd, f"encoder.downsamples.{i * (nrb + 1)}.residual.2.conv_2d.weight")
        mult.append(int(w.shape[0]) // d)
    top = _first(sd, "encoder.middle.0.residual.0.gamma")
    mult.append(int(top.shape[0]) // 2 // d)
    preset = preset_for(z, d)
    factors = (preset[1].scale_factor, preset[1].shift_factor) if preset else (1.0, 0.0)
    try:
        return IVVAEConfig(z_dim=z, dim=d, dim_mult=tuple(mult), num_res_blocks=nrb,
                           scale_factor=factors[0], shift_factor=factors[1])
    except ValueError as exc:
        raise CheckpointError(f"inferred an invalid config: {exc}") from exc


def check_state_dict(cfg: IVVAEConfig, sd: StateDict) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(sd[k].shape)} != model {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)"
                                             if len(items) > 20 else "")
            problems.append(f"{len(items)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(
            f"weights do not match IV-VAE z{cfg.z_dim} dim{cfg.dim}: " + "; ".join(problems)
        )
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"non-float tensors in weights: {', '.join(sorted(bad)[:10])}")


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters holding a NaN or an infinity (a diverged run's)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def weights_sha256(sd: StateDict) -> str:
    """Content hash of the weights, independent of file format (.pth or .safetensors)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# The folder ``IVVAEAutoencoder.save_pretrained`` writes (``ivvae.diffusers``), laid out as
# diffusers lays out a model: its config (the constructor's arguments) and its weights,
# keyed by the wrapper's child ``model.`` and this package's own parameter names.
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_PREFIX = "model."
# The model's name in that config; diffusers keeps a key with a leading "_" out of the
# constructor's arguments, and a folder served (IVVAE_WEIGHTS=folder) keeps its name.
DIFFUSERS_NAME_KEY = "_ivvae_model_name"


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / DIFFUSERS_CONFIG).is_file() and (p / DIFFUSERS_WEIGHTS).is_file()


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.pth``/``.pt`` or ``.safetensors`` file, or a folder ``save_pretrained``
    wrote: (state dict under official names, string metadata)."""
    p = Path(path)
    if is_diffusers_folder(p):
        return _read_diffusers_folder(p)
    if p.is_dir():
        raise CheckpointError(f"weights path is a directory, not a .pth or .safetensors "
                              f"file nor a folder that save_pretrained wrote (with "
                              f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}): {p}")
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {p}")
    meta: dict[str, str] = {}
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(
                obj["state_dict"], dict
            ):
                obj = obj["state_dict"]
            if not isinstance(obj, dict) or not all(
                isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
            ):
                raise CheckpointError(f"{p} does not hold a flat state dict of tensors")
            sd = dict(obj)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt files raise many types (pickle, safetensors, OSError)
        # torch's message for a file it will not unpickle advises weights_only=False, which
        # runs whatever code the file holds: never here, so it is not passed on.
        reason = (
            "it is not a torch checkpoint of tensors only (weights are read with "
            "weights_only=True: never arbitrary objects)"
            if isinstance(exc, pickle.UnpicklingError) else
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise CheckpointError(f"cannot read weights {p}: {reason}") from exc
    return sd, meta


def _read_diffusers_folder(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        cfg = IVVAEConfig(z_dim=int(config["z_dim"]), dim=int(config["dim"]),
                          dim_mult=tuple(int(m) for m in config["dim_mult"]),
                          num_res_blocks=int(config["num_res_blocks"]))
        factors = {"scale_factor": str(float(config["scaling_factor"])),
                   "shift_factor": str(float(config["shift_factor"]))}
        name = config.get(DIFFUSERS_NAME_KEY)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / DIFFUSERS_CONFIG} is not an IV-VAE autoencoder's "
                              f"config: {exc!r}") from exc
    sd, _ = read_weights(folder / DIFFUSERS_WEIGHTS)
    with torch.device("meta"):
        names = official_names(IVVAE(cfg))
    internal = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in sd.items()
                if k.startswith(DIFFUSERS_PREFIX)}
    if len(internal) != len(sd) or set(internal) != set(names):
        odd = sorted(set(sd) ^ {DIFFUSERS_PREFIX + k for k in names})
        raise CheckpointError(f"{folder / DIFFUSERS_WEIGHTS} does not hold the weights its "
                              f"config describes: {', '.join(odd[:5])}"
                              f"{' ...' if len(odd) > 5 else ''}")
    official = {names[k]: v for k, v in internal.items()}
    try:
        check_state_dict(cfg, official)  # the config's size, not only what shapes imply
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / DIFFUSERS_WEIGHTS} does not hold the weights its "
                              f"config describes: {exc}") from None
    meta = {**factors, **({"model_name": name} if isinstance(name, str) and name else {})}
    return official, meta


def load_model(
    weights: str | os.PathLike[str] | StateDict,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    scale_factor: float | None = None,
    shift_factor: float | None = None,
) -> IVVAE:
    """Build an IVVAE from official-layout weights (path or state dict), strictly.

    Scale/shift factors: explicit arguments, else the file's metadata (safetensors written
    by this project), else the official preset with the same (z_dim, dim), else 1/0.
    ``dtype`` is the parameter dtype (default float32, whatever the file stores).
    ``device`` must be one this process can use (``ivvae.model.device``): checked before
    the weights are read, which can take a while.
    """
    target = torch_device(str(device))
    meta: dict[str, str] = {}
    if isinstance(weights, Mapping):
        sd = dict(weights)
    else:
        sd, meta = read_weights(weights)
    cfg = infer_config(sd)
    if (scale_factor is None or shift_factor is None) and "scale_factor" not in meta \
            and default_name(cfg) not in PRESETS:
        # A .pth (or a bare state dict) of a non-official size: its factors are nowhere.
        log.warning("%s holds no scale/shift factors and no official preset is %s: using "
                    "scale %g, shift %g; the latents of these weights from their .safetensors "
                    "(as ivvae writes them) differ. Pass scale_factor= / shift_factor=",
                    "the state dict" if isinstance(weights, Mapping) else weights,
                    default_name(cfg), cfg.scale_factor, cfg.shift_factor)
    scale = scale_factor if scale_factor is not None else float(
        meta.get("scale_factor", cfg.scale_factor))
    shift = shift_factor if shift_factor is not None else float(
        meta.get("shift_factor", cfg.shift_factor))
    cfg = cfg.with_factors(scale, shift)
    check_state_dict(cfg, sd)
    with torch.device("meta"):
        model = IVVAE(cfg)
    names = official_names(model)
    internal = {names[k]: k for k in names}
    model.load_state_dict({internal[k]: v for k, v in sd.items()}, strict=True, assign=True)
    model = model.to(device=target, dtype=dtype or torch.float32)
    model.eval().requires_grad_(False)
    model.weights_sha256 = weights_sha256(sd)
    model.name = meta.get("model_name") or default_name(cfg)
    return model


def default_name(cfg: IVVAEConfig) -> str:
    """The name of weights that carry none: their official preset's, else their size."""
    preset = preset_for(cfg.z_dim, cfg.dim)
    if preset and PRESETS[preset[0]].dim_mult == cfg.dim_mult:
        return preset[0]
    return f"ivvae_z{cfg.z_dim}_dim{cfg.dim}"


def save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, but with ``FILE_MODE`` (0644) like every file ivvae
    writes: safetensors creates its files 0600, which another user, a Triton container or a
    serving pod cannot read."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    os.chmod(path, FILE_MODE)


def save_safetensors(model: IVVAE, path: str | os.PathLike[str],
                     extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write the model under official names with its config as metadata."""
    meta = model.cfg.to_metadata()
    meta["model_name"] = getattr(model, "name", default_name(model.cfg))
    meta.update(extra_metadata or {})
    sd = {k: v.cpu().contiguous() for k, v in official_state_dict(model).items()}
    save_tensors(sd, path, meta)
