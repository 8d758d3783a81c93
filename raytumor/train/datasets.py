"""Ray Datasets for the training stages, read from the preprocessing cache, and worker-side loading."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raytumor.config import RunConfig
from raytumor.data.manifest import rare_labels, read_classes
from raytumor.data.preprocess import PrepareSettings, PreparedDataset, find_prepared, prepare_dataset

COLUMNS = ["case_id", "label", "volume"]


@dataclass(frozen=True)
class StageInputs:
    """What a training stage needs besides the config: Ray Datasets and the class table facts."""

    datasets: dict
    num_classes: int
    rare_classes: tuple[int, ...]
    n_train_rows: int


def ensure_prepared(config: RunConfig) -> PreparedDataset:
    """The preprocessing cache for the config's dataset and shape (built when missing)."""
    settings = PrepareSettings(shape=tuple(config.data.shape))
    return find_prepared(config.data.dataset, settings) or prepare_dataset(config.data.dataset, settings)


def _split(ds, *splits: str):
    from ray.data.expressions import col

    return ds.filter(expr=col("split").is_in(list(splits)))


def training_inputs(config: RunConfig) -> StageInputs:
    """``train`` (sharded; + rare-case augmented rows when asked), ``reference`` = train, ``val``."""
    import ray

    prepared = ensure_prepared(config)
    classes = read_classes(config.data.dataset)
    rare = tuple(rare_labels(classes))
    rows = ray.data.read_parquet(str(prepared.shards)).select_columns(COLUMNS + ["split"]).materialize()
    reference = _split(rows, "train").select_columns(COLUMNS).materialize()
    train = reference
    if config.data.augment_rare and rare:
        from raytumor.data.rare_cases import augment_rare_cases

        augmented = augment_rare_cases(prepared, rare, n=config.data.augment_n, seed=config.seed)
        if augmented.n_rows:
            extra = ray.data.read_parquet(str(augmented.shards)).select_columns(COLUMNS)
            train = reference.union(extra).materialize()
    val = _split(rows, "val").select_columns(COLUMNS).materialize()
    return StageInputs(
        datasets={"train": train, "reference": reference, "val": val},
        num_classes=int(classes["label"].max()) + 1,
        rare_classes=rare,
        n_train_rows=train.count(),
    )


def pretraining_inputs(config: RunConfig) -> StageInputs:
    """Labelled train cases plus (optionally) the unlabelled pool; labels are not used."""
    import ray

    prepared = ensure_prepared(config)
    splits = ("train", "unlabelled") if config.pretrain.use_unlabelled else ("train",)
    rows = ray.data.read_parquet(str(prepared.shards)).select_columns(COLUMNS + ["split"])
    train = _split(rows, *splits).select_columns(COLUMNS).materialize()
    classes = read_classes(config.data.dataset)
    return StageInputs(
        datasets={"train": train},
        num_classes=int(classes["label"].max()) + 1,
        rare_classes=tuple(rare_labels(classes)),
        n_train_rows=train.count(),
    )


def load_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Dataset or DataIterator (a worker's shard) -> ``(volumes (N,2,X,Y,Z) float32, labels (N,))``.

    The shard is read once per run and kept in memory: class-balanced batches need random
    access per class, and later epochs then never wait for input.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per worker is noise
    volumes, labels = [], []
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        volumes.append(np.asarray(batch["volume"], dtype=np.float32))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    if not volumes:
        return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.concatenate(volumes), np.concatenate(labels)
