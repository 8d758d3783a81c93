"""Similar-case retrieval: the top-N labelled cases nearest a new scan (paper, section 5).

``build_index`` embeds every labelled case (train, val, test; non-augmented) of a run's
dataset once with the run's best model and saves, next to the run::

    RUN/index/vectors.npy    (N, D) float32 KNN vectors, row i belongs to row i of cases.parquet
    RUN/index/cases.parquet  case_id, label, label_name, split
    RUN/index/meta.json      run, config hash, sha256 of best_model.pt, shape, dataset, counts

The directory is written to a temporary sibling and renamed into place. An index whose
``best_model.pt`` or config changed since it was built is stale and is not used.

A query scan goes through the training preprocessing: ``read_volume`` -> ``ras_voxels``
-> ``preprocess_volume`` at the run's ``data.shape`` (a missing mask is an all-zero channel),
then ``model.embed``; neighbours are ranked by Euclidean distance as in evaluation. A scan
that fails a check is not searched; it is listed with its reason, and the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from raytumor.config import RunConfig, dump_config
from raytumor.data.manifest import LABELLED_SPLITS
from raytumor.data.volumes import NIFTI_SUFFIXES
from raytumor.errors import RaytumorError
from raytumor.storage import atomic_path

INDEX_DIR = "index"
VECTORS_FILE = "vectors.npy"
CASES_FILE = "cases.parquet"
META_FILE = "meta.json"
INDEX_VERSION = 1
RESULT_COLUMNS = ("query", "mask", "rank", "case_id", "label", "label_name", "split", "distance")
QUARANTINE_COLUMNS = ("query", "file", "reason")


class IndexMissingError(RaytumorError):
    """No usable index (absent, incomplete or stale): build one with ``raytumor index build``."""


class ScanError(RaytumorError):
    """A query scan, or its mask, that fails a check: ``file`` is the faulty one."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


@dataclass(frozen=True)
class ScanProblem:
    """A query scan that was not searched: ``file`` is the scan or its mask, whichever is faulty."""

    query: str
    file: str
    reason: str


@dataclass(frozen=True)
class SearchResults:
    matches: pd.DataFrame  # one row per (query, rank), columns RESULT_COLUMNS
    problems: list[ScanProblem]  # the scans left out, in scan order

    def problems_frame(self) -> pd.DataFrame:
        return pd.DataFrame([p.__dict__ for p in self.problems], columns=list(QUARANTINE_COLUMNS))


@dataclass(frozen=True)
class RetrievalIndex:
    path: Path
    vectors: np.ndarray  # (N, D) float32
    cases: pd.DataFrame  # case_id, label, label_name, split
    meta: dict

    def __len__(self) -> int:
        return len(self.cases)

    def search(self, queries: np.ndarray, top: int = 5) -> list[pd.DataFrame]:
        """``queries`` ``(Q, D)`` -> one frame per query: ``rank, case_id, label, label_name, split, distance``."""
        from raytumor.evaluate.metrics import nearest_neighbors

        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries must be (Q, {self.vectors.shape[1]}), got {queries.shape}")
        if len(queries) == 0:
            return []
        # float64 keeps the distance of a case to itself at ~1e-8 rather than float32's ~1e-3.
        distances, indices = nearest_neighbors(self.vectors.astype(np.float64), queries.astype(np.float64), top)
        out = []
        for dist, idx in zip(distances, indices):
            frame = self.cases.iloc[idx].reset_index(drop=True)
            frame.insert(0, "rank", np.arange(1, len(idx) + 1))
            frame["distance"] = dist
            out.append(frame)
        return out


def index_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / INDEX_DIR


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_identity(run_dir: str | os.PathLike, config: RunConfig) -> dict:
    """What an index must match to be current: the weights file and the config that made them."""
    from raytumor.train.loops import BEST_MODEL_FILE

    return {
        "model_sha256": _sha256(Path(run_dir) / BEST_MODEL_FILE),
        "config_hash": hashlib.sha256(dump_config(config).encode()).hexdigest()[:16],
    }


