"""Reading volumes: the ISA-L fast path for .nii.gz reads exactly what nibabel reads."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import pytest

from raytumor.data.volumes import VolumeError, load_nifti, read_volume
from tests.conftest import GLIBC


@pytest.fixture
def nib_load_calls(monkeypatch) -> list[str]:
    """The paths ``nib.load`` is called with (it still loads them)."""
    calls: list[str] = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda path: calls.append(path) or real_load(path))
    return calls


def _affine() -> np.ndarray:
    affine = np.diag([-1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("dtype", [np.int16, np.float32])
def test_fast_gzip_path_reads_what_nibabel_reads(tmp_path, nib_load_calls, image_class, dtype):
    pytest.importorskip("isal")
    data = (np.random.default_rng(0).random((11, 7, 5)) * 300).astype(dtype)
    path = str(tmp_path / "scan.nii.gz")
    image = image_class(data, _affine())
    image.header.set_slope_inter(0.5, 3.0)  # scaled voxels, as many scanners write them
    nib.save(image, path)

    fast = load_nifti(path)
    assert nib_load_calls == []  # read by ISA-L, not by nibabel's gzip reader
    slow = nib.load(path)
    assert type(fast) is type(slow) is image_class
    fast_data = np.asarray(fast.dataobj, dtype=np.float32)
    np.testing.assert_array_equal(fast_data, np.asarray(slow.dataobj, dtype=np.float32))
    assert fast_data.strides == np.asarray(slow.dataobj, dtype=np.float32).strides  # the same (Fortran) order
    np.testing.assert_array_equal(fast.affine, slow.affine)
    np.testing.assert_array_equal(read_volume(path).data, np.asarray(slow.dataobj, dtype=np.float32))
    assert nib_load_calls == [path]  # only the reference load above


@pytest.mark.parametrize("name, isal_installed", [("plain.nii", True), ("scan.nii.gz", False)])
def test_uncompressed_files_and_missing_isal_read_through_nibabel(tmp_path, monkeypatch, nib_load_calls, name,
                                                                  isal_installed):
    if not isal_installed:
        monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import igzip` now raises ImportError
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    path = str(tmp_path / name)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    np.testing.assert_array_equal(read_volume(path).data, data)
    assert nib_load_calls == [path]


@pytest.mark.parametrize("damage", ["half", "trailer", "last byte", "crc"])
def test_a_gzip_stream_that_does_not_decompress_whole_is_named(tmp_path, nib_load_calls, damage):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((16, 16, 8)).astype(np.float32), np.eye(4)), str(good))
    raw = good.read_bytes()
    damaged = {"half": raw[: len(raw) // 2], "trailer": raw[:-8], "last byte": raw[:-1],
               "crc": raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:-4]) + raw[-4:]}[damage]
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(damaged)
    if damage != "half":  # nibabel reads only the bytes its header asks for: these read as valid there
        assert np.asarray(nib.load(str(cut)).dataobj).shape == (16, 16, 8)
        nib_load_calls.clear()
    with pytest.raises(VolumeError, match=r"^truncated or corrupt gzip \((EOFError|BadGzipFile)"):
        read_volume(str(cut))
    assert nib_load_calls == []


_PAGE_FAULTS_PER_READ = """
import resource, sys
from raytumor.data import volumes
if sys.argv[2] == "default-allocator":
    volumes.reuse_freed_memory = lambda: False
for _ in range(3):
    volumes.read_volume(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    volumes.read_volume(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's")
def test_reading_volumes_reuses_freed_buffers(tmp_path):
    # A 2 MiB volume: with glibc's defaults every read maps fresh pages for its buffers and
    # faults on each of them; with reuse_freed_memory the next read reuses the freed ones.
    import subprocess

    path = str(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((128, 128, 32), dtype=np.float32), np.eye(4)), path)

    def faults_per_read(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_PER_READ, path, mode], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    tuned, default = faults_per_read("tuned"), faults_per_read("default-allocator")
    assert default > 500  # at least one fresh 2 MiB buffer per read
    assert tuned < 50, (tuned, default)
