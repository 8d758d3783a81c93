"""Atomic writes: files and directories get the modes a plain write gives, so others can read them."""

from __future__ import annotations

import os
import stat

import pytest

from raytumor.storage import atomic_path, atomic_write_bytes, atomic_write_text


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_mode_of_a_plain_write(tmp_path, umask):
    with open(tmp_path / "plain.json", "w") as handle:
        handle.write("{}")
    atomic_write_text(tmp_path / "meta.json", "{}")
    atomic_write_bytes(tmp_path / "new" / "manifest.parquet", b"PAR1")
    assert _mode(tmp_path / "meta.json") == _mode(tmp_path / "plain.json") == 0o666 & ~umask
    assert _mode(tmp_path / "new" / "manifest.parquet") == 0o666 & ~umask
    assert (tmp_path / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "new", "plain.json"]  # no temp file left


def test_atomic_write_replaces_a_private_file_with_a_readable_one(tmp_path, umask):
    path = tmp_path / "quarantine.csv"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and _mode(path) == 0o666 & ~umask


def test_atomic_path_directory_and_its_files_get_normal_modes(tmp_path, umask):
    target = tmp_path / "prepared" / "cache"
    with atomic_path(target) as tmp:
        (tmp / "shards").mkdir(parents=True)
        (tmp / "shards" / "part.parquet").write_bytes(b"PAR1")
        atomic_write_text(tmp / "meta.json", "{}")
    assert _mode(target) == _mode(target / "shards") == 0o777 & ~umask
    assert _mode(target / "meta.json") == _mode(target / "shards" / "part.parquet") == 0o666 & ~umask


def test_atomic_write_failure_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "x.json", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
