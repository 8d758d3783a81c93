"""Rare-case augmentation materialised through Ray Data (paper, section 3).

For every rare-class *training* case, N independent random augmentation sequences become N
extra rows flagged ``augmented``; val, test and the unlabelled pool are never augmented.
The rows are cached next to the preprocessing cache, keyed by N, seed and settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from raytumor.data.augment import AugmentConfig, augment_case
from raytumor.data.preprocess import META_FILE, SHARD_PARQUET_OPTIONS, SHARDS_DIR, PreparedDataset, read_shards
from raytumor.runtime import wait_for_free_cpu
from raytumor.storage import atomic_path, atomic_write_text


@dataclass(frozen=True)
class AugmentedRows:
    path: Path
    n_source_cases: int
    n_rows: int
    cached: bool

    @property
    def shards(self) -> Path:
        return self.path / SHARDS_DIR


def augment_rows_batch(batch: dict[str, np.ndarray], n: int, seed: int, config: AugmentConfig) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: each input row -> its ``n`` augmented copies.

    Seeds derive from (seed, case_id, k), so the rows do not depend on partitioning.
    """
    out: dict[str, list] = {key: [] for key in batch}
    for i, case_id in enumerate(batch["case_id"]):
        copies = augment_case(np.array(batch["volume"][i]), n, seed, str(case_id), config)
        for k, volume in enumerate(copies):
            for key in batch:
                out[key].append(batch[key][i])
            out["case_id"][-1] = f"{case_id}#aug{k}"
            out["augmented"][-1] = True
            out["volume"][-1] = volume
    if not out["case_id"]:
        return {key: np.asarray(values)[:0] for key, values in batch.items()}
    return {key: np.stack(values) if key == "volume" else np.asarray(values) for key, values in out.items()}


def _key(n: int, seed: int, config: AugmentConfig, rare: Iterable[int]) -> str:
    text = json.dumps({"n": n, "seed": seed, "config": asdict(config), "rare": sorted(int(r) for r in rare)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def augment_rare_cases(
    prepared: PreparedDataset,
    rare_classes: Iterable[int],
    *,
    n: int = 5,
    seed: int = 0,
    config: AugmentConfig = AugmentConfig(),
    batch_size: int = 4,
) -> AugmentedRows:
    """Write ``n`` augmented copies of each rare-class training case as Parquet shards (cached)."""
    from ray.data.expressions import col

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rare = sorted({int(r) for r in rare_classes})
    target = prepared.path / f"augmented-{_key(n, seed, config, rare)}"
    if (target / META_FILE).is_file():
        meta = json.loads((target / META_FILE).read_text())
        return AugmentedRows(target, meta["n_source_cases"], meta["n_rows"], cached=True)
    source = read_shards(prepared.shards).filter(
        expr=(col("split") == "train") & col("label").is_in(rare)
    )
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        wait_for_free_cpu()  # the preprocessing job just before may still hold its CPUs
        n_source = source.count()
        if n_source:
            augmented = source.map_batches(
                augment_rows_batch, fn_kwargs={"n": n, "seed": seed, "config": config},
                batch_size=batch_size, batch_format="numpy",
            )
            augmented.write_parquet(str(tmp / SHARDS_DIR), **SHARD_PARQUET_OPTIONS)
        else:
            (tmp / SHARDS_DIR).mkdir()
        meta = {"n": n, "seed": seed, "config": asdict(config), "rare_classes": rare, "n_source_cases": n_source,
                "n_rows": n_source * n, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2))
    return AugmentedRows(target, n_source, n_source * n, cached=False)
