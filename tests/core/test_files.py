"""Atomic writes: the old file or the whole new one; errors name the file asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivvae.core.files import TMP_SUFFIX, atomic_write, atomic_writer, temp_path


def test_a_name_near_the_limit_is_writable_and_temporaries_stay_short(tmp_path: Path) -> None:
    path = tmp_path / ("é" * 120 + ".bin")  # 244 bytes in UTF-8
    tmp = temp_path(path)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(TMP_SUFFIX)
    assert len(tmp.name.encode()) < 130
    atomic_write(path, b"x")
    assert path.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_errors_name_the_path_asked_for_and_nothing_is_left(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "x.bin"
    with pytest.raises(FileNotFoundError) as caught:
        atomic_write(missing, b"x")
    assert caught.value.filename == str(missing)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write(tmp_path, b"x")
    with pytest.raises(RuntimeError), atomic_writer(tmp_path / "y.bin") as f:
        f.write(b"half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