def build_index(
    run_dir: str | os.PathLike,
    *,
    dataset: str | os.PathLike | None = None,
    device=None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> RetrievalIndex:
    """Embed every labelled, non-augmented case of the run's dataset and save ``RUN/index/``."""
    from raytumor.evaluate.embeddings import embed_run

    run_dir = Path(run_dir)
    embedded = embed_run(run_dir, LABELLED_SPLITS, dataset=dataset, device=device, batch_size=batch_size,
                         progress=progress)
    rows = embedded.rows
    if len(rows) == 0:
        raise RaytumorError(f"{embedded.dataset_dir}: no labelled case in the preprocessing cache to index")
    names = dict(zip(embedded.classes["label"].astype(int), embedded.classes["name"].astype(str)))
    cases = pd.DataFrame({
        "case_id": rows.case_id.astype(str),
        "label": rows.label.astype(np.int64),
        "label_name": [names.get(int(label), str(int(label))) for label in rows.label],
        "split": rows.split.astype(str),
    })
    meta = {
        "version": INDEX_VERSION,
        "run": embedded.name,
        **run_identity(run_dir, embedded.config),
        "shape": list(embedded.config.data.shape),
        "dataset": str(embedded.dataset_dir),
        "prepared_fingerprint": embedded.prepared.fingerprint,
        "n_cases": len(cases),
        "embedding_dim": int(rows.embeddings.shape[1]),
        "knn_vectors": "softmax" if embedded.outputs_logits else "embedding",
        "metric": "euclidean",
        "splits": sorted(set(cases["split"])),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    target = index_dir(run_dir)
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        np.save(tmp / VECTORS_FILE, rows.embeddings.astype(np.float32))
        cases.to_parquet(tmp / CASES_FILE, index=False)
        # meta.json last: its presence marks the index complete.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return RetrievalIndex(target, rows.embeddings.astype(np.float32), cases, meta)


def load_index(run_dir: str | os.PathLike, *, config: RunConfig | None = None) -> RetrievalIndex:
    """The saved index of a run; :class:`IndexMissingError` when absent, incomplete or stale.

    ``config`` (the run's, from ``load_best_model``) enables the staleness check against the
    current ``best_model.pt``.
    """
    path = index_dir(run_dir)
    how = f"build it with `raytumor index build {run_dir}`"
    if not (path / META_FILE).is_file():
        raise IndexMissingError(f"{path}: no retrieval index; {how}")
    try:
        meta = json.loads((path / META_FILE).read_text())
        vectors = np.load(path / VECTORS_FILE, allow_pickle=False)
        cases = pd.read_parquet(path / CASES_FILE)
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild
        raise IndexMissingError(f"{path}: unreadable retrieval index ({type(exc).__name__}); {how}") from None
    if vectors.ndim != 2 or len(vectors) != len(cases):
        raise IndexMissingError(f"{path}: vectors and cases disagree ({vectors.shape} vs {len(cases)} rows); {how}")
    if config is not None:
        current = run_identity(run_dir, config)
        if any(meta.get(key) != value for key, value in current.items()):
            raise IndexMissingError(f"{path}: stale retrieval index (the run's model changed since it was built); "
                                    f"rebuild it with `raytumor index build {run_dir}`")
    return RetrievalIndex(path, vectors.astype(np.float32, copy=False), cases, meta)


# ---------------------------------------------------------------- query scans


def preprocess_scan(image: str | os.PathLike, mask: str | os.PathLike | None, shape: Sequence[int]) -> np.ndarray:
    """A NIfTI scan (and optional mask) -> ``(2, *shape)`` float32, exactly as training data.

    Any problem (missing, unreadable, truncated, wrong dimensionality, NaN, oblique, constant,
    mask mismatch) is a :class:`ScanError` naming the file.
    """
    from raytumor.data.preprocess import PrepareSettings, preprocess_volume
    from raytumor.data.validate import CaseCheckError, check_case
    from raytumor.data.volumes import ras_voxels

    settings = PrepareSettings(shape=tuple(shape))
    try:
        volume, mask_volume = check_case(str(image), None if mask is None else str(mask), allow_2d=settings.allow_2d)
    except CaseCheckError as exc:
        reason = " ".join(exc.reason.split())
        raise ScanError(exc.file, reason) from None
    mask_data = ras_voxels(mask_volume) if mask_volume is not None else None
    return preprocess_volume(ras_voxels(volume), mask_data, settings)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_scans(
    image: str | os.PathLike, mask: str | os.PathLike | None = None
) -> list[tuple[Path, Path | None]]:
    """``image`` a NIfTI file (``mask`` a file or None) or a folder of them (``mask`` a folder or None).

    In a folder every ``.nii``/``.nii.gz`` is a query, in name order; its mask is the file of
    the same name in the mask folder, when there is one.
    """
    image, mask = Path(image), None if mask is None else Path(mask)
    if not image.exists():
        raise RaytumorError(f"{image}: no such file or folder")
    if mask is not None and not mask.exists():
        raise RaytumorError(f"{mask}: no such mask file or folder")
    if image.is_file():
        if mask is not None and mask.is_dir():
            raise RaytumorError(f"{mask}: a folder of masks goes with a folder of scans; give the scan's mask file")
        return [(image, mask)]
    scans = sorted(p for p in image.iterdir() if p.is_file() and is_nifti(p))
    if not scans:
        raise RaytumorError(f"{image}: no .nii or .nii.gz file in this folder")
    if mask is not None and not mask.is_dir():
        raise RaytumorError(f"{mask}: with a folder of scans, --mask must be a folder of masks with the same file names")
    pairs = []
    for scan in scans:
        candidate = None if mask is None else mask / scan.name
        pairs.append((scan, candidate if candidate is not None and candidate.is_file() else None))
    return pairs


def search_scans(
    run_dir: str | os.PathLike,
    scans: Sequence[tuple[str | os.PathLike, str | os.PathLike | None]],
    *,
    top: int = 5,
    index: RetrievalIndex | None = None,
    device=None,
    batch_size: int = 16,
) -> SearchResults:
    """Top-``top`` labelled matches of each good scan, and the bad scans with their reasons.

    Scans are preprocessed and embedded ``batch_size`` at a time (memory stays bounded for
    any number of scans); a scan that fails a check (:func:`preprocess_scan`) is left out and
    listed in ``problems``, the others are searched. ``index`` defaults to the run's saved
    (current) index.
    """
    from raytumor.evaluate.embeddings import default_device
    from raytumor.train.steps import embed_volumes
    from raytumor.train.trainer import load_best_model

    if top < 1:
        raise RaytumorError(f"--top: must be >= 1, got {top}")
    model, config = load_best_model(run_dir)
    if index is None:
        index = load_index(run_dir, config=config)
    device = device or default_device()
    model = model.to(device)
    searched, problems, chunks = [], [], []
    for start in range(0, len(scans), batch_size):
        volumes = []
        for image, mask in scans[start:start + batch_size]:
            try:
                volume = preprocess_scan(image, mask, config.data.shape)
            except ScanError as exc:
                problems.append(ScanProblem(str(image), exc.file, exc.reason))
            else:
                volumes.append(volume)
                searched.append((image, mask))
        if volumes:
            chunks.append(embed_volumes(model, np.stack(volumes), device, batch_size=batch_size))
    if not chunks:
        return SearchResults(pd.DataFrame(columns=list(RESULT_COLUMNS)), problems)
    frames = []
    for (image, mask), matches in zip(searched, index.search(np.concatenate(chunks), top)):
        matches.insert(0, "mask", "" if mask is None else str(mask))
        matches.insert(0, "query", str(image))
        frames.append(matches)
    return SearchResults(pd.concat(frames, ignore_index=True)[list(RESULT_COLUMNS)], problems)


def ensure_index(run_dir: str | os.PathLike, **build_kwargs) -> tuple[RetrievalIndex, bool]:
    """The run's current index, built first when absent or stale; returns ``(index, built)``."""
    from raytumor.train.trainer import load_best_model

    _, config = load_best_model(run_dir)
    try:
        return load_index(run_dir, config=config), False
    except IndexMissingError:
        return build_index(run_dir, **build_kwargs), True


def quarantine_csv_path(results_csv: str | os.PathLike) -> Path:
    """The bad scans of a batch go next to its matches: ``<results>-quarantine.csv``."""
    results_csv = Path(results_csv)
    return results_csv.with_name(f"{results_csv.stem}-quarantine.csv")


def default_csv_path(run_dir: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """``RUN/searches/<folder name>-<YYYYmmdd-HHMMSS>.csv``: a batch's results stay with the model that made them."""
    base = Path(run_dir) / "searches"
    stem = f"{Path(folder).resolve().name or 'scans'}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base / f"{stem}.csv", 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stem}-{n}.csv"
    return candidate


__all__ = [
    "RetrievalIndex",
    "IndexMissingError",
    "ScanError",
    "ScanProblem",
    "SearchResults",
    "build_index",
    "load_index",
    "ensure_index",
    "preprocess_scan",
    "find_scans",
    "search_scans",
    "default_csv_path",
    "quarantine_csv_path",
]
