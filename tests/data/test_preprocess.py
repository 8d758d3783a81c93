"""Preprocessing on Ray Data: shapes, orientation, cache hits, atomicity, quarantine."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from raytumor.data.manifest import read_manifest, write_manifest
from raytumor.data.preprocess import (
    META_FILE,
    PrepareSettings,
    find_prepared,
    find_prepared_quick,
    normalise_intensity,
    pool_large_shrinks,
    prepare_dataset,
    preprocess_volume,
    resize_volume,
)
from tests.conftest import blob_volume, make_dataset, shard_count, write_nifti

pytestmark = pytest.mark.ray

SHAPE = (16, 16, 4)


def read_rows(ray, prepared):
    return ray.data.read_parquet(str(prepared.shards)).to_pandas().set_index("case_id")


def test_normalise_is_robust_to_background_and_constant():
    image = np.zeros((10, 10, 4), dtype=np.float32)
    image[2:8, 2:8] = np.linspace(50, 150, 36 * 4).reshape(6, 6, 4)
    out = normalise_intensity(image, 0.5, 99.5)
    foreground = out[2:8, 2:8]
    assert abs(float(foreground.mean())) < 1e-4 and abs(float(foreground.std()) - 1) < 1e-3
    assert np.all(out[0] == out.min())
    assert np.all(normalise_intensity(np.full((4, 4, 2), 7.0), 0.5, 99.5) == 0)


def test_preprocess_volume_shape_dtype_and_binary_mask():
    image, mask = blob_volume((20, 24, 6), radius=4)
    out = preprocess_volume(image, mask, PrepareSettings(shape=SHAPE))
    assert out.shape == (2, *SHAPE) and out.dtype == np.float32
    assert set(np.unique(out[1])) == {0.0, 1.0}
    out_no_mask = preprocess_volume(image, None, PrepareSettings(shape=SHAPE))
    assert not out_no_mask[1].any()


def test_a_lesion_between_the_slices_interpolation_reads_stays_in_the_mask():
    """60 slices into 4: nearest and trilinear read slices 7, 22, 37 and 52 only. A lesion on
    slices 14-16 is pooled into the blocks it touches (0: slices 0-14, 1: 15-29)."""
    image = 100.0 + np.random.default_rng(3).normal(0, 1, (40, 40, 60)).astype(np.float32)
    lesion = np.zeros((40, 40, 60), dtype=np.uint8)
    lesion[18:22, 18:22, 14:17] = 1
    image[lesion > 0] += 100
    assert not resize_volume(lesion.astype(np.float32), (20, 20, 4), "nearest-exact").any()  # what it was
    out = preprocess_volume(image, lesion, PrepareSettings(shape=(20, 20, 4)))
    assert sorted(set(np.nonzero(out[1])[2])) == [0, 1]
    assert set(np.nonzero(out[1])[0]) == {9, 10}  # x shrinks 2x: interpolated as before
    # The image's lesion slices count too: blocks 0 and 1 are brighter at the lesion than 2 and 3.
    at_lesion = out[0][9:11, 9:11]
    assert at_lesion[..., :2].min() > at_lesion[..., 2:].max() + 1


def test_only_axes_shrunk_by_more_than_two_are_pooled():
    alternating = np.zeros((40, 9, 60), dtype=np.float32)
    alternating[..., ::2] = 1.0
    pooled = pool_large_shrinks(alternating, (20, 9, 4), "mean").numpy()
    assert pooled.shape == (40, 9, 4)  # x 2x, y 1x: left to interpolation
    np.testing.assert_allclose(pooled[0, 0], [8 / 15, 7 / 15, 8 / 15, 7 / 15], atol=1e-6)
    assert pool_large_shrinks(alternating, (20, 9, 4), "max").numpy().min() == 1.0
    # The demo's 2x in every axis is untouched: exactly the interpolation of before.
    image, mask = blob_volume((64, 64, 16), radius=6)
    out = preprocess_volume(image, mask, PrepareSettings(shape=(32, 32, 8)))
    np.testing.assert_array_equal(out[0], normalise_intensity(resize_volume(image, (32, 32, 8), "trilinear"), 0.5, 99.5))
    np.testing.assert_array_equal(out[1], resize_volume(mask.astype(np.float32), (32, 32, 8), "nearest-exact") > 0.5)


@pytest.mark.parametrize("source_shape", [(20, 24, 6), (9, 7, 30), (16, 16, 8)])
def test_resize_volume_equals_monai_resize(source_shape):
    from monai.transforms import Resize

    rng = np.random.default_rng(0)
    image = rng.normal(size=source_shape).astype(np.float32)
    mask = (rng.random(source_shape) > 0.7).astype(np.float32)
    for volume, mode, kwargs in ((image, "trilinear", {"anti_aliasing": False}), (mask, "nearest-exact", {})):
        expected = np.asarray(Resize(SHAPE, mode=mode, **kwargs)(volume[np.newaxis]), dtype=np.float32)[0]
        got = resize_volume(volume, SHAPE, mode)
        assert got.shape == SHAPE and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("memory_order", ["F", "C"])  # nibabel hands back the file's (Fortran) order
def test_ras_voxels_preprocess_exactly_as_reorient_to_ras(memory_order):
    """The copy-free RAS view gives bit-identical prepared volumes for all 48 axis-aligned
    orientations, for shrinking, same-size and growing resizes."""
    import itertools

    from raytumor.data.volumes import Volume, ras_voxels, reorient_to_ras

    rng = np.random.default_rng(1)
    shape = (13, 9, 5)
    image = np.asarray(rng.random(shape, dtype=np.float32) * 100, order=memory_order)
    mask = np.asarray((rng.random(shape) > 0.7).astype(np.float32), order=memory_order)
    for axes in itertools.permutations(range(3)):
        for signs in itertools.product([1.0, -1.0], repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0.0
            for voxel_axis, (world_axis, sign) in enumerate(zip(axes, signs)):
                affine[world_axis, voxel_axis] = sign * (1.0 + voxel_axis)
            image_volume, mask_volume = Volume(image, affine), Volume(mask, affine)
            np.testing.assert_array_equal(ras_voxels(image_volume).numpy(), reorient_to_ras(image_volume))
            for out_shape in [(6, 4, 3), shape, (20, 11, 9)]:
                settings = PrepareSettings(shape=out_shape)
                expected = preprocess_volume(reorient_to_ras(image_volume), reorient_to_ras(mask_volume), settings)
                got = preprocess_volume(ras_voxels(image_volume), ras_voxels(mask_volume), settings)
                np.testing.assert_array_equal(got, expected, err_msg=f"axes {axes}, signs {signs}, to {out_shape}")


def test_prepare_writes_one_shard_per_batch_and_no_temp_files(ray_local, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(5, 5), unlabelled=2)
    prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE), batch_size=4)
    files = sorted(p.name for p in prepared.shards.iterdir())
    assert files and all(name.startswith("part-") and name.endswith(".parquet") for name in files)
    assert len(files) >= 12 // 4
    ids = pd.concat(pd.read_parquet(prepared.shards / name, columns=["case_id"]) for name in files)["case_id"]
    assert sorted(ids) == sorted(read_manifest(dataset)["case_id"]) and not ids.duplicated().any()
    assert volume_encodings(prepared.shards) == {"PLAIN"}  # no dictionary of voxel values (slow to write)


def test_prepare_splits_rows_into_blocks_per_cpu(ray_local, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(5, 5), unlabelled=2)
    cpus = int(ray_local.cluster_resources()["CPU"])
    shards = {}
    for per_cpu in (1, 2):
        prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE), batch_size=2, blocks_per_cpu=per_cpu, force=True)
        blocks = min(12, per_cpu * cpus)
        # Each block (never smaller than a batch here, so Ray Data bundles none) is cut into batches of 2, one shard each.
        assert len(list(prepared.shards.iterdir())) == shard_count(12, blocks, 2)
        shards[per_cpu] = read_rows(ray_local, prepared).sort_index()
    assert shards[1].index.tolist() == shards[2].index.tolist()
    np.testing.assert_array_equal(np.stack(shards[1]["volume"]), np.stack(shards[2]["volume"]))
    with pytest.raises(ValueError, match="blocks_per_cpu"):
        prepare_dataset(dataset, PrepareSettings(shape=SHAPE), blocks_per_cpu=0, force=True)


def volume_encodings(shards) -> set[str]:
    """The Parquet data encodings of the voxel column over every shard (repetition levels aside)."""
    import pyarrow.parquet as pq

    encodings = set()
    for path in shards.glob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            columns = (metadata.row_group(group).column(i) for i in range(metadata.num_columns))
            encodings |= {e for c in columns if c.path_in_schema.startswith("volume") for e in c.encodings}
    return encodings - {"RLE"}


def test_prepare_writes_fixed_shape_rows_and_hits_cache(ray_local, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(5, 5), unlabelled=2)
    first = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    assert not first.cached and first.n_cases == 12 and first.n_quarantined == 0
    rows = read_rows(ray_local, first)
    assert len(rows) == 12
    volume = np.asarray(rows["volume"].iloc[0])
    assert volume.shape == (2, *SHAPE) and volume.dtype == np.float32
    assert set(rows.loc[rows["split"] == "unlabelled", "label"]) == {-1}
    assert not rows.loc[rows["split"] == "unlabelled", "has_mask"].any()
    assert rows.loc[rows["split"] != "unlabelled", "has_mask"].all()
    stamp = (first.path / META_FILE).stat().st_mtime_ns

    # The build records its inputs, so the next look needs neither pandas nor the fingerprint.
    assert find_prepared_quick(dataset, PrepareSettings(shape=SHAPE)).path == first.path
    second = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    assert second.cached and second.path == first.path
    assert (first.path / META_FILE).stat().st_mtime_ns == stamp
    assert find_prepared(dataset, PrepareSettings(shape=SHAPE)).path == first.path
    # A changed setting or a changed file is a different cache.
    assert find_prepared(dataset, PrepareSettings(shape=(8, 8, 4))) is None
    image_path = dataset / read_manifest(dataset)["image"].iloc[0]
    write_nifti(image_path, blob_volume((20, 20, 6), seed=99)[0])
    assert find_prepared(dataset, PrepareSettings(shape=SHAPE)) is None


def test_stored_orientation_does_not_change_the_prepared_volume(ray_local, tmp_path):
    image, mask = blob_volume((20, 20, 6), centre=(6, 12, 2), radius=3)
    ras = np.eye(4)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [19, 19, 0]  # voxel (19-i, 19-j, k) of the flipped array is voxel (i, j, k) in world space
    root = tmp_path / "ds"
    rows = []
    for case, affine, flip in (("ras", ras, False), ("lps", lps, True)):
        img = image[::-1, ::-1] if flip else image
        msk = mask[::-1, ::-1] if flip else mask
        write_nifti(root / f"{case}.nii.gz", img, affine)
        write_nifti(root / f"{case}_mask.nii.gz", msk, affine)
        rows.append(dict(case_id=case, image=f"{case}.nii.gz", mask=f"{case}_mask.nii.gz", label=0,
                         split="train", source="test", mask_kind="ground_truth"))
    write_manifest(root, pd.DataFrame(rows))
    assert nib.aff2axcodes(nib.load(str(root / "lps.nii.gz")).affine) == ("L", "P", "S")
    prepared = prepare_dataset(root, PrepareSettings(shape=SHAPE))
    got = read_rows(ray_local, prepared)
    np.testing.assert_allclose(np.asarray(got.loc["ras", "volume"]), np.asarray(got.loc["lps", "volume"]), atol=1e-5)


def test_bad_cases_are_quarantined_not_dropped(ray_local, tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(4, 4))
    manifest = read_manifest(dataset)
    nan_case = manifest["case_id"].iloc[0]
    bad = np.full((20, 20, 6), np.nan, dtype=np.float32)
    write_nifti(dataset / manifest["image"].iloc[0], bad)
    missing_case = manifest["case_id"].iloc[1]
    (dataset / manifest["mask"].iloc[1]).unlink()
    prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    assert prepared.n_cases == 6 and prepared.n_quarantined == 2
    quarantine = pd.read_csv(prepared.quarantine).set_index("case_id")
    assert "NaN/Inf" in quarantine.loc[nan_case, "reason"]
    assert quarantine.loc[missing_case, "reason"] == "missing file"
    assert set(read_rows(ray_local, prepared).index).isdisjoint({nan_case, missing_case})


def test_prepare_quarantines_what_validate_flags(ray_local, tmp_path):
    from raytumor.data.validate import validate_dataset

    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3))
    image, mask = blob_volume((20, 20, 6), seed=5)
    write_nifti(dataset / "odd" / "slice.nii.gz", image[:, :, 0])
    write_nifti(dataset / "odd" / "image.nii.gz", image)
    write_nifti(dataset / "odd" / "negative_mask.nii.gz", -mask.astype(np.float32))
    write_nifti(dataset / "odd" / "image2.nii.gz", image)
    write_nifti(dataset / "odd" / "empty_mask.nii.gz", np.zeros_like(mask, dtype=np.uint8))
    first = read_manifest(dataset).iloc[0]
    odd = [dict(case_id="slice", image="odd/slice.nii.gz", mask=None, label=0, split="train", source="test"),
           dict(case_id="negative-mask", image="odd/image.nii.gz", mask="odd/negative_mask.nii.gz", label=1,
                split="train", source="test", mask_kind="ground_truth"),
           dict(case_id="empty-mask", image="odd/image2.nii.gz", mask="odd/empty_mask.nii.gz", label=1,
                split="train", source="test", mask_kind="ground_truth"),
           dict(case_id="copy", image=first["image"], mask=None, label=0, split="test", source="test")]
    write_manifest(dataset, pd.concat([read_manifest(dataset), pd.DataFrame(odd)], ignore_index=True))

    prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    quarantine = pd.read_csv(prepared.quarantine).set_index("case_id")
    assert prepared.n_cases == 6 and sorted(quarantine.index) == ["copy", "empty-mask", "negative-mask", "slice"]
    assert quarantine.loc["slice", "reason"].startswith("2-D image of shape (20, 20)")
    assert quarantine.loc["negative-mask", "reason"].startswith("negative values (min -1)")
    assert quarantine.loc["empty-mask", "reason"] == "empty ground-truth mask (no voxel > 0)"
    assert quarantine.loc["copy", "reason"] == f"image: also the image of case {first['case_id']} (split {first['split']})"
    assert set(read_rows(ray_local, prepared).index) == set(read_manifest(dataset)["case_id"][:6])
    assert {p.case_id for p in validate_dataset(dataset).problems} == set(quarantine.index)


def test_interrupted_prepare_leaves_no_complete_looking_cache(ray_local, tmp_path, monkeypatch):
    import raytumor.data.preprocess as preprocess

    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess, "write_quarantine", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    prepared_root = dataset / preprocess.PREPARED_DIR
    assert not [p for p in prepared_root.iterdir() if (p / META_FILE).exists()]
    assert find_prepared(dataset, PrepareSettings(shape=SHAPE)) is None
    monkeypatch.undo()
    prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    assert prepared.n_cases == 6
    assert json.loads((prepared.path / META_FILE).read_text())["n_cases"] == 6
    assert not [p for p in prepared_root.iterdir() if p.name.startswith(".")]


def footer_readers() -> set[str]:
    """Every FooterReader actor Ray has started (Ray Data's V2 Parquet reader starts them to list files)."""
    import ray
    from ray.util.state import list_actors

    # This session's Ray by address: auto-detection fails while other Ray instances run here.
    return {a.actor_id for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                            filters=[("class_name", "=", "FooterReader")], limit=10_000)}


