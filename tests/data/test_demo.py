"""The demo dataset generator: contract format, Table 1 counts, masks, orientation, determinism."""

from __future__ import annotations

import itertools
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from raytumor.data.demo import (
    DemoSummary,
    demo_classes,
    load_anatomy,
    make_demo_dataset,
    render_case,
    sample_case,
)
from raytumor.data.manifest import read_classes, read_manifest
from raytumor.errors import ConfigError, DatasetError

SHAPE = (24, 24, 8)
SCALE = 0.02
UNLABELLED = 6
SEED = 3
TINY_SHAPE = (8, 8, 4)
MINIMUM = {"train": 3, "val": 1, "test": 1}


def table1() -> pd.DataFrame:
    with resources.files("raytumor.data").joinpath("table1.csv").open("r") as handle:
        return pd.read_csv(handle)


def voxels(dataset: Path, path: str) -> np.ndarray:
    return np.asarray(nib.load(dataset / path).dataobj)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, DemoSummary, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo") / "ds"
    summary = make_demo_dataset(out, scale=SCALE, seed=SEED, unlabelled=UNLABELLED, shape=SHAPE)
    return out, summary, read_manifest(out)


def test_counts_per_class_and_split_follow_table1(demo):
    _, summary, manifest = demo
    labelled = manifest[manifest["split"] != "unlabelled"]
    got = labelled.groupby(["label", "split"]).size()
    for row in table1().to_dict("records"):
        for split in ("train", "val", "test"):
            expected = max(int(np.floor(row[split] * SCALE + 0.5)), MINIMUM[split])  # round half up
            assert got.get((row["class"], split), 0) == expected, (row["class"], split)
    assert summary.n_labelled == len(labelled)
    assert summary.n_unlabelled == UNLABELLED
    assert summary.counts == manifest["split"].value_counts().to_dict()


def test_class_table_has_the_rare_flags_of_table1(demo):
    out, _, manifest = demo
    classes = read_classes(out)
    table = table1()
    assert classes["label"].tolist() == list(range(27))
    assert classes["rare"].tolist() == table["rare"].astype(bool).tolist()
    assert classes["rare"].sum() == 13
    assert classes["name"].is_unique
    counts = manifest[manifest["label"].notna()]["label"].astype(int).value_counts().sort_index()
    assert classes["count"].tolist() == counts.tolist()
    names = manifest.dropna(subset=["label"]).drop_duplicates("label").set_index("label")["label_name"]
    assert all(names[label] == name for label, name in zip(classes["label"], classes["name"]))


def test_labelled_cases_have_a_nonempty_mask_on_the_image_grid(demo):
    out, _, manifest = demo
    labelled = manifest[manifest["split"] != "unlabelled"]
    assert (labelled["mask_kind"] == "ground_truth").all()
    assert (labelled["source"] == "demo").all()
    assert labelled["patient_id"].str.fullmatch(r"demo-p\d{5}").all() and labelled["patient_id"].is_unique
    for row in labelled.itertuples(index=False):
        assert not Path(row.image).is_absolute() and not Path(row.mask).is_absolute()
        image, mask = nib.load(out / row.image), nib.load(out / row.mask)
        assert image.shape == mask.shape == SHAPE
        np.testing.assert_allclose(image.affine, mask.affine)
        data = np.asarray(mask.dataobj)
        assert data.dtype == np.uint8
        assert set(np.unique(data)) == {0, 1}


def test_unlabelled_rows_have_no_label_and_no_mask(demo):
    out, _, manifest = demo
    pool = manifest[manifest["split"] == "unlabelled"]
    assert len(pool) == UNLABELLED
    assert pool["label"].isna().all()
    assert pool["label_name"].isna().all()
    assert pool["mask"].isna().all()
    assert pool["mask_kind"].isna().all()
    assert all((out / path).is_file() for path in pool["image"])


def test_images_are_finite_whole_brain_volumes(demo):
    out, _, manifest = demo
    for path in manifest["image"]:
        image = nib.load(out / path)
        assert image.get_data_dtype() == np.int16
        data = np.asarray(image.get_fdata())
        assert data.shape == SHAPE
        assert np.isfinite(data).all()
        assert data.std() > 0
        # The brain fills the field of view but leaves a dark border of background.
        brain = data > 0.3 * np.percentile(data, 95)
        assert 0.2 < brain.mean() < 0.9


def test_some_cases_are_stored_in_lps_and_reorient_to_the_ras_render(demo):
    out, _, manifest = demo
    codes = ["".join(nib.aff2axcodes(nib.load(out / path).affine)) for path in manifest["image"]]
    assert "RAS" in codes
    non_ras = [i for i, code in enumerate(codes) if code != "RAS"]
    assert 0.03 < len(non_ras) / len(codes) < 0.25
    labelled_non_ras = [i for i in non_ras if manifest["split"].iloc[i] != "unlabelled"]
    index = labelled_non_ras[0]
    row = manifest.iloc[index]
    anatomy = load_anatomy(SHAPE)
    params = sample_case(demo_classes()[int(row["label"])], anatomy.fov_mm, np.random.default_rng([SEED, index]))
    image, mask = render_case(params, anatomy)
    for stored, expected in ((row["image"], image), (row["mask"], mask)):
        canonical = nib.as_closest_canonical(nib.load(out / stored))
        assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
        np.testing.assert_array_equal(np.asarray(canonical.dataobj), expected)
        np.testing.assert_allclose(canonical.affine, anatomy.affine, atol=1e-3)


