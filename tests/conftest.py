"""Shared fixtures: small synthetic NIfTI datasets and one Ray instance per test session."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Ray Train as raytumor's embedded Ray runs it (the session's Ray below is started the same way).
from raytumor.runtime import train_env_vars  # noqa: E402

train_env_vars(embedded=True)


# The allocator settings of raytumor.runtime.reuse_freed_memory are glibc's.
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def shard_count(n_rows: int, blocks: int, batch_size: int) -> int:
    """Shards ``prepare_dataset`` writes when ``n_rows`` are dealt into ``blocks`` strided blocks,
    each block cut into batches of ``batch_size`` and every batch written as one shard."""
    return sum(-(-len(range(i, n_rows, blocks)) // batch_size) for i in range(blocks))


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def blob_volume(shape=(20, 20, 6), centre=None, radius=4.0, seed=0):
    """An image with a brain-like ellipsoid, a bright blob, noise; and the blob's mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    centre = np.array(centre if centre is not None else [s / 2 for s in shape])
    brain = (((grid - np.array(shape) / 2) / (np.array(shape) / 2.2)) ** 2).sum(-1) < 1
    blob = (((grid - centre) / radius) ** 2).sum(-1) < 1
    image = brain * 100.0 + blob * 80.0 + rng.normal(0, 5, shape)
    return image.astype(np.float32), blob.astype(np.uint8)


def make_dataset(root: Path, n_per_class=(8, 8, 8), shape=(20, 20, 6), unlabelled=0, patients=False) -> Path:
    """A small labelled dataset in the manifest format with splits assigned."""
    from raytumor.data.manifest import build_class_table, write_classes, write_manifest
    from raytumor.data.splits import assign_splits

    rows = []
    index = 0
    for label, n in enumerate(n_per_class):
        for k in range(n):
            image, mask = blob_volume(shape, radius=2.0 + label * 1.5, seed=index)
            case = f"c{index:03d}"
            write_nifti(root / "images" / f"{case}.nii.gz", image)
            write_nifti(root / "masks" / f"{case}.nii.gz", mask)
            rows.append(dict(case_id=case, image=f"images/{case}.nii.gz", mask=f"masks/{case}.nii.gz",
                             label=label, label_name=f"type{label}", patient_id=f"p{index // 2}" if patients else None,
                             split=None, source="test", mask_kind="ground_truth"))
            index += 1
    for k in range(unlabelled):
        image, _ = blob_volume(shape, seed=1000 + k)
        case = f"u{k:03d}"
        write_nifti(root / "unlabelled" / f"{case}.nii.gz", image)
        rows.append(dict(case_id=case, image=f"unlabelled/{case}.nii.gz", mask=None, label=None, label_name=None,
                         patient_id=None, split="unlabelled", source="test", mask_kind=None))
    manifest = assign_splits(pd.DataFrame(rows), seed=0)
    write_manifest(root, manifest)
    write_classes(root, build_class_table(manifest))
    return root


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs); shut down at the end, none of its processes left.

    The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's placement-group
    cleaner needs when Tune stops a trial mid-run.
    """
    import ray

    if not ray.is_initialized():
        from raytumor.runtime import start_embedded_ray

        start_embedded_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR",
                           log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    from raytumor.runtime import stop_embedded_ray

    stop_embedded_ray()  # and any of its workers left hung at exit