def test_read_shards_picks_the_parquet_reader_by_file_count(ray_local, tmp_path, monkeypatch):
    import os

    from raytumor.data import preprocess
    from raytumor.data.preprocess import FOOTER_READERS_ENV, USE_V2_ENV, read_shards

    monkeypatch.delenv(USE_V2_ENV, raising=False)
    monkeypatch.delenv(FOOTER_READERS_ENV, raising=False)
    dataset = make_dataset(tmp_path / "ds", n_per_class=(5, 5), unlabelled=2)
    prepared = prepare_dataset(dataset, PrepareSettings(shape=SHAPE), batch_size=4)
    expected = read_rows(ray_local, prepared).sort_index()
    context = ray_local.data.DataContext.get_current()

    def read(shards) -> set[str]:
        """The new footer actors of one read (checked to give the cache's rows)."""
        before = footer_readers()
        rows = read_shards(shards).to_pandas().set_index("case_id").sort_index()
        assert rows.index.tolist() == expected.index.tolist()
        np.testing.assert_array_equal(np.stack(rows["volume"]), np.stack(expected["volume"]))
        return footer_readers() - before

    # A few files: V1 reads the footers here, no actor starts; Ray's settings are left as they were.
    assert read(prepared.shards) == set()
    assert context.use_datasource_v2 and FOOTER_READERS_ENV not in os.environ
    # More files than V1 is best at: V2, with one footer actor per listing (Ray's default is 32).
    monkeypatch.setattr(preprocess, "V1_PARQUET_MAX_FILES", 1)
    ours = read(prepared.shards)
    assert 1 <= len(ours) <= 2 and context.use_datasource_v2 and FOOTER_READERS_ENV not in os.environ
    # The user's settings win.
    monkeypatch.setenv(FOOTER_READERS_ENV, "3")
    assert len(read(prepared.shards)) == 3 * len(ours)
    monkeypatch.setattr(preprocess, "V1_PARQUET_MAX_FILES", 64)
    monkeypatch.setenv(USE_V2_ENV, "1")
    assert len(read(prepared.shards)) == 3 * len(ours)
