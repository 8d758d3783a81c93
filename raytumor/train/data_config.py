"""How Ray Train hands the datasets to its workers.

Ray Train's ``DatasetManager`` actor unpickles this config, importing its module: kept free of
torch, that actor starts without it (1.4-2.0 CPU-s instead of 2.7-3.5 per fit here).
"""

from __future__ import annotations

import ray.train


def ingest_options():
    """Ray Train's default ingest options (``DataConfig.default_ingest_options``: this process's
    ``DataContext``), but with ``exclude_resources`` left out unless it is set. Ray 2.60's default
    passes it even at zero, and the deprecated setter then warned once in every fit's
    ``DatasetManager``: 5 RayDeprecationWarnings in one ``raytumor demo``."""
    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    current = DataContext.get_current().execution_options
    excluded = current.exclude_resources
    return ExecutionOptions(
        resource_limits=current.resource_limits,
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
        **({} if excluded == ExecutionResources.zero() else {"exclude_resources": excluded}),
    )


class ShardedTrainConfig(ray.train.DataConfig):
    """Worker ``i`` reads ``shards[i]`` as its ``train`` shard; every other dataset goes whole to
    every worker (only rank 0 reads ``reference`` and ``val``).

    Given pre-built shards (:func:`raytumor.train.datasets.class_stratified_shards`), no
    ``streaming_split`` coordinator actor starts: that actor's start took 1.4-3.4 s of a
    worker's time to first batch here (docs/benchmarks.md, figure 4). Without shards, or with a shard
    count that does not match the world size, Ray Train's own ``streaming_split`` is used.
    """

    def __init__(self, shards: list | None = None):
        super().__init__(datasets_to_split=["train"], execution_options=ingest_options())
        self._shards = shards

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if "train" not in datasets or self._shards is None or len(self._shards) != world_size:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        others = {name: ds for name, ds in datasets.items() if name != "train"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        for rank, shard in enumerate(self._shards):
            output[rank]["train"] = shard.iterator()
        return output
