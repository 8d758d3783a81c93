"""P x K class-balanced batches: every class in a batch has >= 2 rows, rare classes visited."""

from __future__ import annotations

import numpy as np
import pytest

from raytumor.train.sampler import PKBatchSampler, ShuffledBatchSampler


def imbalanced_labels():
    counts = {0: 200, 1: 100, 2: 3, 3: 2, 4: 50, 5: 1}
    return np.concatenate([np.full(n, c) for c, n in counts.items()])


def test_every_batch_is_p_classes_by_k_rows():
    labels = imbalanced_labels()
    sampler = PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=0)
    assert len(sampler) == int(np.ceil(len(labels) / 12))
    for batch in sampler:
        assert len(batch) == 12
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and np.all(counts == 3)


def test_rare_classes_are_visited_and_singletons_skipped():
    labels = imbalanced_labels()
    seen = np.zeros(6, dtype=int)
    sampler = PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=1, steps=200)
    for batch in sampler:
        seen[np.unique(labels[batch])] += 1
    # uniform over eligible classes: the 2- and 3-row classes as often as the 200-row one
    assert seen[2] > 100 and seen[3] > 100 and seen[0] > 100
    assert seen[5] == 0  # a single row cannot be its own positive
    # a class with >= K rows is drawn without replacement inside a batch
    for batch in PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=2, steps=50):
        rows_of_2 = batch[labels[batch] == 2]
        if len(rows_of_2):
            assert len(set(rows_of_2)) == 3


def test_state_round_trip_replays_the_same_batches():
    labels = imbalanced_labels()
    a = PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=3)
    list(a)
    state = a.state()
    after = [b.copy() for b in a]
    b = PKBatchSampler(labels, batch_size=12, samples_per_class=3, seed=99)
    b.load_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(after, b))


def test_too_few_classes_is_an_error():
    with pytest.raises(ValueError, match="classes"):
        PKBatchSampler(np.array([0, 0, 1]), batch_size=6, samples_per_class=2, seed=0)


def test_shuffled_batches_cover_rows_without_repeats_within_an_epoch():
    sampler = ShuffledBatchSampler(10, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    flat = np.concatenate(batches)
    assert len(set(flat)) == 8
