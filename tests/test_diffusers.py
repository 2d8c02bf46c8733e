"""ivvae.diffusers: the diffusers autoencoder surface over IVVAE, with and without diffusers."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from ivvae.diffusers import HAVE_DIFFUSERS, DiagonalGaussian, IVVAEAutoencoder
from tests.model.conftest import TINY, make_model, rand_video


@pytest.fixture(scope="module")
def vae() -> IVVAEAutoencoder:
    return IVVAEAutoencoder.from_ivvae(make_model())


def test_built_on_diffusers_when_installed() -> None:
    pytest.importorskip("diffusers")
    from diffusers import ConfigMixin, ModelMixin

    assert HAVE_DIFFUSERS
    assert issubclass(IVVAEAutoencoder, ModelMixin)
    assert issubclass(IVVAEAutoencoder, ConfigMixin)


def test_config(vae: IVVAEAutoencoder) -> None:
    c = vae.config
    assert (c.scaling_factor, c.shift_factor) == (TINY.scale_factor, TINY.shift_factor)
    assert c.latent_channels == TINY.z_dim
    assert (c.temporal_compression_ratio, c.spatial_compression_ratio) == (4, 8)
    with pytest.raises(ValueError, match="latent_channels"):
        IVVAEAutoencoder(z_dim=4, dim=4, latent_channels=8)


def test_integer_tensors_are_refused(vae: IVVAEAutoencoder) -> None:
    # uint8 frames would be encoded as if [0, 255] were [-1, 1]; an int latent gave an
    # int .sample
    with pytest.raises(ValueError, match=r"float in \[-1, 1\], got torch\.uint8"):
        vae.encode(torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"float tensor, got torch\.int64"):
        vae.decode(torch.zeros(1, TINY.z_dim, 1, 1, 1, dtype=torch.int64))


def test_mode_is_the_posterior_mean_and_decode_inverts_the_scaling(
        vae: IVVAEAutoencoder) -> None:
    model = make_model()
    x = rand_video(5, 8, 16)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mu, logvar = model.encode_moments(x)
        torch.testing.assert_close(dist.mode(), mu, rtol=0, atol=0)
        torch.testing.assert_close(dist.logvar, logvar, rtol=0, atol=0)
        torch.testing.assert_close(dist.std, torch.exp(0.5 * logvar))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        torch.testing.assert_close(dist.sample(g1), dist.sample(g2))
        assert dist.kl().shape == (1,) and bool(dist.kl() > 0)
        video = vae.decode(mu).sample
        expected = model.decode(TINY.scale_factor * (mu - TINY.shift_factor))
        torch.testing.assert_close(video, expected, rtol=1e-5, atol=1e-5)
        assert video.shape == (1, 3, 5, 8, 16)
        assert vae.decode(mu, num_frames=4, height=7, width=13).sample.shape == (
            1, 3, 4, 7, 13)
        assert vae(x).sample.shape == x.shape
        (only,) = vae.decode(mu, return_dict=False)
        torch.testing.assert_close(only, video)


def test_slicing_equals_the_whole_batch(vae: IVVAEAutoencoder) -> None:
    x = rand_video(5, 8, 8, b=2, seed=1)
    with torch.no_grad():
        whole = vae.encode(x).latent_dist.mode()
        vae.enable_slicing()
        try:
            sliced = vae.encode(x).latent_dist.mode()
            video = vae.decode(sliced).sample
        finally:
            vae.disable_slicing()
        torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(video, vae.decode(whole).sample, rtol=1e-4, atol=1e-4)


def test_save_and_load_pretrained(vae: IVVAEAutoencoder, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "vae")
    assert {p.name for p in (tmp_path / "vae").iterdir()} >= {
        "config.json", "diffusion_pytorch_model.safetensors"}
    again = IVVAEAutoencoder.from_pretrained(tmp_path / "vae")
    keys = ("z_dim", "dim", "num_res_blocks", "scaling_factor", "shift_factor",
            "latent_channels", "temporal_compression_ratio", "spatial_compression_ratio")
    assert [getattr(again.config, k) for k in keys] == [getattr(vae.config, k) for k in keys]
    assert tuple(again.config.dim_mult) == tuple(vae.config.dim_mult)
    for (k, a), (_, b) in zip(vae.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = rand_video(5, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x).latent_dist.mode(),
                                   vae.encode(x).latent_dist.mode(), rtol=0, atol=0)


def test_dtype_moves(vae: IVVAEAutoencoder) -> None:
    half = IVVAEAutoencoder.from_ivvae(make_model()).to(dtype=torch.bfloat16)
    x = rand_video(1, 8, 8).to(torch.bfloat16)
    with torch.no_grad():
        out = half.encode(x).latent_dist.mode()
        assert out.dtype == torch.bfloat16
        assert half.decode(out).sample.dtype == torch.bfloat16


def test_toy_latent_diffusion_training_loop() -> None:
    """A few steps of a loop written the way diffusers' train_text_to_image.py writes it."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = IVVAEAutoencoder.from_ivvae(make_model())
    vae.requires_grad_(False)
    z = vae.config.latent_channels
    unet = nn.Sequential(nn.Conv3d(z + 1, 16, 3, padding=1), nn.SiLU(),
                         nn.Conv3d(16, z, 3, padding=1))
    noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in unet.parameters()]
    losses = []
    for step in range(4):
        pixel_values = rand_video(5, 8, 8, b=2, seed=step)
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],)).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        t_channel = (timesteps.float() / 100).view(-1, 1, 1, 1, 1).expand(
            -1, 1, *latents.shape[2:])
        model_pred = unet(torch.cat([noisy_latents, t_channel], dim=1))
        loss = nn.functional.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))
    assert all(p.grad is None for p in vae.parameters())
    # Decoding what the "sampler" produced.
    with torch.no_grad():
        video = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert video.shape == (2, 3, 5, 8, 8)


