"""Rare-case augmentation through Ray Data: only rare training cases, N flagged rows each, cached."""

from __future__ import annotations

import numpy as np
import pytest

from raytumor.data.augment import AugmentConfig, augment_case
from raytumor.data.manifest import read_manifest
from raytumor.data.preprocess import PrepareSettings, prepare_dataset
from raytumor.data.rare_cases import augment_rare_cases
from tests.conftest import make_dataset
from tests.data.test_preprocess import volume_encodings

pytestmark = pytest.mark.ray


def test_augmented_rows_come_from_rare_training_cases_only(ray_local, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(12, 5, 5), unlabelled=2)
    prepared = prepare_dataset(dataset, PrepareSettings(shape=(16, 16, 4)))
    manifest = read_manifest(dataset)
    rare = [1, 2]
    rows = augment_rare_cases(prepared, rare, n=3, seed=7)
    expected_sources = manifest[(manifest["split"] == "train") & manifest["label"].isin(rare)]["case_id"]
    assert rows.n_source_cases == len(expected_sources) and rows.n_rows == 3 * len(expected_sources)

    augmented = ray_local.data.read_parquet(str(rows.shards)).to_pandas()
    assert volume_encodings(rows.shards) == {"PLAIN"}
    assert len(augmented) == rows.n_rows and augmented["augmented"].all()
    assert set(augmented["split"]) == {"train"} and set(augmented["label"]) <= set(rare)
    sources = {case.split("#aug")[0] for case in augmented["case_id"]}
    assert sources == set(expected_sources)

    # Same rows as the pure function with the same per-case seeds, whatever the partitioning.
    original = ray_local.data.read_parquet(str(prepared.shards)).to_pandas().set_index("case_id")
    case = sorted(sources)[0]
    expected = augment_case(np.asarray(original.loc[case, "volume"]), 3, 7, case, AugmentConfig())
    got = augmented.set_index("case_id")
    for k in range(3):
        np.testing.assert_allclose(np.asarray(got.loc[f"{case}#aug{k}", "volume"]), expected[k], atol=1e-6)

    again = augment_rare_cases(prepared, rare, n=3, seed=7)
    assert again.cached and again.path == rows.path
    assert augment_rare_cases(prepared, rare, n=2, seed=7).path != rows.path
