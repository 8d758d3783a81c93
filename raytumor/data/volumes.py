"""Reading NIfTI volumes fully and checking them: the checks every stage shares.

nibabel loads lazily (a truncated ``.nii.gz`` reports its shape and fails only when its
voxels are read), so every check here reads the voxels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from raytumor.runtime import reuse_freed_memory

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Largest off-axis component of a unit voxel axis that still counts as axis-aligned.
OBLIQUE_TOLERANCE = 1e-3
GZIP_MAGIC = b"\x1f\x8b"


class VolumeError(Exception):
    """A volume that cannot be used; the message is the reason, without the path."""


@dataclass(frozen=True)
class Volume:
    """A fully read 3-D volume: ``data`` is ``(X, Y, Z)`` float32 in stored voxel order."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def orientation(self) -> str:
        return "".join(nib.orientations.aff2axcodes(self.affine))


def read_volume(path: str, *, allow_2d: bool = False) -> Volume:
    """Read every voxel of a NIfTI file and check it.

    Raises :class:`VolumeError` for: missing file, not NIfTI, unreadable or truncated voxel
    data, 4-D data (a trailing singleton axis is squeezed), 2-D data (unless ``allow_2d``,
    then a depth-1 volume), NaN/Inf voxels, a singular or oblique affine.
    """
    reuse_freed_memory()
    if "://" not in path and not os.path.exists(path):
        raise VolumeError("missing file")
    if not path.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeError("not NIfTI (expected a .nii or .nii.gz file)")
    try:
        image = load_nifti(path)
    except VolumeError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        detail = str(exc).replace(path, os.path.basename(path))  # the reason never carries the path
        raise VolumeError(f"not NIfTI or unreadable header ({type(exc).__name__}: {detail})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"not NIfTI ({type(image).__name__})")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - EOFError, zlib.error, OSError, ValueError ...
        detail = str(exc).replace(path, os.path.basename(path))
        raise VolumeError(f"truncated or unreadable voxel data ({type(exc).__name__}: {detail})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        if not allow_2d:
            raise VolumeError(f"2-D image of shape {data.shape} where 3-D is expected")
        data = data[..., np.newaxis]
    if data.ndim != 3:
        raise VolumeError(f"{data.ndim}-D image of shape {data.shape}; expected 3-D")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise VolumeError(f"{bad} NaN/Inf voxel(s)")
    affine = np.asarray(image.affine, dtype=np.float64)
    check_affine(affine)
    return Volume(data=data, affine=affine)


def load_nifti(path: str):
    """``nib.load``, except that a local ``.nii.gz`` is decompressed with ISA-L (``isal``).

    Decompression is most of the time it takes to read a volume (5 of 8 ms at 128x128x32), and
    with ISA-L instead of the zlib behind nibabel's gzip reader a volume reads 1.7-2.4x faster
    (docs/benchmarks.md, figure 3). A gzip stream that does not decompress whole (cut short,
    corrupt, failing its CRC) is a :class:`VolumeError`: nibabel reads only as many bytes as
    the header asks for, so a file missing just its gzip trailer read as valid there. Any other
    file this fast path cannot read (not gzip, an odd header) goes to ``nib.load``, so it gets
    nibabel's own errors.
    """
    if "://" in path or not path.lower().endswith(".gz"):
        return nib.load(path)
    try:
        from isal import igzip
    except ImportError:  # an optional speed-up
        return nib.load(path)
    with open(path, "rb") as handle:
        compressed = handle.read()
    if not compressed.startswith(GZIP_MAGIC):  # not gzip at all
        return nib.load(path)
    try:
        raw = igzip.decompress(compressed)
    except Exception as exc:  # noqa: BLE001 - EOFError, BadGzipFile, IsalError by the damage
        raise VolumeError(f"truncated or corrupt gzip ({type(exc).__name__}: {exc})") from None
    try:
        header_size = int.from_bytes(raw[:4], "little")
        if header_size not in (348, 540):
            header_size = int.from_bytes(raw[:4], "big")
        image_class = {348: nib.Nifti1Image, 540: nib.Nifti2Image}[header_size]
        return image_class.from_bytes(raw)
    except Exception:  # noqa: BLE001 - the slow path reports what is wrong
        return nib.load(path)


def check_affine(affine: np.ndarray) -> None:
    """The pipeline reorients by axis permutation and flips only, so it needs an axis-aligned grid."""
    if not np.all(np.isfinite(affine)):
        raise VolumeError("affine has NaN/Inf entries")
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0) or abs(np.linalg.det(linear)) < 1e-12:
        raise VolumeError("singular affine (zero voxel size); orientation unknown")
    directions = np.abs(linear / spacing)
    off_axis = 1.0 - directions.max(axis=0)
    if np.any(off_axis > OBLIQUE_TOLERANCE):
        raise VolumeError(
            "oblique orientation: the pipeline reorients axis-aligned volumes only; "
            "resample to an axis-aligned grid first"
        )


def check_image_content(data: np.ndarray) -> None:
    if float(data.max()) == float(data.min()):
        raise VolumeError(f"constant image (every voxel = {float(data.min()):g})")


def check_mask(mask: Volume, image: Volume) -> None:
    if mask.data.shape != image.data.shape:
        raise VolumeError(f"mask shape {mask.data.shape} does not match image shape {image.data.shape}")
    if mask.orientation != image.orientation:
        raise VolumeError(f"mask orientation {mask.orientation} differs from image orientation {image.orientation}")


def reorient_to_ras(volume: Volume) -> np.ndarray:
    """Voxel data permuted/flipped so that axes point Right, Anterior, Superior."""
    ornt = nib.orientations.io_orientation(volume.affine)
    return np.ascontiguousarray(nib.orientations.apply_orientation(volume.data, ornt))


def ras_voxels(volume: Volume):
    """:func:`reorient_to_ras` as a ``torch.Tensor`` (same values, same axis order) that keeps
    the voxels in their stored memory order.

    nibabel returns voxels in the file's Fortran order, and making them C-contiguous transposes
    every voxel: 41 % of preprocessing time at 256x256x48 (docs/benchmarks.md, figure 3).
    Here the axes are permuted as a view, and a flip copies in memory order, which is cheap.
    ``torch.nn.functional.interpolate`` reads any strides, so resizing needs no copy either.
    """
    import warnings

    import torch

    ornt = nib.orientations.io_orientation(volume.affine)
    with warnings.catch_warnings():
        # A read-only array (a memory-mapped .nii) is only read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(volume.data)
    # As nibabel's apply_orientation: flip the input axes marked -1, then reverse the transpose.
    flips = [axis for axis, flip in enumerate(ornt[:, 1]) if flip == -1]
    if flips:
        tensor = tensor.flip(flips)
    return tensor.permute(*np.argsort(ornt[:, 0]).tolist())
