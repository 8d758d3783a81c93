"""Class-balanced P x K batches, built on each Ray Train worker's in-memory shard.

``ray.train.torch.prepare_data_loader`` would replace a custom sampler with a
DistributedSampler, so batching happens here, after Ray Data has sharded the rows.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


class PKBatchSampler:
    """Batches of ``P = batch_size // samples_per_class`` classes x ``K = samples_per_class`` rows.

    Each batch draws P distinct classes uniformly from the classes with >= 2 rows (so rare
    classes are visited as often as common ones and every anchor has a positive), then K
    rows of each, without replacement when the class has >= K rows. An epoch is
    ``ceil(len(labels) / batch_size)`` batches, or ``steps`` when given (so every
    distributed rank runs the same number). The RNG state can be saved and restored.
    """

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int, seed: int, steps: int | None = None):
        labels = np.asarray(labels).astype(np.int64)
        if samples_per_class < 2:
            raise ValueError("samples_per_class must be >= 2 so every anchor has a positive")
        self.k = samples_per_class
        self.p = max(2, batch_size // samples_per_class)
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.eligible = np.array(sorted(c for c, rows in self.by_class.items() if len(rows) >= 2), dtype=np.int64)
        if len(self.eligible) < 2:
            raise ValueError(f"need >= 2 classes with >= 2 rows each for P x K batches, got {len(self.eligible)}")
        self.steps = steps if steps is not None else max(1, int(np.ceil(len(labels) / batch_size)))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[np.ndarray]:
        p = min(self.p, len(self.eligible))
        for _ in range(self.steps):
            classes = self.rng.choice(self.eligible, size=p, replace=False)
            batch = [
                self.rng.choice(self.by_class[int(c)], size=self.k, replace=len(self.by_class[int(c)]) < self.k)
                for c in classes
            ]
            yield np.concatenate(batch)

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class ShuffledBatchSampler:
    """Plain shuffled batches (pre-training: every volume is its own class)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, steps: int | None = None):
        if n_rows < 2:
            raise ValueError(f"need >= 2 rows to form contrastive batches, got {n_rows}")
        self.n_rows = n_rows
        self.batch_size = min(batch_size, n_rows)
        self.steps = steps if steps is not None else max(1, n_rows // self.batch_size)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[np.ndarray]:
        order, position = self.rng.permutation(self.n_rows), 0
        for _ in range(self.steps):
            if position + self.batch_size > self.n_rows:
                order, position = self.rng.permutation(self.n_rows), 0
            yield order[position : position + self.batch_size]
            position += self.batch_size

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
