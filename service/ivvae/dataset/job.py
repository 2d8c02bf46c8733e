"""What decides a job's output, and where the output keeps it.

``JobConfig`` (the format, the encode options, the model) hashes to the job key: a rerun
with the same key resumes, any other is refused (``ivvae.dataset.state.open_output``). The
names below are the output's layout, which readers (``ivvae.data``) and the compaction
(``ivvae.compact``) share."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..core.names import PRECISIONS

if TYPE_CHECKING:
    pass

Format = Literal["files", "webdataset", "parquet"]
FORMATS: tuple[Format, ...] = ("files", "webdataset", "parquet")
LATENT_SUFFIX = ".latent.safetensors"
RECORD_SUFFIX = ".ivvae.json"
MANIFEST_NAME = "manifest.jsonl"
STATE_DIR = ".ivvae"
JOB_NAME = "job.json"
PARTS_DIR = f"{STATE_DIR}/parts"
LISTINGS_DIR = f"{STATE_DIR}/listings"  # each worker's listing of its share
SHARDS_DIR = "shards"
VERSIONS_DIR = "versions"
LOCK_NAME = "lock"
REPLACES = "replaces"  # a record file's line naming a part that a compaction replaced
COMPACTING_NAME = "compacting"  # OUT/.ivvae/compacting: a compaction runs (or was stopped)
COMPACT_PREFIX = "compact"  # the part names a compaction publishes: compact-<run>-<seq>
SHARD_CLIPS = 1000  # a shard's clips at most (--shard-clips)
SHARD_MB = 1024.0  # and its MiB (--shard-mb)
SHARD_SUFFIX: dict[Format, str] = {"files": "", "webdataset": ".tar", "parquet": ".parquet"}
JOB_SCHEMA = "ivvae.encode-dataset/1"


class DatasetError(Exception):
    """The run cannot start or go on (bad arguments, another job's output, no service)."""


@dataclass(frozen=True)
class ClipOptions:
    """The encode options applied to every clip (``preprocess``: the canonical string of
    ``ivvae.video.preprocess.Preprocess``, empty for none)."""

    model: str = ""
    sample: bool = False
    seed: int | None = None  # with sample: clip i gets a seed derived from (seed, its name)
    dtype: str = "float32"
    moments: bool = False
    preprocess: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in PRECISIONS:
            raise DatasetError(f"dtype must be one of {', '.join(PRECISIONS)}, got "
                               f"{self.dtype!r}")
        if self.seed is not None and not self.sample:
            raise DatasetError("--seed is only meaningful with --sample")

    def clip_seed(self, name: str) -> int | None:
        if not self.sample or self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}\n{name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # in [0, 2**63)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    weights_sha256: str
    # "server": a service whose /models (ListModels) does not say
    encode_precision: str


@dataclass(frozen=True)
class JobConfig:
    """Everything that decides a job's output; its hash is the job key."""

    format: Format
    options: ClipOptions
    model: ModelIdentity
    schema: str = JOB_SCHEMA

    @property
    def key(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "format": self.format, "options": asdict(self.options),
                "model": asdict(self.model)}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def jsonl(items: Iterable[Mapping[str, Any]]) -> bytes:
    """JSON lines, compact, as record files and the manifest hold them."""
    return "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items).encode()