def _without_diffusers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """ivvae.diffusers imported as if diffusers were not installed."""
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    spec = importlib.util.find_spec("ivvae.diffusers")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_diffusers_the_same_surface(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    plain = _without_diffusers(monkeypatch)
    assert not plain.HAVE_DIFFUSERS
    vae = plain.IVVAEAutoencoder.from_ivvae(make_model())
    assert vae.config.scaling_factor == TINY.scale_factor and vae.config.latent_channels == 4
    x = rand_video(1, 8, 8)
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(mu, make_model().encode_moments(x)[0], rtol=0, atol=0)
        assert vae.decode(mu).sample.shape == (1, 3, 1, 8, 8)
    # The config reads as diffusers' FrozenDict does (it was a SimpleNamespace).
    assert vae.config["scaling_factor"] == vae.config.scaling_factor
    assert vae.config.get("shift_factor") == TINY.shift_factor
    assert vae.config.get("no_such_key", 7) == 7
    fresh = plain.IVVAEAutoencoder.from_config(vae.config)
    assert dict(fresh.config) == dict(vae.config)
    vae.save_pretrained(tmp_path / "plain" / "vae", safe_serialization=True)
    again = plain.IVVAEAutoencoder.from_pretrained(tmp_path / "plain", subfolder="vae")
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x).latent_dist.mode(), mu, rtol=0, atol=0)
    from ivvae.model.checkpoint import official_state_dict, weights_sha256

    assert again.model.weights_sha256 == weights_sha256(official_state_dict(make_model()))
    assert again.model.name == "ivvae_z4_dim4"  # unnamed: named by its size, as a file is
    with pytest.raises(OSError, match=r"holds no config\.json"):
        plain.IVVAEAutoencoder.from_pretrained(tmp_path / "nothing")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # for diffusers below
        shutil.copy(tmp_path / "plain" / "vae" / name, tmp_path / "plain" / name)
    monkeypatch.delitem(sys.modules, "diffusers")
    if HAVE_DIFFUSERS:  # a folder written without diffusers loads with it
        loaded = IVVAEAutoencoder.from_pretrained(tmp_path / "plain")
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x).latent_dist.mode(), mu, rtol=0, atol=0)


def test_the_rest_of_diffusers_autoencoder_surface(vae: IVVAEAutoencoder) -> None:
    """What pipelines and training scripts call besides encode/decode: tiling, a generator
    passed to decode, one generator per batch item, the posterior's parameters."""
    x = rand_video(9, 16, 16).repeat(2, 1, 1, 1, 1)
    x[1] = -x[1]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        whole = vae.decode(dist.mode()).sample
        vae.enable_tiling(tile_sample_min_height=256)  # diffusers' keywords are accepted
        try:
            assert vae.use_tiling
            tiled = vae.encode(x).latent_dist
            torch.testing.assert_close(tiled.mode(), dist.mode(), rtol=0, atol=2e-5)
            torch.testing.assert_close(vae.decode(dist.mode(), generator=torch.Generator()
                                                  ).sample, whole, rtol=0, atol=2e-5)
        finally:
            vae.disable_tiling()
        assert not dist.deterministic
        torch.testing.assert_close(dist.parameters, torch.cat([dist.mean, dist.logvar], 1))
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        both = dist.sample(generator=gens)
        for i, seed in enumerate((1, 2)):  # item i drew from generator i alone
            one = DiagonalGaussian(dist.mean[i : i + 1], dist.logvar[i : i + 1])
            torch.testing.assert_close(
                both[i : i + 1], one.sample(torch.Generator().manual_seed(seed)))
        with pytest.raises(ValueError, match="3 generators for a batch of 2"):
            dist.sample(generator=[torch.Generator()] * 3)
        assert dist.nll(dist.mean, dims=[1, 2, 3, 4]).shape == (2,)
    if HAVE_DIFFUSERS:
        # diffusers' loggers have a handler of their own and do not propagate: listen there.
        import logging

        heard: list[str] = []
        listener = logging.Handler()
        listener.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("diffusers").addHandler(listener)
        try:
            IVVAEAutoencoder.from_ivvae(make_model().to(torch.bfloat16))
            assert not [m for m in heard if "kept in float32" in m]  # it has no such modules
            vae.to(dtype=torch.float32)  # diffusers' own .to says it: the listener hears it
            assert [m for m in heard if "kept in float32" in m]
        finally:
            logging.getLogger("diffusers").removeHandler(listener)


