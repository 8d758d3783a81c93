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


def read_stage_datasets(config: RunConfig, *, augmented: bool, pretraining: bool) -> dict:
    """Materialised Ray Datasets, read once from the cache: ``train``, ``val``,
    ``train_augmented`` (train + rare-case rows) and ``pretrain`` (train + unlabelled) as asked.

    A sweep reads them in its driver and hands them to every trial: Ray Data started inside
    a Tune trial is limited to the trial's (zero-CPU) reservation.
    """
    import ray

    prepared = ensure_prepared(config)
    rows = ray.data.read_parquet(str(prepared.shards)).select_columns(COLUMNS + ["split"]).materialize()
    out = {
        "train": _split(rows, "train").select_columns(COLUMNS).materialize(),
        "val": _split(rows, "val").select_columns(COLUMNS).materialize(),
    }
    rare = rare_labels(read_classes(config.data.dataset))
    if augmented and rare:
        from raytumor.data.rare_cases import augment_rare_cases

        extra = augment_rare_cases(prepared, rare, n=config.data.augment_n, seed=config.seed)
        if extra.n_rows:
            rows_extra = ray.data.read_parquet(str(extra.shards)).select_columns(COLUMNS)
            out["train_augmented"] = out["train"].union(rows_extra).materialize()
    if pretraining:
        splits = ("train", "unlabelled") if config.pretrain.use_unlabelled else ("train",)
        out["pretrain"] = _split(rows, *splits).select_columns(COLUMNS).materialize()
    return out


def _class_facts(config: RunConfig) -> tuple[int, tuple[int, ...]]:
    classes = read_classes(config.data.dataset)
    return int(classes["label"].max()) + 1, tuple(rare_labels(classes))


def training_inputs(config: RunConfig, shared: dict | None = None) -> StageInputs:
    """``train`` (sharded; + rare-case augmented rows when asked), ``reference`` = train, ``val``."""
    datasets = shared or read_stage_datasets(config, augmented=config.data.augment_rare, pretraining=False)
    train = datasets.get("train_augmented", datasets["train"]) if config.data.augment_rare else datasets["train"]
    num_classes, rare = _class_facts(config)
    return StageInputs(
        datasets={"train": train, "reference": datasets["train"], "val": datasets["val"]},
        num_classes=num_classes,
        rare_classes=rare,
        n_train_rows=train.count(),
    )


def pretraining_inputs(config: RunConfig, shared: dict | None = None) -> StageInputs:
    """Labelled train cases plus (optionally) the unlabelled pool; labels are not used."""
    datasets = shared if shared and "pretrain" in shared else read_stage_datasets(config, augmented=False, pretraining=True)
    num_classes, rare = _class_facts(config)
    return StageInputs(
        datasets={"train": datasets["pretrain"]},
        num_classes=num_classes,
        rare_classes=rare,
        n_train_rows=datasets["pretrain"].count(),
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
