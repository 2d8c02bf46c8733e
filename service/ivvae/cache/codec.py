"""What a result-cache entry holds, its key, its byte format, and what a read must check.

An entry is the posterior of one encoded video: ``mu`` and ``logvar``, each
``(1, z, n, h, w)`` float32 (``n = 1 + (T-1)/4``, ``h = H/8``, ``w = W/8``), plus the video
facts the response needs (``meta``, str -> str).

Blob layout (all integers little-endian)::

    offset  size  field
    0       8     MAGIC  b"IVVAEMC2"
    8       32    HMAC-SHA256 under the deployment's secret of (the key, the payload)
    40      4     uint32 header length L
    44      L     UTF-8 JSON header: {"arrays": [{"name", "dtype", "shape"}, ...], "meta": {...}}
    44+L    ...   the arrays' raw bytes, in header order (mu, then logvar), no padding

The MAC is what makes a stored entry trustworthy. A cache is shared, long-lived storage: a
flipped or truncated value must read as a miss, never as wrong latents, and so must a value
written by anyone who can reach Redis but does not hold the secret (a plain checksum they
can recompute). The key is inside the MAC, so a genuine entry copied under another video's
key is refused too. ``MAGIC`` changed from ``IVVAEMC1`` (unkeyed sha256) when the MAC came;
old entries read as corrupt and are replaced.

A MAC says who wrote an entry, not that the writer was right: :class:`Expected` checks a
decoded entry against what the request needs (latent channels, sizes that agree with the
recorded video size, values in the range an encoder produces) before it is served.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from ..core import strict
from ..core.geometry import latent_frames, latent_size

MAGIC = b"IVVAEMC2"
DIGEST_BYTES = 32
# A shorter secret is guessable; HMAC-SHA256 gains nothing past its block size.
MIN_SECRET_BYTES = 16
_HEADER_LEN = struct.Struct("<I")
PREAMBLE_BYTES = len(MAGIC) + DIGEST_BYTES + _HEADER_LEN.size
# A header holds two shapes and a few video facts; anything bigger is not ours.
MAX_HEADER_BYTES = 1 << 20
ARRAY_NAMES = ("mu", "logvar")
WIRE_DTYPE = "<f4"
LATENT_NDIM = 5
# Far outside anything an encoder produces (diffusion latents are scaled to unit variance;
# exp(logvar / 2) must stay finite in float32 when sampling), so a bound crossed means the
# entry is not an encoder's output. Subtle forgeries are the MAC's job, not these bounds'.
MAX_ABS_LATENT = 1.0e3
LOGVAR_RANGE = (-80.0, 80.0)
# meta keys every entry the pipeline writes holds; their values must agree with the shape.
SIZE_KEYS = ("num_frames", "height", "width")


class CorruptEntry(ValueError):
    """A cached blob that is not a complete, valid entry written by :func:`serialize`."""


@dataclass(frozen=True, eq=False)
class CachedMoments:
    """The cached posterior of one video.

    ``mu``, ``logvar``: ``(1, z, n, h, w)`` float32, C-contiguous, native byte order (arrays
    of another float32 layout are copied into that one). ``meta``: video facts as str -> str,
    held read-only. Construction checks structure only; finiteness is checked when the
    entry is serialized or deserialized.
    """

    mu: np.ndarray
    logvar: np.ndarray
    meta: Mapping[str, str]

    def __post_init__(self) -> None:
        shapes = []
        for name in ARRAY_NAMES:
            array = getattr(self, name)
            if not isinstance(array, np.ndarray):
                raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
            if array.dtype.kind != "f" or array.dtype.itemsize != 4:
                raise ValueError(f"{name} must be float32, got {array.dtype}")
            if array.ndim != LATENT_NDIM or array.shape[0] != 1 or 0 in array.shape:
                raise ValueError(f"{name} must be (1, z, n, h, w), non-empty, got {array.shape}")
            # Frozen dataclass: normalizing a field needs object.__setattr__.
            object.__setattr__(self, name, np.ascontiguousarray(array, dtype=np.float32))
            shapes.append(array.shape)
        if shapes[0] != shapes[1]:
            raise ValueError(f"mu {shapes[0]} and logvar {shapes[1]} differ in shape")
        meta = dict(self.meta)
        for key, value in meta.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"meta must map str to str, got {key!r}: {value!r}")
        object.__setattr__(self, "meta", MappingProxyType(meta))

    @property
    def nbytes(self) -> int:
        """Bytes of array data; a lower bound of the serialized size."""
        return int(self.mu.nbytes + self.logvar.nbytes)


def cache_key(*parts: str) -> str:
    """sha256 hex of ``parts``, each prefixed by its UTF-8 length, so no two distinct tuples
    collide by shifting a boundary: ``("ab", "c")`` and ``("a", "bc")`` differ."""
    digest = hashlib.sha256()
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"cache_key parts must be str, got {type(part).__name__}")
        data = part.encode("utf-8")
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def check_secret(secret: bytes) -> bytes:
    """``secret`` when it can key the MAC; ``ValueError`` (a configuration error) if not."""
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the cache secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _mac(secret: bytes, key: str, parts: list[bytes | memoryview]) -> bytes:
    # "sha256" by name: hmac then runs in OpenSSL, which releases the GIL on big entries.
    mac = hmac.new(secret, digestmod="sha256")
    key_bytes = key.encode("utf-8")
    # Length-prefixed: no (key, payload) pair can pose as another by moving the boundary.
    mac.update(struct.pack("<Q", len(key_bytes)))
    mac.update(key_bytes)
    for part in parts:
        mac.update(part)
    return mac.digest()


def serialize(value: CachedMoments, *, secret: bytes, key: str) -> bytes:
    """Encode ``value`` as one blob sealed for ``key`` under ``secret`` (layout above).

    Raises ``ValueError`` when an array holds NaN or inf: such an entry is never stored.
    """
    check_secret(secret)
    arrays = [getattr(value, name) for name in ARRAY_NAMES]
    for name, array in zip(ARRAY_NAMES, arrays, strict=True):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} holds non-finite values")
    header = {
        "arrays": [
            {"name": name, "dtype": WIRE_DTYPE, "shape": list(array.shape)}
            for name, array in zip(ARRAY_NAMES, arrays, strict=True)
        ],
        "meta": dict(value.meta),
    }
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    # memoryviews of the (already C-contiguous) little-endian arrays: the join is the only copy.
    parts: list[bytes | memoryview] = [_HEADER_LEN.pack(len(header_bytes)), header_bytes]
    parts += [np.ascontiguousarray(a, dtype=WIRE_DTYPE).data.cast("B") for a in arrays]
    return b"".join([MAGIC, _mac(secret, key, parts), *parts])


def deserialize(blob: bytes | bytearray | memoryview, *, secret: bytes, key: str,
                expected: Expected | None = None) -> CachedMoments:
    """Decode a blob that :func:`serialize` sealed for ``key`` under ``secret``, and check
    it against ``expected`` when given.

    Returns fresh, writable arrays (they share no memory with ``blob``). Raises
    :class:`CorruptEntry` on any problem; never returns a partly valid entry (and
    ``ValueError`` for a ``secret`` that :func:`check_secret` refuses).
    """
    check_secret(secret)
    try:
        value = _deserialize(blob, secret, key)
        if expected is not None:
            expected.check(value)
        return value
    except CorruptEntry:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise CorruptEntry(f"undecodable entry: {exc}") from exc


def _deserialize(blob: bytes | bytearray | memoryview, secret: bytes, key: str
                 ) -> CachedMoments:
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CorruptEntry(f"entry is {type(blob).__name__}, not bytes")
    view = memoryview(blob).cast("B")
    if len(view) < PREAMBLE_BYTES:
        raise CorruptEntry(f"truncated: {len(view)} bytes")
    if view[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("bad magic")
    payload = view[len(MAGIC) + DIGEST_BYTES :]
    stored_mac = bytes(view[len(MAGIC) : len(MAGIC) + DIGEST_BYTES])
    if not hmac.compare_digest(_mac(secret, key, [payload]), stored_mac):
        raise CorruptEntry("MAC mismatch: not written for this key under this deployment's "
                           "secret (tampered with, or written by a gateway with another "
                           "IVVAE_CACHE_SECRET: every gateway on one Redis needs the same)")

    (header_len,) = _HEADER_LEN.unpack_from(payload)
    data_start = _HEADER_LEN.size + header_len
    if header_len > MAX_HEADER_BYTES or data_start > len(payload):
        raise CorruptEntry(f"header length {header_len} does not fit the entry")
    header = json.loads(bytes(payload[_HEADER_LEN.size : data_start]).decode("utf-8"))
    shape, meta = _check_header(header)

    count = 1
    for dim in shape:
        count *= dim
    itemsize = np.dtype(WIRE_DTYPE).itemsize
    if len(payload) - data_start != len(ARRAY_NAMES) * count * itemsize:
        raise CorruptEntry(
            f"{len(payload) - data_start} data bytes for two {WIRE_DTYPE} arrays of {shape}"
        )
    arrays = []
    for index, name in enumerate(ARRAY_NAMES):
        offset = data_start + index * count * itemsize
        wire = np.frombuffer(payload, dtype=WIRE_DTYPE, count=count, offset=offset)
        # astype copies into native order: the result owns its memory and is writable.
        array = wire.reshape(shape).astype(np.float32)
        if not np.isfinite(array).all():
            raise CorruptEntry(f"{name} holds non-finite values")
        arrays.append(array)
    return CachedMoments(mu=arrays[0], logvar=arrays[1], meta=meta)


def _check_header(header: Any) -> tuple[tuple[int, ...], dict[str, str]]:
    """The common array shape and the meta of a parsed header, or CorruptEntry."""
    if not isinstance(header, dict) or set(header) != {"arrays", "meta"}:
        raise CorruptEntry("header is not {arrays, meta}")
    specs, meta = header["arrays"], header["meta"]
    if not isinstance(specs, list) or len(specs) != len(ARRAY_NAMES):
        raise CorruptEntry("header must describe exactly mu and logvar")
    shapes = []
    for spec, name in zip(specs, ARRAY_NAMES, strict=True):
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise CorruptEntry(f"bad array spec {spec!r}")
        if spec["name"] != name or spec["dtype"] != WIRE_DTYPE:
            raise CorruptEntry(f"expected {name} as {WIRE_DTYPE}, got {spec!r}")
        shape = spec["shape"]
        # `type(...) is int`: JSON true/false parse to bool, a subclass of int.
        if (
            not isinstance(shape, list)
            or len(shape) != LATENT_NDIM
            or not all(type(dim) is int and dim >= 1 for dim in shape)
            or shape[0] != 1
        ):
            raise CorruptEntry(f"bad shape {shape!r} for {name}")
        shapes.append(tuple(shape))
    if shapes[0] != shapes[1]:
        raise CorruptEntry(f"mu {shapes[0]} and logvar {shapes[1]} differ in shape")
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CorruptEntry("meta must map str to str")
    return shapes[0], meta


@dataclass(frozen=True)
class Expected:
    """What a request needs of a cached entry: the model's latent channels and latent
    scaling. :meth:`check` raises :class:`CorruptEntry` when the entry does not fit."""

    z_dim: int
    scale_factor: float = 1.0
    shift_factor: float = 0.0

    def check(self, value: CachedMoments) -> None:
        shape = value.mu.shape
        if shape[1] != self.z_dim:
            raise CorruptEntry(f"entry has {shape[1]} latent channels; the model has {self.z_dim}")
        try:
            sizes = [strict.count(value.meta.get(k, ""), minimum=1) for k in SIZE_KEYS]
            strict.frame_rate(value.meta.get("fps", ""))
        except ValueError as exc:
            raise CorruptEntry(f"entry meta is not a video's: {exc}") from exc
        frames, height, width = sizes
        want = (latent_frames(frames), latent_size(height), latent_size(width))
        if tuple(shape[2:]) != want:
            raise CorruptEntry(f"entry shape {shape} does not match its {frames}-frame "
                               f"{width}x{height} video (latent {want})")
        # The pipeline serves scale * (mu - shift): bound what it would serve.
        peak = float(np.abs(value.mu - self.shift_factor).max()) * abs(self.scale_factor)
        if not peak <= MAX_ABS_LATENT:
            raise CorruptEntry(f"entry latent reaches {peak:.3g}, beyond {MAX_ABS_LATENT:g}")
        low, high = LOGVAR_RANGE
        if not (low <= float(value.logvar.min()) and float(value.logvar.max()) <= high):
            raise CorruptEntry(f"entry logvar leaves [{low:g}, {high:g}]")
