"""ivvae.wire: raw tensor bodies, bare latents and decode targets, including bad input."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from ivvae.errors import InvalidInput, InvalidLatent
from ivvae.safetensors_io import Tensor, dumps, float32_to_bf16_bits
from ivvae.wire import (
    DecodeTarget,
    is_ivvae_latent_file,
    parse_shape,
    parse_wire_dtype,
    raw_tensor_body,
    read_bare_latent,
    read_raw_tensor,
    tensor_to_float32,
)


def test_shape_spellings() -> None:
    assert parse_shape(["1", "16", "5"]) == (1, 16, 5)
    assert parse_shape(["1,16,5"]) == (1, 16, 5)
    assert parse_shape(["[1, 16, 5]"]) == (1, 16, 5)
    for bad in ([], ["0,1"], ["1,x"], ["[1, 2"], ["1,2,3,4,5,6"], ['{"a": 1}'], ["-1"]):
        with pytest.raises(InvalidInput, match="'shape'"):
            parse_shape(bad)


def test_dtype_names() -> None:
    assert parse_wire_dtype("torch.bfloat16") == "bfloat16"
    with pytest.raises(InvalidInput, match="'dtype'"):
        parse_wire_dtype("float64")
    with pytest.raises(InvalidInput, match="'dtype'"):
        parse_wire_dtype("uint8", allowed=("float32",))


def test_raw_tensor_round_trip() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    body, headers = raw_tensor_body(x)
    assert headers == {"shape": "[2, 3, 4]", "dtype": "float32"}
    t = read_raw_tensor(body, parse_shape([headers["shape"]]), headers["dtype"])
    np.testing.assert_array_equal(tensor_to_float32(t), x)
    bf = Tensor("BF16", float32_to_bf16_bits(x))
    body, headers = raw_tensor_body(bf)
    assert headers["dtype"] == "bfloat16"
    np.testing.assert_array_equal(tensor_to_float32(read_raw_tensor(body, (2, 3, 4),
                                                                    "bfloat16")), x)
    with pytest.raises(InvalidInput, match="the body has 95 bytes"):
        read_raw_tensor(bytes(95), (2, 3, 4), "float32")
    with pytest.raises(InvalidInput, match="over the limit"):
        read_raw_tensor(bytes(96), (2, 3, 4), "float32", max_bytes=64)


def test_bare_latents() -> None:
    z = np.random.default_rng(0).standard_normal((4, 2, 3, 5)).astype(np.float32)
    latent, dtype = read_bare_latent(dumps({"latent": z}))
    assert dtype == "float32" and latent.shape == (1, 4, 2, 3, 5)
    np.testing.assert_array_equal(latent[0], z)
    latent, dtype = read_bare_latent(dumps({"latent": Tensor("BF16", float32_to_bf16_bits(
        np.stack([z, z])))}))
    assert dtype == "bfloat16" and latent.shape == (2, 4, 2, 3, 5)
    assert not is_ivvae_latent_file(dumps({"latent": z}))
    assert is_ivvae_latent_file(dumps({"latent": z}, {"format": "ivvae.latent"}))
    bad_cases = [
        (b"not safetensors", "not a readable"),
        (dumps({"latent": z, "mu": z}), "exactly one tensor"),
        (dumps({"x": z}), "exactly one tensor"),
        (dumps({"latent": z[0]}), r"\(B, z, t, h, w\)"),
        (dumps({"latent": z.astype(np.float64)}), "not float32"),
        (dumps({"latent": np.full_like(z, np.nan)}), "non-finite"),
    ]
    for data, message in bad_cases:
        with pytest.raises(InvalidLatent, match=message):
            read_bare_latent(data)


def test_decode_target() -> None:
    t = DecodeTarget.parse({"fps": "30000/1001", "num_frames": "9", "model": "m"})
    assert t.fps == Fraction(30000, 1001) and t.num_frames == 9 and t.model == "m"
    z = np.ones((1, 2, 1, 1, 1), np.float32)
    assert DecodeTarget().to_model_space(z, 0.5, 0.1) is z
    raw = DecodeTarget.parse({"latent_space": "raw"}).to_model_space(z, 0.5, 0.1)
    np.testing.assert_allclose(raw, 0.5 * (1 - 0.1))
    hf = DecodeTarget.parse({"scaling_factor": "2", "shift_factor": "0.25"})
    np.testing.assert_allclose(hf.to_model_space(z, 0.5, 0.1), 0.5 * (1 / 2 + 0.25 - 0.1))
    assert DecodeTarget.parse({"do_scaling": "False"}).latent_space == "raw"
    assert DecodeTarget.parse({"do_scaling": "True"}).latent_space == "scaled"
    assert DecodeTarget.parse({"output_type": "pt"}, other_keys={"output_type"}) == (
        DecodeTarget())
    for params, named in [({"fps": "0"}, "'fps'"), ({"num_frames": "x"}, "'num_frames'"),
                          ({"fps": "-1"}, r"'fps' must be in \[1/1001, 1000\]"),
                          ({"latent_space": "weird"}, "'latent_space'"),
                          ({"latent_space": "raw", "scaling_factor": "2"}, "contradict"),
                          ({"scaling_factor": "0"}, "'scaling_factor'"),
                          ({"shift_factor": "nan"}, "'shift_factor'"),
                          ({"do_scaling": "maybe"}, "'do_scaling'"),
                          ({"heigth": "8"}, "'heigth'")]:
        with pytest.raises(InvalidInput, match=named):
            DecodeTarget.parse(params)
