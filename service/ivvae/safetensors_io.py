"""A strict, numpy-only reader and writer of the safetensors format.

Why not ``safetensors.numpy``: the gateway must handle bfloat16 (numpy has no such dtype),
must not need torch, and must parse untrusted uploads defensively (bounded header, nesting
depth and integer length, offsets checked, no overlaps, byte counts matching shapes) with
errors that name the problem.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the tensor bytes. bfloat16 arrays are carried as ``uint16`` bit patterns.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MAX_HEADER_BYTES = 1 << 20
# The format nests three deep ({name: {"shape": [...]}}); deeper is an attack on the parser
# (Python's json recurses), as are integers past any offset a file can have (int() of a
# 5,000-digit number is quadratic, and refused past 4,300 digits).
MAX_DEPTH = 3
MAX_INT_DIGITS = 20
# Any one dimension: past it no real tensor goes, and next to a zero dimension (no bytes to
# check) numpy's reshape refuses (2**62 x 2**62 x 0 is "too big").
MAX_DIM = 2**31 - 1

# safetensors dtype name -> numpy dtype used to hold it
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "BOOL": np.dtype("?"),
}
_NUMPY_TO_ST = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
                np.dtype("u1"): "U8", np.dtype("i1"): "I8", np.dtype("<i2"): "I16",
                np.dtype("<i4"): "I32", np.dtype("<i8"): "I64", np.dtype("<u2"): "U16",
                np.dtype("<u4"): "U32", np.dtype("?"): "BOOL"}


class SafetensorsError(ValueError):
    """The bytes are not a well-formed safetensors file."""


@dataclass(frozen=True)
class Tensor:
    """One stored tensor: its safetensors dtype name and an array holding its bits."""

    dtype: str
    array: np.ndarray  # BF16 as uint16 bit patterns

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def as_float32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return bf16_bits_to_float32(self.array)
        if self.dtype in ("F32", "F16", "F64"):
            return self.array.astype(np.float32)
        raise SafetensorsError(f"tensor of dtype {self.dtype} is not floating point")


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (uint16). NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def header_bytes(entries: Mapping[str, tuple[str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``entries`` (name -> (dtype,
    shape)) stored back to back in name order: what precedes their data. With it a file
    can be written as a stream whose sizes are known before the data is."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(head)) + head


def dumps(tensors: Mapping[str, Tensor | np.ndarray],
          metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize; plain arrays are stored under their own dtype."""
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    blobs = []
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, np.ndarray):
            dt = _NUMPY_TO_ST.get(t.dtype.newbyteorder("<") if t.dtype.byteorder == ">"
                                  else t.dtype)
            if dt is None:
                raise TypeError(f"cannot store numpy dtype {t.dtype}")
            t = Tensor(dt, t)
        entries[name] = (t.dtype, t.shape)
        blobs.append(np.ascontiguousarray(t.array, dtype=DTYPES[t.dtype]).tobytes())
    return header_bytes(entries, metadata) + b"".join(blobs)


def loads(data: bytes | bytearray | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES,
          ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Parse and validate; arrays are read-only views into ``data``."""
    buf = memoryview(data)
    if len(buf) < 8:
        raise SafetensorsError("file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > max_header_bytes:
        raise SafetensorsError(f"header of {n} bytes exceeds the {max_header_bytes}-byte limit")
    if 8 + n > len(buf):
        raise SafetensorsError("file is truncated inside the header")
    header = _parse_header(bytes(buf[8 : 8 + n]))
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise SafetensorsError("__metadata__ must map strings to strings")
    body = buf[8 + n :]
    spans: list[tuple[int, int, str]] = []
    out: dict[str, Tensor] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise SafetensorsError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM
                           for s in shape)):
            raise SafetensorsError(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"tensor {name!r} has invalid data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != nbytes:
            raise SafetensorsError(
                f"tensor {name!r}: offsets {offsets} do not fit {nbytes} bytes of data "
                f"(the data section has {len(body)} bytes; file truncated?)"
            )
        spans.append((begin, end, name))
        arr = np.frombuffer(body[begin:end], dtype=DTYPES[dtype]).reshape(shape)
        out[name] = Tensor(dtype, arr)
    spans.sort()
    for (_, e0, a), (b1, _, b) in itertools.pairwise(spans):
        if b1 < e0:
            raise SafetensorsError(f"tensors {a!r} and {b!r} overlap")
    return out, dict(meta)


def _parse_header(raw: bytes) -> object:
    depth = _max_depth(raw)
    if depth > MAX_DEPTH:
        raise SafetensorsError(f"header JSON nests {depth} deep; the format needs {MAX_DEPTH}")
    try:
        return json.loads(raw, parse_int=_small_int, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # unbalanced brackets can slip past _max_depth's count
        raise SafetensorsError("header JSON nests too deep") from exc


def _max_depth(raw: bytes) -> int:
    """Bracket nesting depth outside strings, in linear time and without recursing.

    A quote opens or closes a string unless an odd run of backslashes precedes it. Where the
    bytes are not JSON this count may be off, but only past the first invalid byte, which
    the parser never gets beyond.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if not len(data):
        return 0
    index = np.arange(len(data))
    backslash = data == ord("\\")
    # backslashes in the run ending just before each byte
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))
    run_before = np.concatenate([[0], index[:-1] - last_other[:-1]])
    quote = (data == ord('"')) & (run_before % 2 == 0)
    outside = np.cumsum(quote) % 2 == 0  # a closing quote counts as outside: harmless
    opens = outside & ((data == ord("{")) | (data == ord("[")))
    closes = outside & ((data == ord("}")) | (data == ord("]")))
    return int(np.cumsum(opens.astype(np.int64) - closes).max(initial=0))


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise SafetensorsError(f"header holds a {len(text)}-digit integer")
    return int(text)


def _no_constant(text: str) -> object:
    raise SafetensorsError(f"header holds {text}, which JSON does not allow")