def test_same_seed_gives_identical_voxels_and_another_seed_does_not(demo, tmp_path):
    out, _, manifest = demo
    again = make_demo_dataset(tmp_path / "again", scale=SCALE, seed=SEED, unlabelled=UNLABELLED, shape=SHAPE)
    assert read_manifest(again.out_dir).equals(manifest)
    for column in ("image", "mask"):
        for path in manifest[column].dropna():
            np.testing.assert_array_equal(voxels(out, path), voxels(again.out_dir, path))

    other = make_demo_dataset(tmp_path / "other", scale=SCALE, seed=SEED + 1, unlabelled=0, shape=SHAPE)
    first = manifest["image"].iloc[:5]
    assert all(not np.array_equal(voxels(out, p), voxels(other.out_dir, p)) for p in first)


def test_classes_differ_in_more_than_one_intensity_threshold(demo):
    """Class means of tumour size and in-mask intensity spread widely; neither alone separates them."""
    out, _, manifest = demo
    labelled = manifest[manifest["split"] != "unlabelled"]
    rows = []
    for row in labelled.itertuples(index=False):
        image = np.asarray(nib.as_closest_canonical(nib.load(out / row.image)).dataobj, dtype=float)
        mask = np.asarray(nib.as_closest_canonical(nib.load(out / row.mask)).dataobj) > 0
        brain = (image > 0.3 * np.percentile(image, 95)) & ~mask
        inside = image[mask] / np.median(image[brain])
        centroid = np.argwhere(mask).mean(0) / np.array(SHAPE) - 0.5
        rows.append([np.log(mask.sum()), inside.mean(), inside.std(), abs(centroid[0]), centroid[1], centroid[2]])
    features = np.array(rows)
    labels = labelled["label"].astype(int).to_numpy()
    means = np.array([features[labels == c].mean(0) for c in range(27)])
    assert means[:, 0].max() - means[:, 0].min() > np.log(4)  # tumour volume spans > 4x
    assert means[:, 1].max() - means[:, 1].min() > 0.5  # hypo- to hyper-intense

    def nearest_centroid_accuracy(columns: list[int]) -> float:
        train = (labelled["split"] == "train").to_numpy()
        scaled = (features[:, columns] - features[train][:, columns].mean(0)) / features[train][:, columns].std(0)
        centroids = np.array([scaled[train & (labels == c)].mean(0) for c in range(27)])
        distances = ((scaled[~train, None, :] - centroids[None]) ** 2).sum(-1)
        return float((distances.argmin(1) == labels[~train]).mean())

    assert nearest_centroid_accuracy(list(range(features.shape[1]))) > 0.6  # chance is 1/27
    assert nearest_centroid_accuracy([1]) < 0.35


def test_class_definitions_are_fixed_and_pairwise_distinct():
    classes = demo_classes()
    assert classes == demo_classes()
    assert [c.label for c in classes] == list(range(27))
    assert len({c.name for c in classes}) == 27
    for a, b in itertools.combinations(classes, 2):
        assert sum(x != y for x, y in zip(a.attributes(), b.attributes())) >= 3
    # Partly overlapping: every intensity level is shared by several classes.
    assert min(pd.Series([c.intensity for c in classes]).value_counts()) >= 3


def test_refuses_a_nonempty_directory_that_is_not_a_demo_dataset(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError) as error:
        make_demo_dataset(target, scale=SCALE, unlabelled=0, shape=TINY_SHAPE)
    assert str(target) in str(error.value) and "\n" not in str(error.value)
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_replaces_an_earlier_demo_dataset_and_reports_progress(tmp_path):
    target = tmp_path / "demo"
    make_demo_dataset(target, scale=SCALE, unlabelled=2, shape=TINY_SHAPE)
    (target / "stale.txt").write_text("from the first run")
    calls: list[tuple[int, int]] = []
    summary = make_demo_dataset(target, scale=SCALE, seed=1, unlabelled=4, shape=TINY_SHAPE,
                                progress=lambda done, total: calls.append((done, total)))
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary sibling left
    total = summary.n_labelled + summary.n_unlabelled
    assert calls == [(i, total) for i in range(1, total + 1)]
    assert (read_manifest(target)["split"] == "unlabelled").sum() == 4
    assert summary.seconds > 0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"scale": 0.0}, "--scale"), ({"scale": float("inf")}, "--scale"), ({"scale": float("nan")}, "--scale"),
     ({"unlabelled": -1}, "--unlabelled"), ({"shape": (24, 24)}, "--shape"), ({"shape": (24, 24, 2)}, "--shape")],
)
def test_rejects_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=f"demo {field}: must be"):
        make_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
