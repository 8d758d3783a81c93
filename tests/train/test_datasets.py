"""Per-worker training shards: class-stratified, and handed to Ray Train without a split coordinator."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from raytumor.train.data_config import ShardedTrainConfig
from raytumor.train.datasets import class_stratified_shards, load_arrays

pytestmark = pytest.mark.ray


def labelled_rows(ray, counts: dict[int, int]):
    """A materialised dataset with ``counts[label]`` rows per label, labels interleaved in row order."""
    labels = np.concatenate([np.full(n, label) for label, n in counts.items()])
    order = np.random.default_rng(0).permutation(len(labels))
    rows = [{"case_id": f"case-{i:03d}", "label": int(labels[i]), "volume": np.full((1, 2, 2, 2), i, dtype=np.float32)}
            for i in order]
    return ray.data.from_items(rows, override_num_blocks=4).materialize()


def ids_and_labels(ds) -> tuple[list[str], np.ndarray]:
    frame = ds.select_columns(["case_id", "label"]).to_pandas()
    return frame["case_id"].tolist(), frame["label"].to_numpy()


def test_shards_spread_every_class_evenly_and_keep_every_row(ray_local):
    counts = {0: 20, 1: 9, 2: 4, 3: 1}  # a rare class with 2 rows per worker, and a singleton
    ds = labelled_rows(ray_local, counts)
    shards = class_stratified_shards(ds, 2)
    assert len(shards) == 2
    ids = [ids_and_labels(shard) for shard in shards]
    every_id = sorted(i for shard_ids, _ in ids for i in shard_ids)
    assert every_id == sorted(ids_and_labels(ds)[0])  # nothing dropped, nothing twice
    for label, n in counts.items():
        per_shard = [int((labels == label).sum()) for _, labels in ids]
        assert sorted(per_shard) == sorted([n // 2, n - n // 2]), (label, per_shard)
    assert abs(len(ids[0][0]) - len(ids[1][0])) <= 1

    # Three shards: per-class counts still differ by at most one; the cut is the same every time.
    three = [ids_and_labels(shard) for shard in class_stratified_shards(ds, 3)]
    for label in counts:
        per_shard = [int((labels == label).sum()) for _, labels in three]
        assert max(per_shard) - min(per_shard) <= 1
    again = [ids_and_labels(shard)[0] for shard in class_stratified_shards(ds, 3)]
    assert [sorted(x) for x in again] == [sorted(x) for x, _ in three]

    (whole,) = class_stratified_shards(ds, 1)
    assert sorted(ids_and_labels(whole)[0]) == every_id
    with pytest.raises(ValueError, match="at least one shard"):
        class_stratified_shards(ds, 0)


def test_load_arrays_gives_the_same_rows_whatever_the_block_order(ray_local):
    # Ray Data keeps no block order: under load, a materialised read came back in another order
    # (3 of 3 reads with 3 busy processes beside it), and a seeded sampler then drew other batches.
    ds = labelled_rows(ray_local, {0: 20, 1: 9, 2: 4})
    volumes, labels = load_arrays(ds)
    ids, id_labels = ids_and_labels(ds)
    by_id = dict(zip(ids, id_labels))
    expected_ids = sorted(ids)
    assert labels.tolist() == [by_id[i] for i in expected_ids]
    # Each row's volume is filled with its case number, so the volumes follow the ids too.
    assert volumes[:, 0, 0, 0, 0].tolist() == [float(i.removeprefix("case-")) for i in expected_ids]
    for seed in (0, 2, 3):  # seed 1 keeps these 4 blocks in order
        shuffled = ds.randomize_block_order(seed=seed).materialize()
        assert ids_and_labels(shuffled)[0] != ids  # the blocks really came in another order
        other_volumes, other_labels = load_arrays(shuffled)
        np.testing.assert_array_equal(other_volumes, volumes)
        np.testing.assert_array_equal(other_labels, labels)


def test_sharded_train_config_gives_each_worker_its_shard(ray_local):
    from ray.data._internal.iterator.stream_split_iterator import StreamSplitDataIterator

    ds = labelled_rows(ray_local, {0: 6, 1: 6})
    val = labelled_rows(ray_local, {0: 2, 1: 2})
    shards = class_stratified_shards(ds, 2)
    out = ShardedTrainConfig(shards).configure({"train": ds, "val": val}, world_size=2, worker_handles=None,
                                               worker_node_ids=None)
    assert len(out) == 2
    for rank in range(2):
        volumes, labels = load_arrays(out[rank]["train"])
        expected_volumes, expected_labels = load_arrays(shards[rank])
        np.testing.assert_array_equal(np.sort(volumes.ravel()), np.sort(expected_volumes.ravel()))
        assert sorted(labels) == sorted(expected_labels) and len(labels) == 6
        assert len(load_arrays(out[rank]["val"])[1]) == 4  # the other datasets whole, to every worker
        assert not isinstance(out[rank]["train"], StreamSplitDataIterator)

    # Shards for another world size (or none): Ray Train's own streaming_split.
    fallback = ShardedTrainConfig(shards).configure({"train": ds}, world_size=3, worker_handles=None,
                                                    worker_node_ids=None)
    try:
        assert len(fallback) == 3 and all(isinstance(o["train"], StreamSplitDataIterator) for o in fallback)
    finally:
        ray_local.kill(fallback[0]["train"]._coord_actor)


def test_read_stage_datasets_cuts_quiet_shards_per_worker(ray_local, tmp_path):
    import logging

    from ray.util.debug import reset_log_once

    from raytumor.config import load_config
    from raytumor.train.datasets import read_stage_datasets, training_inputs
    from tests.conftest import make_dataset

    dataset = make_dataset(tmp_path / "ds", n_per_class=(6, 6, 6), shape=(8, 8, 2), unlabelled=3)
    config = load_config(overrides=[f"data.dataset={dataset}", "data.shape=[8,8,2]", "resources.num_workers=2",
                                    "pretrain.use_unlabelled=true"])
    context = ray_local.data.DataContext.get_current()
    context.enable_progress_bars = True  # as the CLI's driver has them
    ray_data_warnings = []

    class Warnings(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                ray_data_warnings.append(record.getMessage())

    handler = Warnings()
    logging.getLogger("ray.data").addHandler(handler)
    reset_log_once("ray_data_progress_manager_disabled")  # Ray Data gives it once per process
    try:
        read = read_stage_datasets(config, augmented=False, pretraining=True)
        assert context.enable_progress_bars is True  # the driver's own setting untouched
        alone = training_inputs(config)  # `raytumor train`: its own read, its shards cut in the driver
    finally:
        context.enable_progress_bars = False
        logging.getLogger("ray.data").removeHandler(handler)
    # The driver ran every job with its bars: no "Progress bars disabled" for the user to puzzle over.
    assert not [w for w in ray_data_warnings if "Progress bars" in w], ray_data_warnings
    assert len(alone.train_shards) == 2 and not any(shard.context.enable_progress_bars for shard in alone.train_shards)
    assert sorted(read["shards"]) == ["pretrain", "train"]
    for name, shards in read["shards"].items():
        assert len(shards) == 2
        shard_ids = sorted(i for shard in shards for i in ids_and_labels(shard)[0])
        assert shard_ids == sorted(ids_and_labels(read[name])[0])
    # Workers read these: Ray Data's progress bars are off in each dataset's own context.
    quiet = [read["train"], read["val"], read["pretrain"], *read["shards"]["train"], *read["shards"]["pretrain"]]
    assert not any(ds.context.enable_progress_bars for ds in quiet)

    inputs = training_inputs(config, read)
    assert inputs.train_shards is read["shards"]["train"] and inputs.n_train_rows == read["train"].count()


def test_back_to_back_dataset_jobs_do_not_warn_of_a_hang(ray_local, tmp_path, monkeypatch):
    """Ray Data warns "The Dataset job will hang" when a job starts while Ray's resource view
    shows no free CPU. The CPUs of the job just before come back to that view 20-50 ms later:
    2 of 5 reads of the demo data drew the warning. Here the view lags 50 ms after every job."""
    import logging
    import time

    import ray
    from ray.util.debug import reset_log_once

    from raytumor.config import load_config
    from raytumor.train.datasets import read_stage_datasets
    from tests.conftest import make_dataset

    dataset = make_dataset(tmp_path / "ds", n_per_class=(6, 6, 6), shape=(8, 8, 2), unlabelled=3)
    config = load_config(overrides=[f"data.dataset={dataset}", "data.shape=[8,8,2]", "resources.num_workers=2"])
    stale_until = [0.0]
    real_view, real_materialize = ray.available_resources, ray.data.Dataset.materialize

    def lagging_view():
        view = real_view()
        return {**view, "CPU": 0.0} if time.monotonic() < stale_until[0] else view

    def materialize(self):
        done = real_materialize(self)
        stale_until[0] = time.monotonic() + 0.05
        return done

    monkeypatch.setattr(ray, "available_resources", lagging_view)
    monkeypatch.setattr(ray.data.Dataset, "materialize", materialize)
    warnings = []

    class HangWarnings(logging.Handler):
        def emit(self, record):
            if "will hang" in record.getMessage():
                warnings.append(record.getMessage())

    handler = HangWarnings()
    logging.getLogger("ray.data").addHandler(handler)
    reset_log_once("cpu_warning")  # Ray Data gives it once per process
    try:
        read = read_stage_datasets(config, augmented=False, pretraining=True)
    finally:
        logging.getLogger("ray.data").removeHandler(handler)
    assert warnings == [] and len(read["shards"]["pretrain"]) == 2


def test_wait_for_free_cpu_polls_rays_view_until_a_cpu_is_free(monkeypatch):
    import ray

    from raytumor.runtime import wait_for_free_cpu

    views = iter([{"CPU": 0.0}, {}, {"CPU": 0.0}, {"CPU": 1.0}])
    monkeypatch.setattr(ray, "available_resources", lambda: next(views))
    assert wait_for_free_cpu(timeout_s=5, poll_s=0) is True
    assert next(views, "used up") == "used up"
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0, "GPU": 1.0})
    assert wait_for_free_cpu(timeout_s=0.05, poll_s=0.01) is False


def test_the_dataset_manager_unpickles_the_data_config_without_torch(tmp_path):
    """Ray Train's DatasetManager actor unpickles the trainer's data config: its module must not
    pull torch into that process (about 1 CPU-s per fit). Resolving a dataset's options there
    warns nothing: Ray 2.60's default options set the deprecated ``exclude_resources``."""
    import ray.cloudpickle

    (tmp_path / "config.pkl").write_bytes(ray.cloudpickle.dumps(ShardedTrainConfig(None)))
    code = (f"import pickle, sys, warnings; config = pickle.loads(open({str(tmp_path / 'config.pkl')!r}, 'rb').read()); "
            "assert type(config).__name__ == 'ShardedTrainConfig'; assert 'torch' not in sys.modules, 'torch imported'\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    config._resolve_execution_options('val')\n"
            "assert not [w for w in caught if 'exclude_resources' in str(w.message)], [str(w.message) for w in caught]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_data_config_keeps_ray_trains_default_ingest_options():
    import ray.train

    assert ShardedTrainConfig()._resolve_execution_options("val") == \
        ray.train.DataConfig()._resolve_execution_options("val")
