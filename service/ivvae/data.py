"""Reading precomputed latents back in training: PyTorch datasets over ``encode-dataset``
outputs, in any of its formats, local or in object storage.

    from ivvae.data import LatentDataset, IterableLatentDataset

    ds = LatentDataset("s3://bucket/latents/")          # map-style: ds[i]
    latent, meta = ds[0]   # latent: (1, z, n, h, w) torch tensor in the stored dtype
    loader = DataLoader(IterableLatentDataset("s3://bucket/latents/", shuffle=True, seed=0),
                        batch_size=None, num_workers=4)

Both read ``OUT/manifest.jsonl`` to learn which clips are done and where (a file, or a
shard and its member), so they see exactly the clips a finished run published, never a
superseded sample of a re-encoded clip. ``meta`` is the latent file's metadata (strings;
see ``ivvae.latents.META_KEYS``) plus ``source``; for webdataset and parquet, the clip's
``sidecars`` (suffix -> bytes); and for a run with ``--moments``, ``moments``: ``{"mu":
..., "logvar": ...}``, float32 tensors of the latent's shape, unscaled (the latent is
``scaling_factor * (mu - shift_factor)``, or a sample around it), for training that draws
its own posterior samples.

The iterable variant gives whole shards to workers: each ``DataLoader`` worker (and each
distributed rank, ``rank`` / ``world_size``) reads its own shards, in an order shuffled by
``seed`` and ``epoch`` (``set_epoch``) when ``shuffle`` is set, and the clips within a shard
shuffled the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import posixpath
import random
import tarfile
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset.job import LATENT_SUFFIX, MANIFEST_NAME, RECORD_SUFFIX
from .latents import DTYPE_NAMES
from .safetensors_io import DTYPES, Tensor, loads
from .storage import Location

if TYPE_CHECKING:
    import torch

try:
    from torch.utils.data import Dataset as _Dataset
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover - a training script has torch
    _Dataset = _IterableDataset = object  # type: ignore[assignment,misc]

Sample = tuple["torch.Tensor", dict[str, Any]]


def read_manifest(url: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``ok`` lines of ``url/manifest.jsonl``, in order."""
    url = os.fspath(url)
    loc = Location.of(url)
    try:
        text = loc.fs.cat_file(loc.join(MANIFEST_NAME)).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} has no {MANIFEST_NAME}: not an encode-dataset "
                                "output, or no run has finished yet") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{loc.join(MANIFEST_NAME)}: line {number} is not JSON (the "
                             "file was damaged after the run wrote it whole)") from None
    return [r for r in records if r.get("status") == "ok"]


def to_torch(tensor: Tensor) -> torch.Tensor:
    """A stored tensor as torch, in its stored dtype (bfloat16 stays bfloat16)."""
    import torch

    array = np.ascontiguousarray(tensor.array)
    if tensor.dtype == "BF16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _from_latent_file(data: bytes) -> tuple[torch.Tensor, dict[str, Any]]:
    tensors, meta = loads(data)
    return to_torch(tensors["latent"]), {**meta, **_moments(tensors.get("mu"),
                                                            tensors.get("logvar"))}


def _moments(mu: Tensor | None, logvar: Tensor | None) -> dict[str, Any]:
    """``{"moments": {...}}`` where the clip has them, else nothing."""
    if mu is None or logvar is None:
        return {}
    return {"moments": {"mu": to_torch(mu), "logvar": to_torch(logvar)}}


# pyarrow's thread pools can still be finishing a read's last tasks when the interpreter
# exits, and a process that read parquet then aborts at exit now and then ("terminate called
# without an active exception", apache/arrow#34314 and #39862): a failed job after all its
# work, in about half of the runs on a busy machine. A moment at exit lets them finish (none
# of the aborts in 30 runs that gave 13 without it). DataLoader workers end with os._exit
# and never reach it.
ARROW_SETTLE_S = 0.2
_settling = False


def _settle_arrow_at_exit() -> None:
    global _settling
    if not _settling:
        _settling = True
        atexit.register(time.sleep, ARROW_SETTLE_S)


