"""Similar-case retrieval: the index, a scan finding itself, bad input, stale indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raytumor.data.manifest import read_manifest, resolve_path
from raytumor.errors import RaytumorError
from raytumor.evaluate.embeddings import read_prepared
from raytumor.evaluate.retrieval import (
    RESULT_COLUMNS,
    IndexMissingError,
    build_index,
    ensure_index,
    find_scans,
    load_index,
    preprocess_scan,
    search_scans,
)
from raytumor.train.steps import embed_volumes
from raytumor.train.trainer import load_best_model
from tests.conftest import blob_volume, write_nifti
from tests.data.bad_volumes import write_truncated
from tests.evaluate.test_report import SHAPE, _prepared, make_eval_dataset, make_run


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    dataset = make_eval_dataset(root / "ds", n_per_class=(5, 5, 5))
    run = make_run(root / "runs", dataset, "triplet", seed=3)
    return {"root": root, "dataset": dataset, "run": run, "index": build_index(run)}


def test_index_holds_every_labelled_case_once(indexed):
    index, run = indexed["index"], indexed["run"]
    manifest = read_manifest(indexed["dataset"])
    assert sorted(index.cases["case_id"]) == sorted(manifest["case_id"])
    assert set(index.cases["split"]) == {"train", "val", "test"}
    assert (run / "index" / "vectors.npy").is_file() and (run / "index" / "cases.parquet").is_file()
    meta = json.loads((run / "index" / "meta.json").read_text())
    assert meta["n_cases"] == len(manifest) and meta["shape"] == list(SHAPE) and meta["embedding_dim"] == 6
    names = dict(zip(manifest["case_id"], manifest["label_name"]))
    assert all(names[c] == n for c, n in zip(index.cases["case_id"], index.cases["label_name"]))
    # The saved vectors are the model's embeddings of the prepared rows.
    model, _ = load_best_model(run)
    frame, volumes = read_prepared(_prepared(indexed["dataset"]))
    expected = dict(zip(frame["case_id"], embed_volumes(model, volumes, torch.device("cpu"))))
    loaded = load_index(run)
    for case_id, vector in zip(loaded.cases["case_id"], loaded.vectors):
        np.testing.assert_allclose(vector, expected[case_id], atol=1e-5)


def test_a_training_scan_finds_itself_first(indexed):
    manifest = read_manifest(indexed["dataset"])
    train = manifest[manifest["split"] == "train"].iloc[:3]
    scans = [(resolve_path(indexed["dataset"], r.image), resolve_path(indexed["dataset"], r.mask))
             for r in train.itertuples()]
    results = search_scans(indexed["run"], scans, top=5, index=indexed["index"]).matches
    assert list(results.columns) == list(RESULT_COLUMNS)
    assert len(results) == 15
    for (image, _), case in zip(scans, train.itertuples()):
        matches = results[results["query"] == str(image)]
        assert list(matches["rank"]) == [1, 2, 3, 4, 5]
        first = matches.iloc[0]
        assert first["case_id"] == case.case_id and first["label_name"] == case.label_name
        assert first["distance"] < 1e-4
        assert np.all(np.diff(matches["distance"].to_numpy()) >= 0)
        assert matches["distance"].iloc[1] > first["distance"]


def test_a_scan_without_mask_gets_a_zero_mask_channel(indexed, tmp_path):
    image, _ = blob_volume((12, 12, 4), radius=3.0, seed=99)
    path = write_nifti(tmp_path / "new.nii.gz", image)
    volume = preprocess_scan(path, None, SHAPE)
    assert volume.shape == (2, *SHAPE) and volume.dtype == np.float32
    assert not volume[1].any() and volume[0].std() > 0
    results = search_scans(indexed["run"], [(path, None)], top=3, index=indexed["index"]).matches
    assert list(results["rank"]) == [1, 2, 3] and results["mask"].eq("").all()


@pytest.mark.parametrize("writer, reason", [
    ("truncated", "truncated or corrupt gzip (EOFError"),
    ("four_d", "4-D image"),
    ("not_nifti", "not NIfTI"),
    ("missing", "missing file"),
])
def test_bad_scans_are_one_line_errors_naming_the_file(tmp_path, writer, reason):
    if writer == "truncated":
        path, _ = write_truncated(tmp_path)
    elif writer == "four_d":
        path = write_nifti(tmp_path / "four_d.nii.gz", np.ones((6, 6, 4, 3), dtype=np.float32))
    elif writer == "not_nifti":
        path = tmp_path / "notes.nii.gz"
        path.write_text("definitely not a volume")
    else:
        path = tmp_path / "missing.nii.gz"
    with pytest.raises(RaytumorError) as info:
        preprocess_scan(path, None, SHAPE)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_bad_scans_in_a_batch_are_listed_and_the_others_searched(indexed, tmp_path):
    folder = tmp_path / "scans"
    for name in ("a.nii.gz", "c.nii.gz"):
        write_nifti(folder / name, blob_volume((12, 12, 4), seed=len(name))[0])
    four_d = write_nifti(folder / "b_4d.nii.gz", np.ones((6, 6, 4, 3), dtype=np.float32))
    truncated, _ = write_truncated(folder)
    write_nifti(tmp_path / "masks" / "c.nii.gz", np.ones((5, 5, 5), dtype=np.uint8))  # wrong shape for c
    # batch_size=1 and 2: a bad scan alone in its chunk, and next to a good one.
    for batch_size in (1, 2):
        results = search_scans(indexed["run"], find_scans(folder, tmp_path / "masks"), top=2,
                               index=indexed["index"], batch_size=batch_size)
        assert list(results.matches["query"]) == [str(folder / "a.nii.gz")] * 2
        assert list(results.matches["rank"]) == [1, 2]
        problems = {(p.query, p.file): p.reason for p in results.problems}
        assert set(problems) == {
            (str(four_d), str(four_d)),
            (str(folder / "c.nii.gz"), str(tmp_path / "masks" / "c.nii.gz")),
            (str(truncated), str(truncated)),
        }
        assert "4-D image" in problems[(str(four_d), str(four_d))]
        assert "truncated or corrupt gzip (EOFError" in problems[(str(truncated), str(truncated))]
        assert list(results.problems_frame().columns) == ["query", "file", "reason"]


def test_find_scans_pairs_masks_by_name(tmp_path):
    for name in ("b.nii.gz", "a.nii"):
        write_nifti(tmp_path / "scans" / name, np.ones((4, 4, 2), dtype=np.float32))
    (tmp_path / "scans" / "notes.txt").write_text("x")
    write_nifti(tmp_path / "masks" / "a.nii", np.ones((4, 4, 2), dtype=np.uint8))
    pairs = find_scans(tmp_path / "scans", tmp_path / "masks")
    assert [(p.name, m.name if m else None) for p, m in pairs] == [("a.nii", "a.nii"), ("b.nii.gz", None)]
    with pytest.raises(RaytumorError, match="no such file or folder"):
        find_scans(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaytumorError, match="no .nii"):
        find_scans(tmp_path / "empty")
    with pytest.raises(RaytumorError, match="folder of masks"):
        find_scans(tmp_path / "scans", tmp_path / "masks" / "a.nii")


def test_missing_or_stale_index_is_detected_and_rebuilt(tmp_path):
    dataset = make_eval_dataset(tmp_path / "ds", n_per_class=(3, 3, 3))
    run = make_run(tmp_path / "runs", dataset, "r", seed=4)
    with pytest.raises(IndexMissingError, match="raytumor index build"):
        load_index(run)
    index, built = ensure_index(run)
    assert built and len(index) == 9
    _, built_again = ensure_index(run)
    assert not built_again
    # Retraining replaces best_model.pt: the old index no longer matches it.
    payload = torch.load(run / "best_model.pt", weights_only=True)
    payload["model"] = {k: (v + 0.1 if v.is_floating_point() else v) for k, v in payload["model"].items()}
    torch.save(payload, run / "best_model.pt")
    _, config = load_best_model(run)
    with pytest.raises(IndexMissingError, match="stale"):
        load_index(run, config=config)
    fresh, rebuilt = ensure_index(run)
    assert rebuilt and not np.allclose(fresh.vectors, index.vectors)


@pytest.mark.ray
@pytest.mark.slow
def test_a_cache_prepared_by_ray_reads_like_the_hand_written_one(ray_local, indexed, tmp_path):
    """The reader needs no Ray, but must read what Ray Data wrote (volume column layout included)."""
    import shutil

    from raytumor.data.preprocess import PrepareSettings, prepare_dataset

    dataset = tmp_path / "ds"
    shutil.copytree(indexed["dataset"], dataset, ignore=shutil.ignore_patterns("prepared"))
    by_ray = prepare_dataset(dataset, PrepareSettings(shape=SHAPE))
    frame, volumes = read_prepared(by_ray)
    ref_frame, ref_volumes = read_prepared(_prepared(indexed["dataset"]))
    order = np.argsort(frame["case_id"].to_numpy())
    ref_order = np.argsort(ref_frame["case_id"].to_numpy())
    assert list(frame["case_id"].to_numpy()[order]) == list(ref_frame["case_id"].to_numpy()[ref_order])
    np.testing.assert_array_equal(volumes[order], ref_volumes[ref_order])
