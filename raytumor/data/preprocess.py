"""Preprocessing on Ray Data, cached by a fingerprint of inputs and settings.

read manifest -> ``map_batches`` (preprocess + write a shard) -> outcomes: every case is reoriented
to RAS, resized to the target shape, intensity-normalised, and stacked with its mask into
a ``(2, X, Y, Z)`` float32 tensor (channel 0 image, channel 1 mask; zeros with
``has_mask=False`` when absent). Cases that fail a check are listed in ``quarantine.csv``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from raytumor.data.layout import (  # noqa: F401 - the cache's layout, re-exported
    INPUTS_FILE,
    META_FILE,
    PAPER_SHAPE,
    PREPARED_DIR,
    PREPROCESS_VERSION,
    SHARDS_DIR,
    PreparedDataset,
    PrepareSettings,
    cache_dir,
    file_stamp,
    find_prepared_quick,
    load_prepared,
    write_inputs_record,
)
from raytumor.data.manifest import read_manifest_and_digest, resolve_path
from raytumor.data.validate import (CaseCheckError, CaseProblem, check_case, check_ground_truth_mask, shared_image_problems,
                                    table_problems, write_quarantine)
from raytumor.data.volumes import ras_voxels
from raytumor.errors import DatasetError
from raytumor.storage import atomic_path, atomic_write_text

ROW_COLUMNS = ("case_id", "label", "split", "has_mask", "mask_kind", "augmented", "volume")
# pyarrow.parquet.write_table options for shards of volumes: no dictionary encoding of the
# voxels. Parquet first tries a dictionary of every float value, which made writing a 16-case
# shard 14x slower (20 ms instead of 1.4 ms) and the file larger (docs/benchmarks.md, figure 3).
SHARD_PARQUET_OPTIONS = {"use_dictionary": [c for c in ROW_COLUMNS if c != "volume"]}


def normalise_intensity(image: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Clip to foreground percentiles, then z-score over the foreground.

    The foreground is every voxel above the volume's minimum, so a zero (or constant)
    background neither drags the mean nor shrinks the spread; the background maps to the
    lowest normalised value.
    """
    foreground = image[image > image.min()]
    if foreground.size < 2:
        return np.zeros_like(image, dtype=np.float32)
    lo, hi = np.percentile(foreground, [lower, upper])
    clipped = np.clip(image, lo, hi)
    values = clipped[image > image.min()]
    std = float(values.std())
    out = (clipped - float(values.mean())) / (std if std > 1e-8 else 1.0)
    return out.astype(np.float32)


