"""ivvae.cache.codec: entry validation, the blob format, corruption detection, cache keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any

import numpy as np
import pytest

from ivvae.cache import CachedMoments, CorruptEntry, Expected, cache_key, deserialize
from ivvae.cache.codec import MAGIC, MAX_HEADER_BYTES, PREAMBLE_BYTES
from tests.cache.helpers import KEY, SECRET, SMALL_SHAPE, assert_same, moments, seal, unseal

# -- CachedMoments -----------------------------------------------------------------------------


def test_moments_normalize_layout_and_freeze_meta() -> None:
    rng = np.random.default_rng(1)
    # A transposed (non-contiguous) big-endian view: still float32, so accepted and normalized.
    base = rng.standard_normal((1, 5, 3, 2, 4), dtype=np.float32).astype(">f4")
    mu = base.transpose(0, 1, 2, 4, 3)
    meta = {"fps": "25"}
    value = CachedMoments(mu=mu, logvar=np.zeros(mu.shape, np.float32), meta=meta)
    assert value.mu.flags.c_contiguous and value.mu.dtype == np.dtype(np.float32)
    assert np.array_equal(value.mu, mu)
    meta["fps"] = "changed"  # the entry holds its own copy...
    assert value.meta["fps"] == "25"
    with pytest.raises(TypeError):
        value.meta["fps"] = "x"  # type: ignore[index]  # ...read-only


@pytest.mark.parametrize(
    ("mu", "logvar", "meta"),
    [
        (np.zeros((1, 2, 1, 2, 2), np.float64), np.zeros((1, 2, 1, 2, 2), np.float32), {}),
        (np.zeros((1, 2, 1, 2, 2), np.float16), np.zeros((1, 2, 1, 2, 2), np.float32), {}),
        (np.zeros((2, 1, 2, 2), np.float32), np.zeros((2, 1, 2, 2), np.float32), {}),
        (np.zeros((2, 2, 1, 2, 2), np.float32), np.zeros((2, 2, 1, 2, 2), np.float32), {}),
        (np.zeros((1, 2, 0, 2, 2), np.float32), np.zeros((1, 2, 0, 2, 2), np.float32), {}),
        (np.zeros((1, 2, 1, 2, 2), np.float32), np.zeros((1, 2, 2, 2, 2), np.float32), {}),
        ([[0.0]], np.zeros((1, 2, 1, 2, 2), np.float32), {}),
        (np.zeros((1, 2, 1, 2, 2), np.float32), np.zeros((1, 2, 1, 2, 2), np.float32), {"n": 3}),
    ],
    ids=["float64", "float16", "4d", "batch2", "empty", "shape-mismatch", "list", "meta-int"],
)
def test_moments_reject_wrong_structure(mu: Any, logvar: Any, meta: Any) -> None:
    with pytest.raises(ValueError):
        CachedMoments(mu=mu, logvar=logvar, meta=meta)


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_is_exact() -> None:
    value = moments(3, (1, 16, 3, 4, 6))
    # Values a lossy or text encoding would mangle.
    extremes = [-0.0, np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal, -1e-38]
    value.mu.reshape(-1)[: len(extremes)] = extremes
    meta = {"num_frames": "9", "title": "Übung 🎬", "": "empty key", "json": '{"a": [1]}'}
    value = CachedMoments(mu=value.mu, logvar=value.logvar, meta=meta)
    blob = seal(value)
    assert blob.startswith(MAGIC)
    assert len(blob) > value.nbytes
    back = unseal(blob)
    assert_same(back, value)
    assert np.signbit(back.mu.reshape(-1)[0])  # -0.0 kept
    for array in (back.mu, back.logvar):
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata
    assert unseal(bytearray(blob)).mu.tobytes() == value.mu.tobytes()


def test_serialize_is_deterministic() -> None:
    assert seal(moments(5)) == seal(moments(5))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_serialize_refuses_non_finite(bad: float) -> None:
    value = moments()
    value.logvar[0, 1, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        seal(value)


# -- corruption --------------------------------------------------------------------------------


def _header_len(blob: bytes) -> int:
    return int(struct.unpack_from("<I", blob, len(MAGIC) + 32)[0])


def _flip(blob: bytes, index: int) -> bytes:
    corrupted = bytearray(blob)
    corrupted[index] ^= 0x01
    return bytes(corrupted)


def test_corrupt_entry_is_a_value_error() -> None:
    assert issubclass(CorruptEntry, ValueError)


def test_a_flipped_bit_anywhere_is_detected() -> None:
    blob = seal(moments())
    header_start = PREAMBLE_BYTES
    data_start = header_start + _header_len(blob)
    regions = {
        "magic": range(0, len(MAGIC)),
        "mac": range(len(MAGIC), len(MAGIC) + 32),
        "header length": range(len(MAGIC) + 32, PREAMBLE_BYTES),
        "header": range(header_start, data_start),
        "arrays": range(data_start, len(blob)),
    }
    for region, indices in regions.items():
        assert len(indices) > 0, region
        # Every byte of the small regions; a sample of the large ones.
        step = max(1, len(indices) // 16)
        for index in [*indices[::step], indices[-1]]:
            with pytest.raises(CorruptEntry):
                unseal(_flip(blob, index))


def test_truncation_is_detected() -> None:
    blob = seal(moments())
    header_end = PREAMBLE_BYTES + _header_len(blob)
    lengths = [0, 1, len(MAGIC) - 1, len(MAGIC), 39, PREAMBLE_BYTES - 1, PREAMBLE_BYTES]
    lengths += [header_end - 1, header_end, header_end + 3, len(blob) // 2, len(blob) - 1]
    for length in lengths:
        with pytest.raises(CorruptEntry):
            unseal(blob[:length])


def test_extra_bytes_are_detected() -> None:
    with pytest.raises(CorruptEntry):
        unseal(seal(moments()) + b"\0")


@pytest.mark.parametrize("length", [0, 1, 8, 44, 100, 4096])
def test_garbage_is_detected(length: int) -> None:
    garbage = np.random.default_rng(length).bytes(length)
    with pytest.raises(CorruptEntry):
        unseal(garbage)
    with pytest.raises(CorruptEntry):
        unseal(MAGIC + garbage)


@pytest.mark.parametrize("blob", ["IVVAEMC1", None, 12, [b"IVVAEMC1"]])
def test_non_bytes_are_corrupt(blob: Any) -> None:
    with pytest.raises(CorruptEntry):
        unseal(blob)


# Blobs with a valid MAC whose content is wrong: what a buggy writer holding the secret
# produces. The MAC cannot catch these, the structural checks must.


def _frame(header: Any, data: bytes, header_len: int | None = None) -> bytes:
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_len is None else header_len
    payload = struct.pack("<I", length) + header_bytes + data
    mac = hmac.new(SECRET, struct.pack("<Q", len(KEY)) + KEY.encode() + payload, "sha256")
    return MAGIC + mac.digest() + payload


def _header(
    shape: Any = SMALL_SHAPE,
    logvar_shape: Any = None,
    dtype: str = "<f4",
    names: tuple[str, str] = ("mu", "logvar"),
    meta: Any = None,
) -> dict[str, Any]:
    shapes = [shape, shape if logvar_shape is None else logvar_shape]
    return {
        "arrays": [
            {"name": name, "dtype": dtype, "shape": list(s) if isinstance(s, tuple) else s}
            for name, s in zip(names, shapes, strict=True)
        ],
        "meta": {"fps": "30"} if meta is None else meta,
    }


def _data(shape: tuple[int, ...] = SMALL_SHAPE, fill: float = 0.5) -> bytes:
    return np.full((2, *shape), fill, dtype="<f4").tobytes()


def test_framed_blob_helper_builds_valid_entries() -> None:
    value = unseal(_frame(_header(), _data()))
    assert value.mu.shape == SMALL_SHAPE and float(value.logvar.max()) == 0.5
    assert dict(value.meta) == {"fps": "30"}


@pytest.mark.parametrize(
    "blob",
    [
        _frame(b"not json", _data()),
        _frame(b"\xff\xfe{}", _data()),
        _frame([1, 2], _data()),
        _frame({"arrays": _header()["arrays"]}, _data()),
        _frame({**_header(), "extra": 1}, _data()),
        _frame(_header(dtype="<f8"), _data()),
        _frame(_header(dtype=">f4"), _data()),
        _frame(_header(names=("logvar", "mu")), _data()),
        _frame(_header(shape=(1, 4, 2, 15)), _data()),
        _frame(_header(shape=[True, 4, 2, 3, 5]), _data()),
        _frame(_header(shape=[1, 4, 2, 3, 5.0]), _data()),
        _frame(_header(shape=(1, 4, 2, 3, -5)), _data()),
        _frame(_header(shape=(2, 2, 2, 3, 5)), _data()),
        _frame(_header(logvar_shape=(1, 4, 2, 5, 3)), _data()),
        _frame({**_header(), "arrays": _header()["arrays"][:1]}, _data()),
        _frame(_header(meta={"fps": 30}), _data()),
        _frame(_header(meta=["fps"]), _data()),
        _frame(_header(), _data()[:-4]),
        _frame(_header(), _data() + b"\0\0\0\0"),
        _frame(_header(), _data(fill=np.nan)),
        _frame(_header(), _data(fill=np.inf)),
        _frame(_header(), _data(), header_len=10_000),
        _frame(_header(), _data(), header_len=MAX_HEADER_BYTES + 1),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "header-list",
        "no-meta",
        "extra-key",
        "float64",
        "big-endian",
        "names-swapped",
        "4d",
        "bool-dim",
        "float-dim",
        "negative-dim",
        "batch-2",
        "shapes-differ",
        "one-array",
        "meta-int",
        "meta-list",
        "short-data",
        "long-data",
        "nan",
        "inf",
        "header-past-end",
        "header-huge",
    ],
)
def test_well_framed_but_invalid_entries_are_corrupt(blob: bytes) -> None:
    with pytest.raises(CorruptEntry):
        unseal(blob)


# -- cache_key ---------------------------------------------------------------------------------


def test_cache_key_is_a_stable_sha256_hex() -> None:
    key = cache_key("0" * 64, "ivvae-base", "f" * 64, "float32", "moments-v1")
    assert key == cache_key("0" * 64, "ivvae-base", "f" * 64, "float32", "moments-v1")
    assert len(key) == 64 and int(key, 16) >= 0


def test_cache_key_is_boundary_and_order_safe() -> None:
    keys = [
        cache_key("ab", "c"),
        cache_key("a", "bc"),
        cache_key("c", "ab"),
        cache_key("abc"),
        cache_key("a", "b", "c"),
        cache_key("ab", "c", ""),
        cache_key("", "ab", "c"),
        cache_key(),
        cache_key(""),
        cache_key("é"),
        cache_key("e\u0301"),
    ]
    assert len(set(keys)) == len(keys)


def test_cache_key_rejects_non_strings() -> None:
    with pytest.raises(TypeError):
        cache_key("a", b"b")  # type: ignore[arg-type]


# -- the MAC: only this deployment writes entries, and only for their own key -----------------


def test_entry_reads_only_under_its_key_and_secret() -> None:
    blob = seal(moments(), key="video-a")
    assert_same(unseal(blob, key="video-a"), moments())
    with pytest.raises(CorruptEntry, match="MAC"):
        unseal(blob, key="video-b")  # a genuine entry copied under another video's key
    with pytest.raises(CorruptEntry, match="MAC"):
        unseal(blob, key="video-a", secret=b"another-deployment-secret")


def test_forged_entry_with_a_valid_plain_sha256_is_corrupt() -> None:
    # What anyone who can write to Redis could build before: the checksum is recomputable.
    forged = bytearray(seal(moments()))
    payload = bytes(forged[PREAMBLE_BYTES - 4 :])
    forged[len(MAGIC) : len(MAGIC) + 32] = hashlib.sha256(payload).digest()
    with pytest.raises(CorruptEntry, match="MAC"):
        unseal(bytes(forged))


@pytest.mark.parametrize("secret", [b"", b"short", "a-text-secret-of-enough-length"])
def test_unusable_secrets_are_a_configuration_error(secret: Any) -> None:
    with pytest.raises(ValueError, match="secret") as info:
        seal(moments(), secret=secret)
    assert not isinstance(info.value, CorruptEntry)
    with pytest.raises(ValueError, match="secret"):
        unseal(b"", secret=secret)


# -- Expected: an entry must fit the request ------------------------------------------------


def _video_moments(mu_fill: float = 0.5, logvar_fill: float = -2.0,
                   **meta: str) -> CachedMoments:
    """A 9-frame 20x12 video's moments, z=4: latent (1, 4, 3, 2, 3)."""
    shape = (1, 4, 3, 2, 3)
    base = {"num_frames": "9", "height": "12", "width": "20", "fps": "30000/1001"}
    return CachedMoments(mu=np.full(shape, mu_fill, np.float32),
                         logvar=np.full(shape, logvar_fill, np.float32), meta={**base, **meta})


