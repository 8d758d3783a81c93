"""A dataset directory's layout, and finding its preprocessing cache without pandas, numpy or Ray.

A dataset holds ``manifest.parquet`` and ``classes.parquet`` (see :mod:`raytumor.data.manifest`).
A preprocessing cache is ``<dataset>/prepared/<X>x<Y>x<Z>-<fingerprint>/`` holding Parquet shards, the
quarantine list, ``meta.json`` (written last: it marks the cache complete) and
``inputs.json``: what the fingerprint was computed from (the manifest's SHA-256, the dataset
directory, the settings, and every image and mask file's size and mtime). With it, a second
``raytumor data prepare`` checks the cache with a hash and a ``stat`` per file instead of
importing pandas and re-reading the manifest (0.5 s of imports alone). Kept free of heavy
imports on purpose; :mod:`raytumor.data.preprocess` builds the caches.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from raytumor.errors import DatasetError
from raytumor.storage import atomic_write_text

MANIFEST_FILE = "manifest.parquet"
CLASSES_FILE = "classes.parquet"
PREPARED_DIR = "prepared"
META_FILE = "meta.json"
INPUTS_FILE = "inputs.json"
SHARDS_DIR = "shards"
# Bump when the preprocessing maths, or what it accepts, changes: old caches then stop matching.
# 2: masks must hold integer labels >= 0. 3: empty ground-truth masks and rows sharing an image
# file are quarantined, as `raytumor data validate` flags them. 4: a .nii.gz must decompress
# whole (one missing its gzip trailer read as valid). 5: axes shrunk by more than 2x are pooled
# first (mean for the image, max for the mask), so no slice is skipped.
PREPROCESS_VERSION = 5
PAPER_SHAPE = (128, 128, 12)


@dataclass(frozen=True)
class PrepareSettings:
    shape: tuple[int, int, int] = PAPER_SHAPE
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    # A 2-D image is quarantined, as `raytumor data validate` and the importers do; depth-1
    # volumes (one slice stored as 3-D, as the Figshare importer writes) are fine.
    allow_2d: bool = False

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(s) < 1 for s in self.shape):
            raise ValueError(f"shape must be three positive ints, got {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))


@dataclass(frozen=True)
class PreparedDataset:
    """A complete preprocessing cache: Parquet shards of rows plus ``meta.json``."""

    path: Path
    fingerprint: str
    n_cases: int
    n_quarantined: int
    shape: tuple[int, int, int]
    cached: bool = False
    seconds: float = 0.0

    @property
    def shards(self) -> Path:
        return self.path / SHARDS_DIR

    @property
    def quarantine(self) -> Path:
        return self.path / "quarantine.csv"


def file_stamp(path: str | None) -> list:
    """``[path, size, mtime_ns]``; ``[path, None]`` for a missing file; ``[path]`` for a URI."""
    if path is None or "://" in path:
        return [path]
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def cache_dir(dataset_dir: str | os.PathLike, settings: PrepareSettings, fp: str) -> Path:
    shape = "x".join(str(s) for s in settings.shape)
    return Path(dataset_dir) / PREPARED_DIR / f"{shape}-{fp}"


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Open a complete cache directory (one holding ``meta.json``)."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DatasetError(f"{path}: not a complete preprocessing cache (no {META_FILE}); run `raytumor data prepare`")
    meta = json.loads(meta_path.read_text())
    return PreparedDataset(
        path=path,
        fingerprint=meta["fingerprint"],
        n_cases=meta["n_cases"],
        n_quarantined=meta["n_quarantined"],
        shape=tuple(meta["shape"]),
        cached=True,
    )


def _inputs_key(dataset_dir: str | os.PathLike, settings: PrepareSettings, manifest_sha256: str) -> dict:
    key = {
        "version": PREPROCESS_VERSION,
        "settings": asdict(settings),
        "dataset_dir": os.path.abspath(dataset_dir),
        "manifest_sha256": manifest_sha256,
    }
    return json.loads(json.dumps(key))  # as it reads back from JSON (tuples become lists)


def write_inputs_record(cache: Path, dataset_dir: str | os.PathLike, settings: PrepareSettings, manifest_sha256: str,
                        fp: str, stamps: list[list]) -> None:
    """Write ``inputs.json`` into ``cache``: the fingerprint ``fp`` and what it was computed from."""
    unique = sorted({json.dumps(s): s for s in stamps}.values(), key=lambda s: str(s[0]))
    record = {**_inputs_key(dataset_dir, settings, manifest_sha256), "fingerprint": fp, "files": unique}
    atomic_write_text(cache / INPUTS_FILE, json.dumps(record, separators=(",", ":")))


def find_prepared_quick(dataset_dir: str | os.PathLike, settings: PrepareSettings) -> PreparedDataset | None:
    """The complete cache whose ``inputs.json`` matches the dataset as it is now, or None.

    None means only "not found this way" (no record, an older cache, anything changed or
    unreadable); :func:`raytumor.data.preprocess.find_prepared` then decides with the full
    fingerprint. A match is exact: the same manifest bytes, dataset directory, settings and
    code version, and every file with the size and mtime it had, give the same fingerprint.
    """
    manifest = Path(dataset_dir) / MANIFEST_FILE
    any_cache = cache_dir(dataset_dir, settings, "*")
    records = sorted(any_cache.parent.glob(f"{any_cache.name}/{INPUTS_FILE}"))
    if not records:
        return None
    try:
        key = _inputs_key(dataset_dir, settings, hashlib.sha256(manifest.read_bytes()).hexdigest())
    except OSError:
        return None
    for path in records:
        try:
            record = json.loads(path.read_text())
            matches = all(record.get(name) == value for name, value in key.items()) and all(
                file_stamp(stamp[0]) == stamp for stamp in record["files"])
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue
        if matches and path.parent == cache_dir(dataset_dir, settings, record["fingerprint"]) and (
                path.parent / META_FILE).is_file():
            return load_prepared(path.parent)
    return None