def resize_volume(volume, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    """``(X, Y, Z)`` array or tensor -> ``shape`` with ``torch.nn.functional.interpolate``, as
    MONAI's ``Resize(shape, mode, anti_aliasing=False)`` computes it (tested equal).

    Called directly because ``import monai`` costs every fresh Ray Data worker ~2 s, more than
    preprocessing a few hundred small cases takes (docs/benchmarks.md, figure 3). A tensor is
    read in whatever strides it has (see :func:`raytumor.data.volumes.ras_voxels`).
    """
    import torch
    import torch.nn.functional as F

    if not isinstance(volume, torch.Tensor):
        volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    align = False if mode in ("linear", "bilinear", "trilinear", "bicubic") else None
    resized = F.interpolate(volume.float()[None, None], size=tuple(shape), mode=mode, align_corners=align)
    return np.ascontiguousarray(resized[0, 0].numpy())


# Interpolation reads two neighbours per output voxel along an axis: shrunk by more than this,
# the axis has input voxels that no output voxel reads.
MAX_INTERPOLATED_SHRINK = 2.0


def pool_large_shrinks(volume, shape: tuple[int, int, int], reduce: str):
    """Pool each axis that ``shape`` shrinks by more than 2× down to its target size first,
    by mean (``reduce="mean"``, an image) or max (``"max"``, a mask), so that every input voxel
    counts. BraTS's 155 slices into the paper's 12: trilinear alone read 24 of them, and a
    6 mm lesion left no voxel in the mask in 6 of 12 cases. Other axes, and volumes shrunk
    by 2× or less (the demo's), are left to :func:`resize_volume` as they are."""
    import torch
    import torch.nn.functional as F

    if not isinstance(volume, torch.Tensor):
        volume = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    size = tuple(volume.shape)
    pooled = tuple(out if have > MAX_INTERPOLATED_SHRINK * out else have for have, out in zip(size, shape))
    if pooled == size:
        return volume
    pool = F.adaptive_avg_pool3d if reduce == "mean" else F.adaptive_max_pool3d
    return pool(volume.float()[None, None], pooled)[0, 0]


def preprocess_volume(image, mask, settings: PrepareSettings) -> np.ndarray:
    """``image``/``mask`` ``(X, Y, Z)`` in RAS order (arrays, or tensors from
    :func:`raytumor.data.volumes.ras_voxels`; mask may be None) -> ``(2, *settings.shape)`` float32."""
    out = np.zeros((2, *settings.shape), dtype=np.float32)
    image_r = resize_volume(pool_large_shrinks(image, settings.shape, "mean"), settings.shape, "trilinear")
    out[0] = normalise_intensity(image_r, settings.lower_percentile, settings.upper_percentile)
    if mask is not None:
        binary = (mask > 0).float() if not isinstance(mask, np.ndarray) else (mask > 0).astype(np.float32)
        mask_r = resize_volume(pool_large_shrinks(binary, settings.shape, "max"), settings.shape, "nearest-exact")
        out[1] = (mask_r > 0.5).astype(np.float32)
    return out


def preprocess_batch(batch: pd.DataFrame, settings: PrepareSettings) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: a pandas batch of manifest rows -> prepared rows.

    Bad cases come out with ``error`` set and an all-zero volume, so none is dropped silently.
    """
    volumes, errors, files, has_mask = [], [], [], []
    for row in batch.itertuples(index=False):
        try:
            image, mask = check_case(row.image, row.mask, allow_2d=settings.allow_2d)
            check_ground_truth_mask(mask, row.mask_kind, row.mask)
            mask_data = ras_voxels(mask) if mask is not None else None
            volumes.append(preprocess_volume(ras_voxels(image), mask_data, settings))
            errors.append("")
            files.append("")
            has_mask.append(mask is not None)
        except CaseCheckError as exc:
            volumes.append(np.zeros((2, *settings.shape), dtype=np.float32))
            errors.append(exc.reason)
            files.append(exc.file)
            has_mask.append(False)
    labels = batch["label"].fillna(-1).astype(np.int64).to_numpy()
    return {
        "case_id": batch["case_id"].astype(str).to_numpy(),
        "label": labels,
        "split": batch["split"].astype(str).to_numpy(),
        "has_mask": np.asarray(has_mask, dtype=bool),
        "mask_kind": batch["mask_kind"].fillna("").astype(str).to_numpy(),
        "augmented": np.zeros(len(batch), dtype=bool),
        "volume": np.stack(volumes),
        "error": np.asarray(errors, dtype=object),
        "error_file": np.asarray(files, dtype=object),
    }


def input_records(manifest: pd.DataFrame, dataset_dir: str | os.PathLike) -> list[list]:
    """What the fingerprint covers per case, in ``case_id`` order: the manifest fields that
    preprocessing reads, and the image's and mask's :func:`~raytumor.data.layout.file_stamp`."""
    records = []
    for row in manifest.sort_values("case_id").itertuples(index=False):
        image = resolve_path(dataset_dir, row.image)
        mask = resolve_path(dataset_dir, row.mask)
        label = None if pd.isna(row.label) else int(row.label)
        records.append([row.case_id, label, row.split, row.mask_kind, file_stamp(image), file_stamp(mask)])
    return records


def fingerprint(manifest: pd.DataFrame, dataset_dir: str | os.PathLike, settings: PrepareSettings,
                records: list[list] | None = None) -> str:
    """Hash of the manifest rows, each file's size and mtime, the settings and the code version
    (``records``: :func:`input_records`, when already computed)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": PREPROCESS_VERSION, "settings": asdict(settings)}, sort_keys=True).encode())
    for record in input_records(manifest, dataset_dir) if records is None else records:
        digest.update(json.dumps(record, default=str).encode())
    return digest.hexdigest()[:16]


def find_prepared(dataset_dir: str | os.PathLike, settings: PrepareSettings) -> PreparedDataset | None:
    """The cache matching the dataset as it is now, or None.

    Asks the cache's ``inputs.json`` first (:func:`~raytumor.data.layout.find_prepared_quick`),
    then computes the fingerprint; a cache found only that way (one made before ``inputs.json``
    existed) gets its record, so the next look is quick.
    """
    return find_prepared_quick(dataset_dir, settings) or _Inputs.read(dataset_dir, settings).open_cache()


@dataclass(frozen=True)
class _Inputs:
    """The dataset as it is now, fingerprinted: what a full look at the cache needs."""

    dataset_dir: Path
    settings: PrepareSettings
    manifest: pd.DataFrame
    manifest_sha256: str
    records: list
    fingerprint: str

    @classmethod
    def read(cls, dataset_dir: str | os.PathLike, settings: PrepareSettings) -> _Inputs:
        manifest, manifest_sha256 = read_manifest_and_digest(dataset_dir)
        records = input_records(manifest, dataset_dir)
        fp = fingerprint(manifest, dataset_dir, settings, records)
        return cls(Path(dataset_dir), settings, manifest, manifest_sha256, records, fp)

    @property
    def cache(self) -> Path:
        return cache_dir(self.dataset_dir, self.settings, self.fingerprint)

    def open_cache(self) -> PreparedDataset | None:
        """The complete cache of this fingerprint, or None. Its ``inputs.json`` is rewritten:
        the quick look missed, so any record it had is stale (an older cache, or a manifest
        rewritten without changing what is hashed)."""
        if not (self.cache / META_FILE).is_file():
            return None
        self.record_into(self.cache)
        return load_prepared(self.cache)

    def record_into(self, cache: Path) -> None:
        stamps = [stamp for record in self.records for stamp in record[4:] if stamp[0] is not None]
        with contextlib.suppress(OSError):  # a read-only dataset: the next look computes the fingerprint again
            write_inputs_record(cache, self.dataset_dir, self.settings, self.manifest_sha256, self.fingerprint, stamps)


# Ray Data's V2 Parquet reader (2.60's default) lists a directory through a pool of footer-reading
# actors, 32 by default, each a fresh process (~2 CPU-s here): 3.4 s to read the 20 shards of
# the 291-case demo cache and 35 s for the 320 of the 5,004-case one. V1 reads the footers in
# the calling process, ~15 ms a file; one footer actor is as fast as two on local files. See
# docs/benchmarks.md, figure 4 (seventh session).
V1_PARQUET_MAX_FILES = 64
FOOTER_READERS = 1
USE_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"
FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def read_shards(shards_dir: str | os.PathLike):
    """``ray.data.read_parquet`` of a directory of shards, with the Parquet reader chosen for its
    file count: V1 up to ``V1_PARQUET_MAX_FILES`` files, V2 with ``FOOTER_READERS`` footer actors
    above. ``RAY_DATA_USE_DATASOURCE_V2`` or ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``, when set, win."""
    import ray

    n_files = sum(1 for _ in Path(shards_dir).glob("*.parquet"))
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    if USE_V2_ENV not in os.environ:
        context.use_datasource_v2 = n_files > V1_PARQUET_MAX_FILES
    set_footer_readers = FOOTER_READERS_ENV not in os.environ
    if set_footer_readers:  # read when the reader is built, in this process
        os.environ[FOOTER_READERS_ENV] = str(FOOTER_READERS)
    try:
        return ray.data.read_parquet(str(shards_dir))
    finally:
        context.use_datasource_v2 = before
        if set_footer_readers:
            del os.environ[FOOTER_READERS_ENV]


def write_prepared_shard(batch: pd.DataFrame, settings: PrepareSettings, shards_dir: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: preprocess a batch of manifest rows and write its good
    rows straight to one Parquet shard; only the small per-case outcome goes back to the driver.

    Volumes never travel through the object store. The shard name is a hash of the batch's case
    ids, so a retried task overwrites its own shard instead of duplicating rows.
    """
    import pyarrow.parquet as pq
    from ray.data.block import BlockAccessor

    out = preprocess_batch(batch, settings)
    good = out["error"] == ""
    if good.any():
        digest = hashlib.sha256("\0".join(out["case_id"]).encode()).hexdigest()[:16]
        table = BlockAccessor.batch_to_block({name: out[name][good] for name in ROW_COLUMNS})
        with atomic_path(Path(shards_dir) / f"part-{digest}.parquet") as tmp:
            pq.write_table(table, tmp, **SHARD_PARQUET_OPTIONS)
    return {"case_id": out["case_id"], "error": out["error"], "error_file": out["error_file"]}


@contextlib.contextmanager
def _all_cpus_to_one_operator():
    """Ray Data's per-operator resource reservation off while the block runs.

    ``prepare_dataset`` runs a single map operator; with the reservation on, Ray Data kept
    part of a 2-CPU node in reserve and ran the map's tasks one at a time (see
    docs/benchmarks.md, figure 3).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    before = context.op_resource_reservation_enabled
    context.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = before


def prepare_dataset(
    dataset_dir: str | os.PathLike,
    settings: PrepareSettings = PrepareSettings(),
    *,
    force: bool = False,
    batch_size: int = 16,
    blocks_per_cpu: int = 1,
) -> PreparedDataset:
    """Preprocess every case of a dataset into Parquet shards with Ray Data (cached).

    Needs a running Ray (see :func:`raytumor.runtime.ray_session`). One streaming pass:
    manifest rows -> ``map_batches`` that preprocesses ``batch_size`` cases and writes their
    shard -> the per-case outcomes, from which the quarantine list is written. A second call
    with an unchanged manifest, files and settings returns the cache without work. The cache
    is built in a temporary directory and renamed into place only when complete.

    The rows are split into ``blocks_per_cpu`` blocks per CPU of the cluster, one Ray Data task
    each (``batch_size`` shrinks to the smallest block where blocks are smaller). One per CPU
    is the fastest here: two per CPU cost 40-170 ms more per call on 2 CPUs
    (docs/benchmarks.md, figure 3). More give finer load balancing where workers run at
    different speeds.
    """
    import ray

    if blocks_per_cpu < 1:
        raise ValueError(f"blocks_per_cpu must be at least 1, got {blocks_per_cpu}")
    started = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    if not force and (quick := find_prepared_quick(dataset_dir, settings)) is not None:
        return quick
    inputs = _Inputs.read(dataset_dir, settings)
    if not force and (found := inputs.open_cache()) is not None:
        return found
    manifest, fp, target = inputs.manifest, inputs.fingerprint, inputs.cache

    problems: list[CaseProblem] = table_problems(manifest, None) + shared_image_problems(manifest, dataset_dir)
    rows = manifest[~manifest["case_id"].isin({p.case_id for p in problems})].copy()
    rows["image"] = [resolve_path(dataset_dir, p) for p in rows["image"]]
    rows["mask"] = [resolve_path(dataset_dir, p) for p in rows["mask"]]
    rows = rows[["case_id", "image", "mask", "label", "split", "mask_kind"]]
    rows["label"] = rows["label"].astype("float64")  # nullable ints travel as float/NaN through Arrow

    if len(rows) == 0:
        raise DatasetError(f"{dataset_dir}: the manifest has no usable case")
    # One task per block, one shard per batch of a block. The cluster's CPUs, not the ones free
    # this instant: right after another Ray job, fewer show as free and the split came out
    # coarser, down to one block for two CPUs.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    blocks = min(len(rows), blocks_per_cpu * cpus)
    # Ray Data merges blocks smaller than a batch into one task: 9 cases in 4 blocks ran as one
    # task. Batches no larger than the smallest block keep one task per block.
    batch_size = max(1, min(batch_size, len(rows) // blocks))
    with atomic_path(target) as tmp:
        shards = tmp / SHARDS_DIR
        shards.mkdir(parents=True)
        with _all_cpus_to_one_operator():
            outcomes = (
                ray.data.from_pandas([rows.iloc[i::blocks] for i in range(blocks)])
                .map_batches(
                    write_prepared_shard,
                    fn_kwargs={"settings": settings, "shards_dir": str(shards)},
                    batch_size=batch_size,
                    batch_format="pandas",
                )
                .to_pandas()
            )
        for leftover in shards.glob(".*"):  # temp files of a task killed mid-write (it was retried)
            leftover.unlink()
        bad = outcomes[outcomes["error"] != ""]
        problems.extend(CaseProblem(r.case_id, r.error_file, r.error) for r in bad.itertuples(index=False))
        write_quarantine(tmp / "quarantine.csv", problems)
        meta = {
            "fingerprint": fp,
            "shape": list(settings.shape),
            "settings": asdict(settings),
            "n_cases": int((outcomes["error"] == "").sum()),
            "n_quarantined": len({p.case_id for p in problems}),
            "version": PREPROCESS_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        inputs.record_into(tmp)
        # meta.json last: its presence marks the cache complete.
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    _remove_stale_caches(target)
    prepared = load_prepared(target)
    return PreparedDataset(**{**prepared.__dict__, "cached": False, "seconds": time.perf_counter() - started})


def _remove_stale_caches(current: Path) -> None:
    """Leftovers of interrupted runs (temporary dirs) of this shape; complete caches are kept."""
    for entry in current.parent.glob(f".{current.name.split('-')[0]}-*.tmp-*"):
        shutil.rmtree(entry, ignore_errors=True)
