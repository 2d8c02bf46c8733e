"""Atomic file writing: a reader (or a crash) sees the old file or the whole new one.
And where the service keeps what it learns about its machine (:func:`state_dir`)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"  # temporary files are ``.<name>.<pid>-<random><TMP_SUFFIX>``
# Of the name, what the temporary one keeps: a name near the file system's 255 bytes must
# stay writable with the suffix added.
TMP_NAME_KEEP = 100


def temp_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder: the rename stays atomic),
    hidden, and never much longer than 100 bytes whatever the name."""
    keep = path.name.encode()[:TMP_NAME_KEEP].decode(errors="ignore")
    return path.with_name(f".{keep}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")


# New files are readable by others: a Triton container or another user reads what the CLI
# and training write.
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = FILE_MODE
                  ) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``; fsync and publish it by rename on success.

    On an exception the temporary file is removed and ``path`` is untouched. ``mode`` is
    the new file's permission bits: readable by others (a Triton container or another user
    reads what the CLI and training write).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    tmp = temp_path(path)
    try:
        try:
            f = open(tmp, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:  # named by what the caller asked for, not by our temporary
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *,
                 mode: int = FILE_MODE) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_writer(path, mode=mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def state_dir() -> Path:
    """``$XDG_STATE_HOME/ivvae`` (default ``~/.local/state/ivvae``): files the service
    writes for itself and reuses across restarts (a generated cache secret, measured step
    costs). Not created here."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ivvae"
