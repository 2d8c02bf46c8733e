"""What one worker publishes at a time: a part is a shard (or, for ``files``, the latent
files) and then its record file, which is what makes its clips count as done."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import secrets
import tarfile
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from ..storage import (
    Location,
    file_identity,
    publish_bytes,
    publish_file,
    temp_file_for,
)
from .encoders import Encoded
from .job import (
    LATENT_SUFFIX,
    PARTS_DIR,
    RECORD_SUFFIX,
    SHARD_CLIPS,
    SHARD_MB,
    SHARD_SUFFIX,
    SHARDS_DIR,
    Format,
    jsonl,
)
from .sources import Source

if TYPE_CHECKING:
    pass


def _now() -> float:
    return round(time.time(), 3)


def ok_record(source: Source, key: str, encoded: Encoded, seconds: float) -> dict[str, Any]:
    info = encoded.info
    return {"source": source.name, "key": key, "identity": source.identity, "status": "ok",
            "shape": list(info.latent_shape), "dtype": info.dtype,
            "frames": info.num_frames, "bytes": len(encoded.data),
            "latent_sha256": hashlib.sha256(encoded.data).hexdigest(),
            "model": info.model_name, "seconds": round(seconds, 3), "at": _now()}


def error_record(source: Source, key: str, code: str, detail: str) -> dict[str, Any]:
    return {"source": source.name, "key": key, "identity": source.identity,
            "status": "error", "error": code, "detail": detail, "at": _now()}


class PartWriter:
    """Collects finished clips into one part and publishes it: the outputs first, then the
    part's record file. ``publish`` starts the next part; records of clips that failed go
    into the record file too (a part may hold only those)."""

    def __init__(self, out: Location, fmt: Format, prefix: str, *, shard_clips: int = SHARD_CLIPS,
                 shard_bytes: int = int(SHARD_MB * 2**20), row_group_clips: int = 64,
                 spool: str | None = None) -> None:
        self.out, self.fmt, self.prefix = out, fmt, prefix
        self.run_id = f"{int(time.time()):010x}{secrets.token_hex(3)}"
        self.shard_clips = shard_clips if fmt != "files" else min(shard_clips, 256)
        self.shard_bytes, self.row_group_clips = shard_bytes, row_group_clips
        self.spool = spool or tempfile.gettempdir()
        self.tag = prefix + "-"
        self.seq = 0
        # Cancelling a coroutine does not stop its thread: one part is touched by one at once.
        self.mutex = threading.Lock()
        self.published: list[str] = []  # parts published by this writer
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.bytes = 0
        self.rows: list[dict[str, Any]] = []
        self.tmp: str | None = None
        self.tar: tarfile.TarFile | None = None

    @property
    def part_name(self) -> str:
        return f"{self.prefix}-{self.run_id}-{self.seq:05d}"

    @property
    def shard_path(self) -> str:
        return self.out.join(SHARDS_DIR, self.part_name + SHARD_SUFFIX[self.fmt])

    @property
    def full(self) -> bool:
        return len(self.records) >= self.shard_clips or self.bytes >= self.shard_bytes

    def add_error(self, record: dict[str, Any]) -> None:
        with self.mutex:
            self.records.append(record)

    def add(self, source: Source, record: dict[str, Any], encoded: Encoded,
            sidecars: dict[str, bytes]) -> None:
        """Stage one clip (``record`` from ``ok_record``; it gains ``part`` and ``member``)."""
        with self.mutex:
            self._add(source, dict(record), encoded, sidecars)

    def _add(self, source: Source, record: dict[str, Any], encoded: Encoded,
             sidecars: dict[str, bytes]) -> None:
        if self.fmt == "files":
            path = self.out.join(source.output)
            publish_bytes(self.out, path, encoded.data, self.tag)
            self.out.fs.invalidate_cache(path)
            record.update(part=source.output, member=None,
                          file=file_identity(self.out.fs.info(path)))
        elif self.fmt == "webdataset":
            record.update(part=posixpath.relpath(self.shard_path, self.out.path),
                          member=source.sample_key)
            self._add_to_tar(source, record, encoded, sidecars)
        else:
            record.update(part=posixpath.relpath(self.shard_path, self.out.path),
                          member=len(self.rows))
            self.rows.append(_parquet_row(source, record, encoded, sidecars))
        self.bytes += len(encoded.data) + sum(len(v) for v in sidecars.values())
        self.records.append(record)

    def _add_to_tar(self, source: Source, record: dict[str, Any], encoded: Encoded,
                    sidecars: dict[str, bytes]) -> None:
        if self.tar is None:
            self.tmp = temp_file_for(self.out, self.shard_path, self.spool, self.tag)
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        meta = {**record, "metadata": encoded.info.to_metadata()}
        members = {LATENT_SUFFIX: encoded.data,
                   RECORD_SUFFIX: json.dumps(meta, sort_keys=True).encode()}
        members.update({suffix: data for suffix, data in sidecars.items()})
        for suffix, data in members.items():
            entry = tarfile.TarInfo(source.sample_key + suffix)
            entry.size, entry.mode, entry.mtime = len(data), 0o644, 0
            self.tar.addfile(entry, io.BytesIO(data))

    def publish(self) -> list[dict[str, Any]]:
        """Publish the staged clips (nothing when none); returns their records."""
        with self.mutex:
            return self._publish()

    def _publish(self) -> list[dict[str, Any]]:
        records = self.records
        if not records:
            return []
        has_outputs = any(r["status"] == "ok" for r in records)
        if has_outputs and self.fmt == "webdataset":
            assert self.tar is not None and self.tmp is not None
            self.tar.close()
            publish_file(self.out, self.tmp, self.shard_path)
        elif has_outputs and self.fmt == "parquet":
            tmp = temp_file_for(self.out, self.shard_path, self.spool, self.tag)
            _write_parquet(tmp, self.rows, self.row_group_clips)
            publish_file(self.out, tmp, self.shard_path)
        publish_bytes(self.out, self.out.join(PARTS_DIR, self.part_name + ".jsonl"),
                      jsonl(records))
        self.published.append(self.part_name)
        self.seq += 1
        self._reset()
        return records

    def abandon(self) -> None:
        """Drop what is staged (an interrupted part: its clips are redone next time)."""
        with self.mutex:
            self._abandon()

    def _abandon(self) -> None:
        if self.tar is not None:
            self.tar.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
        self._reset()


PARQUET_META_COLUMNS = (
    "model_name", "weights_sha256", "scale_factor", "shift_factor", "z_dim", "num_frames",
    "height", "width", "fps", "padding_policy", "content_sha256", "mode", "seed",
    "format_version", "ivvae_version",
)


def _parquet_row(source: Source, record: dict[str, Any], encoded: Encoded,
                 sidecars: dict[str, bytes]) -> dict[str, Any]:
    from ..safetensors_io import loads

    tensors, meta = loads(encoded.data)
    row: dict[str, Any] = {"key": source.sample_key, "source": source.name,
                           "clip_key": record["key"]}
    for name in ("latent", "mu", "logvar"):
        t = tensors.get(name)
        row[name] = None if t is None else t.array.tobytes()
    row["shape"] = list(tensors["latent"].shape)
    row["dtype"] = encoded.info.dtype
    for k in PARQUET_META_COLUMNS:
        row[k] = meta.get(k)
    row["metadata"] = json.dumps(meta, sort_keys=True)
    row["sidecars"] = sorted(sidecars.items())
    return row


def parquet_schema() -> Any:
    import pyarrow as pa

    fields = [pa.field("key", pa.string()), pa.field("source", pa.string()),
              pa.field("clip_key", pa.string()), pa.field("latent", pa.binary()),
              pa.field("mu", pa.binary()), pa.field("logvar", pa.binary()),
              pa.field("shape", pa.list_(pa.int64())), pa.field("dtype", pa.string())]
    fields += [pa.field(k, pa.string()) for k in PARQUET_META_COLUMNS]
    fields += [pa.field("metadata", pa.string()),
               pa.field("sidecars", pa.map_(pa.string(), pa.binary()))]
    return pa.schema(fields)


def _write_parquet(path: str, rows: list[dict[str, Any]], row_group_clips: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=parquet_schema())
    # Page checksums: ivvae.data verifies them, so a damaged shard is an error, not a latent.
    pq.write_table(table, path, row_group_size=max(1, row_group_clips),
                   write_page_checksum=True)