def test_non_finite_and_empty_inputs_are_refused(vae: IVVAEAutoencoder) -> None:
    # NaN/inf came back as an all-NaN latent or video; a batch of 0 was a ZeroDivisionError
    # and 0 latent frames "a video needs at least one frame, got -3".
    x = rand_video(5, 8, 8)
    x[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="the video holds NaN or infinite values"):
        vae.encode(x)
    z = torch.zeros(1, TINY.z_dim, 2, 1, 1)
    z[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="the latent holds NaN or infinite values"):
        vae.decode(z)
    with pytest.raises(ValueError, match="batch size 0"):
        vae.decode(torch.zeros(0, TINY.z_dim, 2, 1, 1))
    with pytest.raises(ValueError, match="no latent frames"):
        vae.decode(torch.zeros(1, TINY.z_dim, 2, 1, 1)[:, :, :0])


def _rewrite_weights(folder: Path, *, drop: str = "",
                     add: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors.pop(drop, None)
    tensors.update(add or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_from_pretrained_refuses_a_folder_that_lacks_or_adds_a_weight(
        vae: IVVAEAutoencoder, tmp_path: Path) -> None:
    # diffusers (low_cpu_mem_usage=False, as without accelerate) left a missing tensor
    # randomly initialised with only a log line, and dropped an unexpected one.
    pytest.importorskip("diffusers")
    from ivvae.model import CheckpointError

    missing, extra = tmp_path / "missing", tmp_path / "extra"
    vae.save_pretrained(missing)
    vae.save_pretrained(extra)
    name = "model.decoder.head.conv_3d.weight"
    assert name in vae.state_dict()
    _rewrite_weights(missing, drop=name)
    _rewrite_weights(extra, add={"model.stray.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): {re.escape(name)}"):
        IVVAEAutoencoder.from_pretrained(missing)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): model\.stray\.weight"):
        IVVAEAutoencoder.from_pretrained(extra)
    # diffusers refuses a mis-shaped tensor itself, unless told to ignore it: then it too
    # was left random
    shaped = tmp_path / "shaped"
    vae.save_pretrained(shaped)
    _rewrite_weights(shaped, add={"model.decoder.head.conv_3d.bias": torch.ones(5)})
    with pytest.raises(CheckpointError, match=(
            r"1 mis-shaped key\(s\): model\.decoder\.head\.conv_3d\.bias: "
            r"file \(5,\) != model \(3,\)")):
        IVVAEAutoencoder.from_pretrained(shaped, ignore_mismatched_sizes=True)
    # What diffusers returns when asked for the loading info, and only then.
    vae.save_pretrained(tmp_path / "whole")
    model, info = IVVAEAutoencoder.from_pretrained(tmp_path / "whole", output_loading_info=True)
    assert isinstance(model, IVVAEAutoencoder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(IVVAEAutoencoder.from_pretrained(tmp_path / "whole"), IVVAEAutoencoder)


def test_a_saved_folder_keeps_its_name_and_hash_and_can_be_served(tmp_path: Path) -> None:
    """from_pretrained gave a model with no name and no weights hash, and IVVAE_WEIGHTS
    (or --weights) refused the folder: a model fine-tuned through diffusers had no way
    back to the service, and its latents no identity."""
    from ivvae.model.checkpoint import official_state_dict, weights_sha256
    from ivvae.weights import load_weights

    model = make_model()
    model.name, model.weights_sha256 = "tiny_finetuned", "0" * 64
    vae = IVVAEAutoencoder.from_ivvae(model)
    vae.save_pretrained(tmp_path / "vae")
    again = IVVAEAutoencoder.from_pretrained(tmp_path / "vae")
    content = weights_sha256(official_state_dict(model))
    assert (again.model.name, again.model.weights_sha256) == ("tiny_finetuned", content)
    served, info = load_weights(tmp_path / "vae")  # as IVVAE_WEIGHTS=folder loads it
    assert (info.name, info.weights_sha256) == ("tiny_finetuned", content)
    # Loaded in another dtype, it is still the file the service serves.
    half = IVVAEAutoencoder.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16,
                                            subfolder=None)
    assert (half.model.name, half.model.weights_sha256) == ("tiny_finetuned", content)
    assert (info.scale_factor, info.shift_factor) == (TINY.scale_factor, TINY.shift_factor)
    x = rand_video(5, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(served.encode_moments(x)[0],
                                   again.encode(x).latent_dist.mode(), rtol=0, atol=0)
    # A folder whose weights are not its config's is refused naming them.
    IVVAEAutoencoder(z_dim=4, dim=8).save_pretrained(tmp_path / "other")
    (tmp_path / "vae" / "config.json").write_text(
        (tmp_path / "other" / "config.json").read_text())
    from ivvae.model import CheckpointError

    with pytest.raises(CheckpointError, match="does not hold the weights its config"):
        load_weights(tmp_path / "vae")
