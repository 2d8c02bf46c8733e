"""Where datasets live: local folders and object storage (``s3://``, ``gs://``, ``https://``).

Everything goes through fsspec (``s3fs`` for S3). Credentials and endpoints come from where
those libraries look (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance
roles, ...), never from a command line, so they never reach a log or a manifest.

Publishing is all-or-nothing: a local file is written under a temporary name in its own
folder and renamed; an object is uploaded in one PUT (or a multipart upload), which object
stores make visible only once it is complete. So a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import secrets
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

TMP_MARK = ".tmp-"  # in the name of a file being written; never in a published one

# botocore waits 60 s to connect and 60 s between bytes, and retries, and s3fs retries on
# top: an S3 store that stopped answering held a job for about 7 minutes a call, saying
# nothing. A call now fails once the store has sent nothing for S3_READ_TIMEOUT_S, after
# S3_RETRIES tries (s3fs's, with its backoff; botocore's own are off) - 1.5 minutes at
# most. A user's own fsspec configuration for s3 (``FSSPEC_S3_CONFIG_KWARGS``, fsspec's
# config file) or ``AWS_MAX_ATTEMPTS`` wins.
S3_CONNECT_TIMEOUT_S = 10.0
S3_READ_TIMEOUT_S = 30.0
S3_RETRIES = 3


class StorageError(Exception):
    """A URL that no installed filesystem can open."""


@functools.cache
def storage_errors() -> tuple[type[BaseException], ...]:
    """What storage raises when it fails: ``OSError`` (s3fs and gcsfs turn most service
    errors into one), ``StorageError``, botocore's own errors that s3fs lets through (no
    credentials, the endpoint unreachable) when botocore is installed, and aiohttp's (an
    HTTP(S) source that answers 500) when it is."""
    errors: tuple[type[BaseException], ...] = (*read_errors(), StorageError)
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return errors
    return (*errors, BotoCoreError)


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading one file raises when that file cannot be read: ``OSError``, and
    aiohttp's errors (fsspec's HTTP filesystem raises a 403 or a 503 as aiohttp's
    ``ClientResponseError``, no ``OSError``)."""
    return (OSError, *_http_errors())


def _http_errors() -> tuple[type[BaseException], ...]:
    try:
        from aiohttp import ClientError
    except ImportError:
        return ()
    return (ClientError,)


@dataclass(frozen=True)
class Location:
    """A folder or file: its filesystem and the path on it (no protocol)."""

    fs: AbstractFileSystem
    path: str

    @classmethod
    def of(cls, url: str) -> Location:
        """Raises ``StorageError`` for an unknown protocol or one whose driver is missing."""
        s3 = url.startswith(("s3://", "s3a://"))
        try:
            fs, path = fsspec.core.url_to_fs(url, **(_s3_options() if s3 else {}))
        except (ValueError, ImportError) as exc:
            raise StorageError(f"{url}: {exc}") from None
        if s3 and "AWS_MAX_ATTEMPTS" not in os.environ:
            fs.retries = min(fs.retries, S3_RETRIES)
        return cls(fs, path.rstrip("/") if len(path) > 1 else path)

    @property
    def local(self) -> bool:
        return "file" in _protocols(self.fs)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def url(self, path: str | None = None) -> str:
        return str(self.fs.unstrip_protocol(self.path if path is None else path))

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.path)


def _s3_options() -> dict[str, Any]:
    """s3fs options bounding a call to a store that stopped answering (see S3_READ_TIMEOUT_S),
    unless the user configured them."""
    if "config_kwargs" in fsspec.config.conf.get("s3", {}):
        return {}
    config: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S,
                              "read_timeout": S3_READ_TIMEOUT_S}
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        config["retries"] = {"max_attempts": 1}
    return {"config_kwargs": config}


def _protocols(fs: AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def identity(info: dict[str, Any]) -> str | None:
    """A stored object's identity from its listing: version/ETag and size. None when the
    store gives neither (then the content hash is the identity)."""
    size = info.get("size")
    for key in ("VersionId", "generation", "ETag", "etag", "md5Hash"):
        value = info.get(key)
        if value:
            return f"{key.lower()}:{str(value).strip(chr(34))}:size:{size}"
    return None


def file_identity(info: dict[str, Any]) -> str:
    """What tells one publish of an output file from another: a stored object's content
    hash, else its modification time. Only what both a listing and ``info`` report (an S3
    listing has no VersionId). ``size:N`` alone cannot tell: a caller must read the file.
    (``identity`` is a source's, from a listing only.)"""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"{key.lower()}:{str(info[key]).strip(chr(34))}:size:{info.get('size')}"
    if info.get("mtime") is not None:  # not the inode: a FUSE mount numbers them anew
        return f"mtime:{info['mtime']}:size:{info.get('size')}"
    return f"size:{info.get('size')}"


def modified_time(fs: AbstractFileSystem, path: str, info: dict[str, Any]) -> float | None:
    """When the store last wrote ``path``, by its own clock (seconds since the epoch), from
    its listing ``info`` or else asked; None when the store does not say."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "mtime_ns"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value) / (1e9 if key == "mtime_ns" else 1)
        if value is not None and hasattr(value, "timestamp"):
            return float(value.timestamp())
    try:
        stamp = fs.modified(path)
    except NotImplementedError:
        return None
    return None if stamp is None else float(stamp.timestamp())


def content_sha256(fs: AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish_bytes(loc: Location, path: str, data: bytes, tag: str = "", *,
                create: bool = False) -> None:
    """Publish ``data`` at ``path`` whole or not at all (``tag``: in the temporary's name,
    so that its writer can tell its own leftovers apart; ``ivvae.core.files`` names its
    temporaries by pid only, which is why this does not use it).

    ``create``: only if nothing is at ``path`` (FileExistsError otherwise), decided at once
    by the store: a hard link locally (or an exclusive open where a filesystem has no hard
    links), a conditional put (``If-None-Match: *``) on S3. Stores that cannot do that
    (fsspec's fallback) check first, which two writers can race: callers read back.
    """
    if loc.local:
        loc.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}{TMP_MARK}{tag}{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not create:
                os.replace(tmp, path)
                return
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here (some FUSE and SMB mounts)
                with open(path, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.unlink(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    elif create:
        loc.fs.pipe_file(path, data, mode="create")
    else:
        loc.fs.pipe_file(path, data)


def publish_file(loc: Location, local_tmp: str, path: str) -> None:
    """Move a finished local file to ``path``: a rename in the same folder, or an upload."""
    if loc.local:
        with open(local_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(local_tmp, path)
    else:
        try:
            loc.fs.put_file(local_tmp, path)
        finally:
            os.unlink(local_tmp)


def temp_file_for(loc: Location, path: str, spool: str, tag: str = "") -> str:
    """Where to write the file that will be published at ``path``: next to it when local
    (so the rename is atomic), else in the local ``spool`` folder."""
    name = f"{posixpath.basename(path)}{TMP_MARK}{tag}{secrets.token_hex(4)}"
    if loc.local:
        loc.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return posixpath.join(posixpath.dirname(path), name)
    os.makedirs(spool, exist_ok=True)
    return os.path.join(spool, name)
