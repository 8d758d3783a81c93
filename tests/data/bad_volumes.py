"""A corpus of broken cases, shared by the validation and importer tests.

Each entry writes one case (image and maybe mask) under a directory and says which of the
two files is at fault and what the reason must say. The volumes are 12x12x4, so a whole
corpus is a few kilobytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from tests.conftest import blob_volume, write_nifti

SHAPE = (12, 12, 4)


@dataclass(frozen=True)
class BadCase:
    name: str
    write: Callable[[Path], tuple[Path, Path | None]]  # directory -> (image, mask or None)
    culprit: str  # "image" or "mask": the file the problem must be tied to
    reason: str  # regex the reason must match (case-insensitive)


def _good(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return blob_volume(SHAPE, radius=2.5, seed=seed)


def _pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray | None, affine=None) -> tuple[Path, Path | None]:
    image_path = write_nifti(root / f"{name}.nii.gz", image, affine)
    mask_path = None if mask is None else write_nifti(root / f"{name}_mask.nii.gz", mask, affine)
    return image_path, mask_path


def write_truncated(root: Path) -> tuple[Path, Path | None]:
    """A valid .nii.gz cut in the middle of its voxel data: the header still loads."""
    noise = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)  # incompressible
    path = write_nifti(root / "truncated.nii.gz", noise)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    assert nib.load(str(path)).shape == SHAPE  # the lazy header load must not notice
    return path, None


def write_nan(root: Path) -> tuple[Path, Path | None]:
    image, mask = _good()
    image[3, 4, 1] = np.nan
    return _pair(root, "nan", image, mask)


def write_inf(root: Path) -> tuple[Path, Path | None]:
    image, mask = _good()
    image[0, 0, 0] = np.inf
    return _pair(root, "inf", image, mask)


def write_4d(root: Path) -> tuple[Path, Path | None]:
    image, _ = _good()
    return _pair(root, "four_d", np.stack([image, image], axis=-1), None)


def write_2d(root: Path) -> tuple[Path, Path | None]:
    image, _ = _good()
    return _pair(root, "two_d", image[:, :, 0], None)


def write_mask_mismatch(root: Path) -> tuple[Path, Path | None]:
    image, mask = _good()
    return _pair(root, "mismatch", image, mask[:, :, :3])


def write_missing_image(root: Path) -> tuple[Path, Path | None]:
    return root / "does_not_exist.nii.gz", None


def write_missing_mask(root: Path) -> tuple[Path, Path | None]:
    image, _ = _good()
    image_path, _ = _pair(root, "mask_gone", image, None)
    return image_path, root / "mask_gone_mask.nii.gz"


def write_constant(root: Path) -> tuple[Path, Path | None]:
    return _pair(root, "constant", np.full(SHAPE, 7.0, dtype=np.float32), None)


def write_text_as_nifti(root: Path) -> tuple[Path, Path | None]:
    path = root / "notes.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("patient notes, not an image\n")
    return path, None


def write_text_file(root: Path) -> tuple[Path, Path | None]:
    path = root / "notes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("patient notes, not an image\n")
    return path, None


def write_oblique(root: Path) -> tuple[Path, Path | None]:
    angle = np.deg2rad(30)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    image, mask = _good()
    return _pair(root, "oblique", image, mask, affine)


BAD_CASES = [
    BadCase("truncated_gzip", write_truncated, "image", r"truncated|unreadable"),
    BadCase("nan_voxels", write_nan, "image", r"NaN/Inf"),
    BadCase("inf_voxels", write_inf, "image", r"NaN/Inf"),
    BadCase("four_d", write_4d, "image", r"4-D"),
    BadCase("two_d", write_2d, "image", r"2-D"),
    BadCase("mask_shape_mismatch", write_mask_mismatch, "mask", r"mask shape .* does not match image shape"),
    BadCase("missing_image", write_missing_image, "image", r"missing file"),
    BadCase("missing_mask", write_missing_mask, "mask", r"missing file"),
    BadCase("constant_image", write_constant, "image", r"constant image"),
    BadCase("text_renamed_nii_gz", write_text_as_nifti, "image", r"not NIfTI"),
    BadCase("text_file", write_text_file, "image", r"not NIfTI"),
    BadCase("oblique_affine", write_oblique, "image", r"oblique"),
]
