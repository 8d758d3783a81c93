"""Ray Datasets for the training stages, read from the preprocessing cache, and worker-side loading."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raytumor.config import RunConfig
from raytumor.data.manifest import rare_labels, read_classes
from raytumor.data.preprocess import PrepareSettings, PreparedDataset, prepare_dataset, read_shards
from raytumor.runtime import wait_for_free_cpu

COLUMNS = ["case_id", "label", "volume"]


@dataclass(frozen=True)
class StageInputs:
    """What a training stage needs besides the config: Ray Datasets and the class table facts.

    ``train_shards``: one materialised shard of ``datasets["train"]`` per worker
    (:func:`class_stratified_shards`), or None to let Ray Train split it.
    """

    datasets: dict
    num_classes: int
    rare_classes: tuple[int, ...]
    n_train_rows: int
    train_shards: list | None = None


def ensure_prepared(config: RunConfig) -> PreparedDataset:
    """The preprocessing cache for the config's dataset and shape (built when missing)."""
    settings = PrepareSettings(shape=tuple(config.data.shape))
    return prepare_dataset(config.data.dataset, settings)  # a cache hit when one matches


def _materialize(ds):
    """``ds.materialize()`` once the previous job's CPUs are back (``wait_for_free_cpu``)."""
    wait_for_free_cpu()
    return ds.materialize()


def _split(ds, *splits: str):
    from ray.data.expressions import col

    return ds.filter(expr=col("split").is_in(list(splits)))


def class_stratified_shards(ds, n: int) -> list:
    """``ds`` cut into ``n`` materialised shards, every class dealt round-robin over them.

    Rows sorted by (label, case_id) go to shard 0, 1, ..., n-1, 0, ... in turn, so each
    class's rows on any two shards differ by at most one, and so do the shard sizes: a rare
    class with 2n rows gives every worker the positive pair a P x K batch needs, where a
    split by blocks could leave a worker with none of it. No row is dropped. Runs Ray Data
    tasks, so call it where CPUs are free (a driver, not a zero-CPU Tune trial).
    """
    from ray.data.expressions import col

    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    if n == 1:
        return [_read_by_workers(_materialize(ds))]
    rows = ds.select_columns(["case_id", "label"]).to_pandas().sort_values(["label", "case_id"], kind="stable")
    ids = rows["case_id"].astype(str).to_numpy()
    shard_of = np.arange(len(ids)) % n
    return [_read_by_workers(_materialize(ds.filter(expr=col("case_id").is_in(ids[shard_of == i].tolist()))))
            for i in range(n)]


def _read_by_workers(ds):
    """``ds`` (materialised, so with a DataContext of its own) with Ray Data's progress bars off:
    Train workers read it, where a bar per worker and dataset is noise in the driver's log. An
    iterator runs with its dataset's DataContext, so the worker's own setting does not apply."""
    ds.context.enable_progress_bars = False
    return ds


TRAINING_SETS = ("train", "train_augmented", "pretrain")


def read_stage_datasets(config: RunConfig, *, augmented: bool, pretraining: bool,
                        shard: tuple[str, ...] = TRAINING_SETS) -> dict:
    """Materialised Ray Datasets, read once from the cache: ``train``, ``val``,
    ``train_augmented`` (train + rare-case rows) and ``pretrain`` (train + unlabelled) as asked.
    ``shards`` maps the name of each training set in ``shard`` to its
    :func:`class_stratified_shards`, one per worker of ``config.resources``.

    A sweep reads them in its driver and hands them to every trial: Ray Data started inside
    a Tune trial is limited to the trial's (zero-CPU) reservation.
    """
    prepared = ensure_prepared(config)
    rows = _materialize(read_shards(prepared.shards).select_columns(COLUMNS + ["split"]))
    out = {
        "train": _materialize(_split(rows, "train").select_columns(COLUMNS)),
        "val": _materialize(_split(rows, "val").select_columns(COLUMNS)),
    }
    rare = rare_labels(read_classes(config.data.dataset))
    if augmented and rare:
        from raytumor.data.rare_cases import augment_rare_cases

        extra = augment_rare_cases(prepared, rare, n=config.data.augment_n, seed=config.seed)
        if extra.n_rows:
            rows_extra = read_shards(extra.shards).select_columns(COLUMNS)
            out["train_augmented"] = _materialize(out["train"].union(rows_extra))
    if pretraining:
        splits = ("train", "unlabelled") if config.pretrain.use_unlabelled else ("train",)
        out["pretrain"] = _materialize(_split(rows, *splits).select_columns(COLUMNS))
    # Cut before the progress bars go off: the cutting runs Ray Data jobs here, in the driver,
    # where a dataset without bars logs Ray Data's "Progress bars disabled" warning.
    # Without rare rows to add, train is what an augmented run trains on.
    to_shard = {name if name in out else "train" for name in shard if name in out or name == "train_augmented"}
    shards = {name: class_stratified_shards(out[name], config.resources.num_workers) for name in sorted(to_shard)}
    return {**{name: _read_by_workers(ds) for name, ds in out.items()}, "shards": shards}


