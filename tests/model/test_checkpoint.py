"""Strict loading of official-layout checkpoints, and the key mapping vs the manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ivvae.model import CheckpointError, IVVAEConfig, load_model, official_state_dict
from ivvae.model.checkpoint import expected_shapes, infer_config, save_safetensors
from ivvae.model.config import PRESETS
from tests.conftest import DATA

from .conftest import TINY, make_model, rand_video

MANIFESTS = json.loads((DATA / "official-state-dict-manifests.json").read_text())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_key_mapping_matches_official_manifest(name: str) -> None:
    manifest = MANIFESTS[name]
    cfg = PRESETS[name]
    shapes = expected_shapes(cfg)
    want = {k: tuple(v) for k, v in manifest["state_dict"].items()}
    assert set(shapes) == set(want), (set(shapes) ^ set(want))
    assert shapes == want
    assert sum(torch.Size(s).numel() for s in shapes.values()) == manifest["num_params"]
    assert len(shapes) == 362


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_is_inferred_from_shapes(name: str) -> None:
    fake = {k: torch.empty(v, device="meta") for k, v in MANIFESTS[name]["state_dict"].items()}
    cfg = infer_config(fake)
    assert cfg == PRESETS[name]  # including the preset's scale/shift factors


def test_loader_accepts_official_pth(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "ivvae_tiny.pth"
    torch.save(official_state_dict(model), path)  # flat dict under official names
    loaded = load_model(path, scale_factor=TINY.scale_factor, shift_factor=TINY.shift_factor)
    video = rand_video(5, 16, 16)
    torch.testing.assert_close(loaded.encode(video), model.encode(video), rtol=0, atol=0)
    assert loaded.cfg == TINY
    assert len(loaded.weights_sha256) == 64


def test_safetensors_round_trip_keeps_factors_and_hash(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model, path)
    loaded = load_model(path)
    assert loaded.cfg == TINY  # factors came from metadata
    pth = tmp_path / "tiny.pth"
    torch.save(official_state_dict(model), pth)
    # the hash is of the weights, not of the file format
    assert load_model(pth).weights_sha256 == loaded.weights_sha256
    other = make_model(seed=1)
    assert load_model(official_state_dict(other)).weights_sha256 != loaded.weights_sha256


def test_truncated_state_dict_names_missing_keys() -> None:
    sd = dict(official_state_dict(make_model()))
    del sd["decoder.head.2.conv_3d.weight"]
    del sd["encoder.downsamples.9.Attention_2d.proj.bias"]
    with pytest.raises(CheckpointError) as info:
        load_model(sd)
    msg = str(info.value)
    assert "2 missing" in msg
    assert "decoder.head.2.conv_3d.weight" in msg
    assert "encoder.downsamples.9.Attention_2d.proj.bias" in msg


def test_renamed_state_dict_names_unexpected_and_missing_keys() -> None:
    sd = dict(official_state_dict(make_model()))
    sd["decoder.head.2.conv3d.weight"] = sd.pop("decoder.head.2.conv_3d.weight")
    with pytest.raises(CheckpointError) as info:
        load_model(sd)
    msg = str(info.value)
    assert "1 missing key(s): decoder.head.2.conv_3d.weight" in msg
    assert "1 unexpected key(s): decoder.head.2.conv3d.weight" in msg


def test_misshaped_tensor_is_named() -> None:
    sd = dict(official_state_dict(make_model()))
    sd["encoder.head.0.gamma"] = torch.ones(3, 1, 1, 1)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*encoder\.head\.0\.gamma"):
        load_model(sd)


def test_garbage_files_are_rejected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(junk)
    st = tmp_path / "junk.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError):
        load_model(st)
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.ones(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="not an IV-VAE checkpoint"):
        load_model(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pth")


def test_pickled_objects_are_not_executed(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        IVVAEConfig(z_dim=3)
    with pytest.raises(ValueError):
        IVVAEConfig(dim_mult=(1, 2, 4))


def test_a_file_that_is_not_tensors_only_is_refused_without_torchs_unsafe_advice(
        tmp_path: Path) -> None:
    import collections

    from ivvae.model.checkpoint import read_weights

    objects = tmp_path / "objects.pth"
    torch.save({"f": print, "d": collections.Counter()}, objects)
    video = tmp_path / "clip.pth"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    for path in (objects, video):
        with pytest.raises(CheckpointError, match="not a torch checkpoint of tensors only") as e:
            read_weights(path)
        assert "weights_only` set to `False" not in str(e.value)
        assert "trust" not in str(e.value)


def test_weights_of_no_official_size_without_factors_are_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The bundled file's tensors saved as a .pth lost its factors without a word.
    from ivvae.model import IVVAE

    model = IVVAE(IVVAEConfig(z_dim=4, dim=4, scale_factor=0.5, shift_factor=0.1))
    with_factors = tmp_path / "m.safetensors"
    save_safetensors(model, with_factors)
    pth = tmp_path / "m.pth"
    torch.save(official_state_dict(model), pth)
    with caplog.at_level("WARNING", logger="ivvae.model.checkpoint"):
        assert load_model(with_factors).cfg.scale_factor == 0.5
        assert not caplog.records
        assert load_model(pth, scale_factor=0.5, shift_factor=0.1).cfg.scale_factor == 0.5
        assert not caplog.records
        assert load_model(pth).cfg.scale_factor == 1.0
    assert "m.pth holds no scale/shift factors" in caplog.text


def test_a_device_this_torch_cannot_use_is_refused_before_the_weights_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Was torch's AssertionError ("Torch not compiled with CUDA enabled") after reading
    # every weight, and for "tpu" a RuntimeError listing every device type torch knows.
    path = tmp_path / "tiny.safetensors"
    save_safetensors(make_model(), path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda': this torch .* sees no CUDA GPU"):
        load_model(path, device="cuda")
    with pytest.raises(ValueError, match=r"device must be cpu, cuda or cuda:N, got 'tpu'"):
        load_model(path, device="tpu")
    # before the weights: a path that is not there is not what it says
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        load_model(tmp_path / "missing.pth", device=torch.device("cuda", 0))
    assert load_model(path, device=torch.device("cpu")).device.type == "cpu"


def test_a_directory_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"is a directory, not a \.pth or \.safetensors"):
        load_model(tmp_path)