class DamagedPart(ValueError):
    """A latent file or shard that is not what the run published."""


def _matches(data: bytes, record: dict[str, Any]) -> bool:
    """Whether ``data`` is the latent file ``record`` describes (records from before
    ``latent_sha256`` existed are taken as they are)."""
    expected = record.get("latent_sha256")
    return not expected or hashlib.sha256(data).hexdigest() == expected


class _Shards:
    """The clips of an output grouped by part (a latent file, or a shard)."""

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = os.fspath(url)
        self._loc = Location.of(self.url)
        self._pid = os.getpid()
        self.records = read_manifest(self.url)
        self.parts: dict[str, list[int]] = {}
        for i, r in enumerate(self.records):
            self.parts.setdefault(r["part"], []).append(i)

    @property
    def loc(self) -> Location:
        # A DataLoader worker is a fork: object-store clients (their event loops) are not
        # fork-safe, so each process opens its own.
        if self._pid != os.getpid():
            self._loc, self._pid = Location.of(self.url), os.getpid()
        return self._loc

    def _rewritten(self, record: dict[str, Any], data: bytes) -> str:
        """Why a latent file differs from this reader's manifest, and what to do."""
        with contextlib.suppress(Exception):  # no better reason to give: the general one
            now = {r["source"]: r for r in read_manifest(self.url)}.get(record["source"])
            if now is not None and now != record and _matches(data, now):
                return ("a later encode-dataset run rewrote it, and the manifest now names "
                        "the new latent: open the dataset again (a files output changes "
                        "under its readers; webdataset and parquet outputs do not)")
        return ("a later encode-dataset run rewrote it and did not finish: run the job "
                "again")

    def read_part(self, part: str) -> dict[str, Sample]:
        """Every current clip of ``part``, by source name. A part that is missing or
        damaged (a latent whose bytes are not those the manifest recorded, a cut shard) is
        an error naming it: a training run must not learn from a corrupt latent."""
        path = self.loc.join(part)
        wanted = {self.records[i]["member"]: self.records[i] for i in self.parts[part]}
        try:
            if part.endswith(LATENT_SUFFIX):
                (record,) = wanted.values()
                data = self.loc.fs.cat_file(path)
                # A latent file is rewritten in place when its clip changes; a run killed
                # before its manifest leaves the new file under the old line.
                if not _matches(data, record):
                    raise DamagedPart(f"{path} no longer holds the latent the manifest names "
                                     f"for {record['source']!r}: {self._rewritten(record, data)}")
                latent, meta = _from_latent_file(data)
                return {record["source"]: (latent, {**meta, "source": record["source"]})}
            if part.endswith(".tar"):
                return self._read_tar(path, wanted)
            if part.endswith(".parquet"):
                return self._read_parquet(path, wanted)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: the manifest names this part, and it is gone"
                                    ) from None
        except DamagedPart:
            raise
        except Exception as exc:  # tarfile, pyarrow and the safetensors reader raise many types
            raise DamagedPart(f"{path} is damaged: {type(exc).__name__}: {exc}") from exc
        raise ValueError(f"unknown part {part!r}")

    def _read_tar(self, path: str, wanted: dict[Any, dict[str, Any]]) -> dict[str, Sample]:
        members: dict[str, dict[str, bytes]] = {}
        with self.loc.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for entry in tar:
                base = posixpath.basename(entry.name)
                key = posixpath.join(posixpath.dirname(entry.name), base.split(".", 1)[0])
                if key not in wanted or not entry.isfile():
                    continue
                reader = tar.extractfile(entry)
                assert reader is not None
                members.setdefault(key, {})["." + base.split(".", 1)[1]] = reader.read()
        out: dict[str, Sample] = {}
        for key, record in wanted.items():
            files = members.get(key, {})
            if LATENT_SUFFIX not in files:
                raise DamagedPart(f"{path} has no latent of {record['source']!r} (sample "
                                  f"{key!r}): the shard is cut short or was rewritten")
            data = files.pop(LATENT_SUFFIX)
            if not _matches(data, record):
                raise DamagedPart(f"{path}: the latent of {record['source']!r} is not the one "
                                  "the manifest recorded (its sha256 differs): the shard is "
                                  "damaged")
            latent, meta = _from_latent_file(data)
            files.pop(RECORD_SUFFIX, None)
            out[record["source"]] = (latent, {**meta, "source": record["source"],
                                              "sidecars": files})
        return out

    def _read_parquet(self, path: str, wanted: dict[Any, dict[str, Any]]) -> dict[str, Sample]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        _settle_arrow_at_exit()
        # In this thread only, from bytes (a shard is read whole anyway; its bytes go as soon
        # as the table holds them).
        data = self.loc.fs.cat_file(path)
        # Shards are written with page checksums (the manifest's sha256 is of the latent
        # file, which a row does not hold): a flipped byte fails here, not in training.
        table = pq.read_table(pa.BufferReader(data), columns=[
            "source", "latent", "mu", "logvar", "shape", "dtype", "metadata", "sidecars"],
            page_checksum_verification=True, use_threads=False, pre_buffer=False)
        del data
        rows = table.to_pylist()
        out: dict[str, Sample] = {}
        for row_index, record in wanted.items():
            row = rows[int(row_index)]
            dtype = DTYPE_NAMES[row["dtype"]]
            array = np.frombuffer(row["latent"], dtype=DTYPES[dtype]).reshape(row["shape"])
            meta = json.loads(row["metadata"])
            moments = [None if row[name] is None else Tensor("F32", np.frombuffer(
                row[name], dtype=DTYPES["F32"]).reshape(row["shape"])) for name in ("mu", "logvar")]
            out[record["source"]] = (to_torch(Tensor(dtype, array)),
                                     {**meta, "source": row["source"],
                                      "sidecars": dict(row["sidecars"] or []),
                                      **_moments(*moments)})
        return out