def test_expected_accepts_a_fitting_entry() -> None:
    expected = Expected(z_dim=4, scale_factor=0.5, shift_factor=0.1)
    value = _video_moments()
    assert_same(deserialize(seal(value), secret=SECRET, key=KEY, expected=expected), value)


@pytest.mark.parametrize(
    ("value", "z_dim", "match"),
    [
        (_video_moments(), 8, "channels"),
        (_video_moments(num_frames="13"), 4, "does not match"),
        (_video_moments(height="17"), 4, "does not match"),
        (_video_moments(num_frames=" 9 "), 4, "meta"),
        (_video_moments(num_frames="٩"), 4, "meta"),
        (_video_moments(width="2_0"), 4, "meta"),
        (_video_moments(fps="0"), 4, "meta"),
        (_video_moments(fps="1e3"), 4, "meta"),
        (CachedMoments(mu=np.zeros((1, 4, 3, 2, 3), np.float32),
                       logvar=np.zeros((1, 4, 3, 2, 3), np.float32), meta={"fps": "25"}),
         4, "meta"),
        (_video_moments(mu_fill=1e6), 4, "latent reaches"),
        (_video_moments(logvar_fill=200.0), 4, "logvar"),
        (_video_moments(logvar_fill=-1e4), 4, "logvar"),
    ],
    ids=["z", "frames", "height", "spaces", "arabic-digit", "underscore", "fps-0", "fps-exp",
         "no-sizes", "mu-1e6", "logvar-high", "logvar-low"],
)
def test_expected_refuses_entries_that_do_not_fit(value: CachedMoments, z_dim: int,
                                                  match: str) -> None:
    blob = seal(value)  # properly sealed: the writer held the secret, and was wrong
    with pytest.raises(CorruptEntry, match=match):
        deserialize(blob, secret=SECRET, key=KEY, expected=Expected(z_dim=z_dim))