def _class_facts(config: RunConfig) -> tuple[int, tuple[int, ...]]:
    classes = read_classes(config.data.dataset)
    return int(classes["label"].max()) + 1, tuple(rare_labels(classes))


def training_inputs(config: RunConfig, shared: dict | None = None) -> StageInputs:
    """``train`` (sharded; + rare-case augmented rows when asked), ``reference`` = train, ``val``.

    ``shared`` (a sweep's) carries its shards; datasets read here get theirs cut here, in the driver.
    """
    wanted = "train_augmented" if config.data.augment_rare else "train"
    datasets = shared or read_stage_datasets(config, augmented=config.data.augment_rare, pretraining=False,
                                             shard=(wanted,))
    name = wanted if wanted in datasets else "train"
    shards = datasets.get("shards", {}).get(name)
    return _stage_inputs(config, datasets[name], shards, {"reference": datasets["train"], "val": datasets["val"]})


def pretraining_inputs(config: RunConfig, shared: dict | None = None) -> StageInputs:
    """Labelled train cases plus (optionally) the unlabelled pool; labels are not used."""
    if shared and "pretrain" in shared:
        return _stage_inputs(config, shared["pretrain"], shared.get("shards", {}).get("pretrain"), {})
    datasets = read_stage_datasets(config, augmented=False, pretraining=True, shard=("pretrain",))
    return _stage_inputs(config, datasets["pretrain"], datasets["shards"]["pretrain"], {})


def _stage_inputs(config: RunConfig, train, shards: list | None, others: dict) -> StageInputs:
    num_classes, rare = _class_facts(config)
    return StageInputs(
        datasets={"train": train, **others},
        num_classes=num_classes,
        rare_classes=rare,
        n_train_rows=train.count(),
        train_shards=shards,
    )


def load_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """A Ray Dataset or DataIterator (a worker's shard) -> ``(volumes (N,2,X,Y,Z) float32, labels (N,))``,
    rows in ``case_id`` order.

    The shard is read once per run and kept in memory: class-balanced batches need random
    access per class, and later epochs then never wait for input. Ray Data keeps no block order
    (``preserve_order`` is off), and a seeded sampler draws row indices, so rows are put in
    ``case_id`` order: the same seed then trains on the same batches in every run.
    """
    volumes, labels, case_ids = [], [], []
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        volumes.append(np.asarray(batch["volume"], dtype=np.float32))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
        case_ids.append(np.asarray(batch["case_id"]).astype(str))
    if not volumes:
        return np.zeros((0,), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    order = np.argsort(np.concatenate(case_ids), kind="stable")
    # Each batch is scattered to its sorted rows: no second full-size copy, as a concatenate
    # followed by a take would make.
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    out = np.empty((len(order), *volumes[0].shape[1:]), dtype=np.float32)
    start = 0
    for batch_volumes in volumes:
        out[position[start:start + len(batch_volumes)]] = batch_volumes
        start += len(batch_volumes)
    return out, np.concatenate(labels)[order]