class LatentDataset(_Dataset):
    """Map-style: ``ds[i]`` is ``(latent, metadata)`` of the i-th clip of the manifest.

    ``latent``: ``(1, z, n, h, w)`` in the stored dtype. The last shard read is kept, so
    reading in manifest order (or by shard) reads each shard once.
    """

    def __init__(self, url: str | os.PathLike[str]) -> None:
        self._shards = _Shards(url)
        self._cached: tuple[str, dict[str, Sample]] | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self._shards.records

    def __len__(self) -> int:
        return len(self._shards.records)

    def __getitem__(self, index: int) -> Sample:
        record = self._shards.records[index]
        part = record["part"]
        if self._cached is None or self._cached[0] != part:
            self._cached = (part, self._shards.read_part(part))
        return self._cached[1][record["source"]]


class IterableLatentDataset(_IterableDataset):
    """Streams ``(latent, metadata)`` shard by shard; see the module docstring."""

    def __init__(self, url: str | os.PathLike[str], *, shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        """``rank`` / ``world_size`` default to torch.distributed's when it is initialised
        (else 0 / 1)."""
        self._shards = _Shards(url)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        if rank is None or world_size is None:
            import torch.distributed as dist

            running = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if running else 0
            world_size = dist.get_world_size() if running else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def parts(self) -> list[str]:
        """This reader's shards (this rank's and this DataLoader worker's), in order."""
        from torch.utils.data import get_worker_info

        parts = sorted(self._shards.parts)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(parts)
        worker = get_worker_info()
        readers = self.world_size * (worker.num_workers if worker is not None else 1)
        if len(parts) < readers:
            # Ranks that read nothing end their epoch first: in lockstep training they wait.
            warnings.warn(f"{len(parts)} shards for {readers} readers (ranks x DataLoader "
                          "workers): some read nothing. Write smaller shards (--shard-clips) "
                          "or read with LatentDataset and a DistributedSampler",
                          stacklevel=2)
        parts = parts[self.rank::self.world_size]
        if worker is not None:
            parts = parts[worker.id::worker.num_workers]
        return parts

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts():
            samples = self._shards.read_part(part)
            names = sorted(samples)
            if self.shuffle:
                random.Random(f"{self.seed}:{self.epoch}:{part}").shuffle(names)
            for name in names:
                yield samples[name]
