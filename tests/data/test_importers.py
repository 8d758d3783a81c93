"""Importers: a folder + labels CSV, the Figshare .mat set, an unlabelled pool."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from raytumor.data.importers import IMPORT_QUARANTINE_FILE, import_figshare, import_folder, import_unlabelled
from raytumor.data.manifest import read_classes, read_manifest, resolve_path
from raytumor.data.validate import validate_dataset
from raytumor.errors import DatasetError
from tests.conftest import blob_volume, make_dataset, write_nifti
from tests.data.bad_volumes import BAD_CASES, SHAPE

SPLITS = {"train", "val", "test"}


def _source(root: Path, n: int, *, masks: bool = True, sub: str = "scans") -> list[dict]:
    """Write n good cases under root/sub; return their CSV rows (paths relative to root)."""
    rows = []
    for k in range(n):
        image, mask = blob_volume(SHAPE, radius=2.5, seed=k)
        write_nifti(root / sub / f"s{k}.nii.gz", image)
        row = {"case_id": f"s{k}", "image": f"{sub}/s{k}.nii.gz"}
        if masks:
            write_nifti(root / sub / f"s{k}_mask.nii.gz", mask)
            row["mask"] = f"{sub}/s{k}_mask.nii.gz"
        rows.append(row)
    return rows


def _csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _quarantine(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / IMPORT_QUARANTINE_FILE)


# --- import_folder -------------------------------------------------------------------------


def test_folder_int_labels(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=k % 3) for k, r in enumerate(_source(src, 12))]
    out = tmp_path / "ds"
    summary = import_folder(src, _csv(tmp_path / "labels.csv", rows), out, seed=0, threads=2)
    assert summary.n_imported == 12 and summary.problems == [] and summary.dataset_dir == out

    manifest = read_manifest(out).set_index("case_id")
    assert manifest.loc["s4", "label"] == 1 and manifest.loc["s4", "label_name"] == "1"
    assert (manifest["source"] == "folder").all() and (manifest["mask_kind"] == "ground_truth").all()
    assert set(manifest["split"]) == SPLITS
    for case_id, row in manifest.iterrows():
        assert resolve_path(out, row["image"]) == str((src / "scans" / f"{case_id}.nii.gz").resolve())
        assert resolve_path(out, row["mask"]) == str((src / "scans" / f"{case_id}_mask.nii.gz").resolve())
    classes = read_classes(out)
    assert classes[["label", "name", "count"]].to_dict("records") == [
        {"label": 0, "name": "0", "count": 4}, {"label": 1, "name": "1", "count": 4}, {"label": 2, "name": "2", "count": 4}]
    assert _quarantine(out).empty
    assert validate_dataset(out).ok


def test_folder_name_labels_map_to_sorted_ints(tmp_path):
    src = tmp_path / "src"
    names = ["pituitary", "glioma", "meningioma"]
    rows = [dict(r, label=names[k % 3]) for k, r in enumerate(_source(src, 9))]
    out = tmp_path / "ds"
    import_folder(src, _csv(tmp_path / "labels.csv", rows), out)
    manifest = read_manifest(out).set_index("case_id")
    assert manifest.loc["s0", "label"] == 2 and manifest.loc["s0", "label_name"] == "pituitary"
    assert manifest.loc["s1", "label"] == 0 and manifest.loc["s1", "label_name"] == "glioma"
    assert manifest.loc["s2", "label"] == 1 and manifest.loc["s2", "label_name"] == "meningioma"
    classes = read_classes(out)
    assert classes["name"].tolist() == ["glioma", "meningioma", "pituitary"]
    assert classes["label"].tolist() == [0, 1, 2]


def test_folder_without_mask_and_with_patients(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=(k // 3) % 3, patient_id=f"P{k // 3}") for k, r in enumerate(_source(src, 30, masks=False))]
    out = tmp_path / "ds"
    import_folder(src, _csv(tmp_path / "labels.csv", rows), out)
    manifest = read_manifest(out)
    assert manifest["mask"].isna().all() and manifest["mask_kind"].isna().all()
    assert sorted(manifest["patient_id"].unique()) == sorted(f"P{p}" for p in range(10))
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == SPLITS


def test_folder_mask_column_may_have_blanks(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=0) for r in _source(src, 4)]
    rows[1]["mask"] = ""
    out = tmp_path / "ds"
    import_folder(src, _csv(tmp_path / "labels.csv", rows), out)
    manifest = read_manifest(out).set_index("case_id")
    assert manifest.loc["s1", "mask"] is None and manifest.loc["s1", "mask_kind"] is None
    assert manifest.loc["s0", "mask"] is not None and manifest.loc["s0", "mask_kind"] == "ground_truth"


def test_folder_relative_paths_do_not_depend_on_cwd(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _csv(tmp_path / "labels.csv", [dict(r, label=0) for r in _source(src, 3, sub="deep/er")])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    import_folder(Path("../src"), Path("../labels.csv"), Path("../ds"))
    monkeypatch.chdir(tmp_path)  # read from another working directory than the import's
    out = tmp_path / "ds"
    manifest = read_manifest(out)
    for row in manifest.itertuples():
        assert Path(resolve_path(out, row.image)).is_file()
    assert validate_dataset(out).ok


def test_folder_files_inside_the_dataset_are_stored_relative(tmp_path):
    out = tmp_path / "ds"
    rows = [dict(r, label=0) for r in _source(out, 3, sub="images")]
    import_folder(out, _csv(tmp_path / "labels.csv", rows), out)
    manifest = read_manifest(out)
    assert manifest["image"].tolist() == ["images/s0.nii.gz", "images/s1.nii.gz", "images/s2.nii.gz"]


def test_folder_same_seed_same_manifest(tmp_path):
    src = tmp_path / "src"
    labels = _csv(tmp_path / "labels.csv", [dict(r, label=k % 2) for k, r in enumerate(_source(src, 20))])
    import_folder(src, labels, tmp_path / "a", seed=4)
    import_folder(src, labels, tmp_path / "b", seed=4)
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b"))


def test_folder_rare_classes_passed_through(tmp_path):
    src = tmp_path / "src"
    labels = _csv(tmp_path / "labels.csv", [dict(r, label=k % 3) for k, r in enumerate(_source(src, 9))])
    import_folder(src, labels, tmp_path / "ds", rare_classes=[2])
    assert read_classes(tmp_path / "ds")["rare"].tolist() == [False, False, True]


@pytest.mark.parametrize(
    ("drop", "column"), [("label", "label"), ("image", "image"), ("case_id", "case_id")]
)
def test_folder_missing_csv_column(tmp_path, drop, column):
    src = tmp_path / "src"
    rows = [{k: v for k, v in dict(r, label=0).items() if k != drop} for r in _source(src, 2)]
    with pytest.raises(DatasetError, match=f"labels.csv: missing column.*{column}"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_folder_unknown_csv_column(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=0, scanner="GE") for r in _source(src, 2)]
    with pytest.raises(DatasetError, match="unknown column.*scanner"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")


def test_folder_duplicate_case_id(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=0) for r in _source(src, 3)]
    rows[2]["case_id"] = "s0"
    with pytest.raises(DatasetError, match="duplicate case_id 's0'"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("case_ids", "error"),
    [(["s0", "s1", "s0 "], "line 4: duplicate case_id 's0' \\(first on line 2\\)"),
     (["s0", "", "s2"], "line 3: empty case_id"),
     (["s0", "  ", "s2"], "line 3: empty case_id")],
)
def test_folder_case_ids_are_checked_as_stored(tmp_path, case_ids, error):
    src = tmp_path / "src"
    rows = [dict(r, case_id=case_id, label=0) for r, case_id in zip(_source(src, 3), case_ids)]
    with pytest.raises(DatasetError, match=f"labels.csv: {error}$"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    ("label", "error"),
    [("1.5", "line 3: label '1.5' is not an integer; a label is an integer or a class name"),
     ("NaN", "line 3: label 'NaN' is not an integer"),
     ("inf", "line 3: label 'inf' is not an integer"),
     ("-1", "line 3: label '-1' is out of range; labels go from 0 to 2147483647"),
     ("99999999999", "line 3: label '99999999999' is out of range")],
)
def test_folder_bad_label_names_csv_and_line(tmp_path, label, error):
    src = tmp_path / "src"
    rows = [dict(r, label=lab) for r, lab in zip(_source(src, 3), ["0", label, "1"])]
    out = tmp_path / "new" / "ds"
    with pytest.raises(DatasetError, match=f"labels.csv: {error}"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), out)
    assert not (tmp_path / "new").exists()


def test_folder_whole_number_labels_like_1_0_are_integers(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=lab) for r, lab in zip(_source(src, 3), ["0", "1.0", " 2 "])]
    import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")
    assert read_manifest(tmp_path / "ds").set_index("case_id")["label"].to_dict() == {"s0": 0, "s1": 1, "s2": 2}


def test_folder_header_only_csv(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "labels.csv").write_text("case_id,image,label\n")
    with pytest.raises(DatasetError, match="labels.csv: no cases"):
        import_folder(tmp_path / "src", tmp_path / "labels.csv", tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_folder_failed_import_removes_the_directories_it_created(tmp_path, monkeypatch):
    import raytumor.data.importers as importers

    def fail(*args, **kwargs):
        raise DatasetError("cannot write the manifest")

    src = tmp_path / "src"
    labels = _csv(tmp_path / "labels.csv", [dict(r, label=0) for r in _source(src, 2)])
    monkeypatch.setattr(importers, "write_manifest", fail)
    with pytest.raises(DatasetError, match="cannot write the manifest"):
        import_folder(src, labels, tmp_path / "new" / "ds")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a directory the user made is not the importer's to remove
    with pytest.raises(DatasetError, match="cannot write the manifest"):
        import_folder(src, labels, tmp_path / "kept")
    assert (tmp_path / "kept").is_dir()


def test_folder_mixed_int_and_name_labels(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=lab) for r, lab in zip(_source(src, 3), [0, "glioma", 1])]
    with pytest.raises(DatasetError, match="mixes numbers and names"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")


def test_folder_empty_label_names_its_line(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=lab) for r, lab in zip(_source(src, 3), [0, "", 1])]
    with pytest.raises(DatasetError, match="line 3: empty label"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")


def test_folder_refuses_existing_dataset(tmp_path):
    src = tmp_path / "src"
    labels = _csv(tmp_path / "labels.csv", [dict(r, label=0) for r in _source(src, 3)])
    existing = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    before = read_manifest(existing)
    with pytest.raises(DatasetError, match="already holds a dataset"):
        import_folder(src, labels, existing)
    pd.testing.assert_frame_equal(read_manifest(existing), before)


def test_folder_missing_inputs(tmp_path):
    with pytest.raises(DatasetError, match="source folder does not exist"):
        import_folder(tmp_path / "nope", tmp_path / "labels.csv", tmp_path / "ds")
    (tmp_path / "src").mkdir()
    with pytest.raises(DatasetError, match="labels CSV does not exist"):
        import_folder(tmp_path / "src", tmp_path / "labels.csv", tmp_path / "ds")


def test_folder_quarantines_bad_cases_and_keeps_good_ones(tmp_path):
    src = tmp_path / "src"
    rows = [dict(r, label=k % 3) for k, r in enumerate(_source(src, 9))]
    culprits = {}
    for case in BAD_CASES:
        image, mask = case.write(src / "bad" / case.name)
        rows.append(dict(case_id=f"bad-{case.name}", image=str(image.relative_to(src)),
                         mask="" if mask is None else str(mask.relative_to(src)), label=0))
        culprits[f"bad-{case.name}"] = (image if case.culprit == "image" else mask, case.reason)
    out = tmp_path / "ds"
    progress = []
    summary = import_folder(src, _csv(tmp_path / "labels.csv", rows), out, threads=2,
                            progress=lambda done, total: progress.append((done, total)))

    assert summary.n_imported == 9 and summary.n_quarantined == len(BAD_CASES)
    assert IMPORT_QUARANTINE_FILE in summary.summary()
    assert progress[-1] == (len(rows), len(rows))
    manifest = read_manifest(out)
    assert sorted(manifest["case_id"]) == sorted(f"s{k}" for k in range(9))
    quarantine = _quarantine(out)
    assert sorted(quarantine["case_id"]) == sorted(culprits)
    for row in quarantine.itertuples():
        file, reason = culprits[row.case_id]
        assert Path(row.file) == file, row.case_id
        assert re.search(reason, row.reason, re.IGNORECASE), (row.case_id, row.reason)
        assert "\n" not in row.reason
    assert validate_dataset(out).ok


def test_folder_all_bad_is_an_error_with_quarantine(tmp_path):
    src = tmp_path / "src"
    image, _ = BAD_CASES[0].write(src)
    rows = [dict(case_id="only", image=str(image.relative_to(src)), label=0)]
    with pytest.raises(DatasetError, match="no case passed the checks"):
        import_folder(src, _csv(tmp_path / "labels.csv", rows), tmp_path / "ds")
    assert _quarantine(tmp_path / "ds")["case_id"].tolist() == ["only"]


# --- import_figshare -----------------------------------------------------------------------


def write_cheng_mat(path: Path, image: np.ndarray, label: float | np.ndarray, pid: str, *, mask: np.ndarray | None = None,
                    with_mask: bool = True) -> Path:
    """One slice in the Cheng (2017) MATLAB v7.3 layout; h5py sees MATLAB arrays transposed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask is None:
        mask = (image > np.percentile(image, 80)).astype(np.uint8)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("cjdata")
        group["image"] = image.T
        group["label"] = np.array([[float(label)]]) if np.isscalar(label) else label
        group["PID"] = np.array([[ord(c)] for c in pid], dtype=np.uint16)
        if with_mask:
            group["tumorMask"] = mask.T
        group["tumorBorder"] = np.array([[1.0, 2.0, 3.0, 4.0]])
    return path


def _slice(seed: int) -> np.ndarray:
    # Non-square, so a transposition cannot go unnoticed.
    return np.random.default_rng(seed).integers(0, 800, size=(14, 10)).astype(np.int16)


@pytest.fixture
def figshare_src(tmp_path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray, int, str]]]:
    """8 patients, 2-3 slices each, in two sub-folders as in the published zip files."""
    src = tmp_path / "figshare"
    cases = {}
    index = 0
    for patient in range(8):
        label = patient % 3 + 1
        for _ in range(2 + patient % 2):
            index += 1
            image = _slice(index)
            mask = (image > 600).astype(np.uint8)
            folder = "brainTumorDataPublic_1-766" if index % 2 else "brainTumorDataPublic_767-1532"
            write_cheng_mat(src / folder / f"{index}.mat", image, label, f"10{patient:04d}", mask=mask)
            cases[f"fig-{folder}_{index}"] = (image, mask, label, f"10{patient:04d}")
    return src, cases


def test_figshare_round_trip(tmp_path, figshare_src):
    src, cases = figshare_src
    out = tmp_path / "ds"
    summary = import_figshare(src, out, seed=0)
    assert summary.n_imported == len(cases) and summary.problems == []

    manifest = read_manifest(out).set_index("case_id")
    assert set(manifest.index) == set(cases)
    names = {1: "meningioma", 2: "glioma", 3: "pituitary"}
    for case_id, (image, mask, label, pid) in cases.items():
        row = manifest.loc[case_id]
        assert row["label"] == label - 1 and row["label_name"] == names[label]
        assert row["patient_id"] == pid and row["source"] == "figshare" and row["mask_kind"] == "ground_truth"
        stored = nib.load(resolve_path(out, row["image"]))
        assert stored.shape == (14, 10, 1)
        voxels = np.asarray(stored.dataobj)
        np.testing.assert_array_equal(voxels[:, :, 0], image)  # voxel [i, j, 0] == image[i, j]
        stored_mask = np.asarray(nib.load(resolve_path(out, row["mask"])).dataobj)
        np.testing.assert_array_equal(stored_mask[:, :, 0], mask)
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) <= SPLITS
    classes = read_classes(out)
    assert classes[["label", "name"]].to_dict("records") == [
        {"label": 0, "name": "meningioma"}, {"label": 1, "name": "glioma"}, {"label": 2, "name": "pituitary"}]
    assert validate_dataset(out).ok


def test_figshare_patients_never_cross_splits(tmp_path):
    src = tmp_path / "figshare"
    for patient in range(30):
        for k in range(3):
            write_cheng_mat(src / f"p{patient}_{k}.mat", _slice(patient * 10 + k), patient % 3 + 1, f"P{patient}")
    import_figshare(src, tmp_path / "ds", seed=2)
    manifest = read_manifest(tmp_path / "ds")
    assert len(manifest) == 90
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(manifest["split"]) == SPLITS


def test_figshare_bad_files_quarantined(tmp_path, figshare_src):
    src, cases = figshare_src
    (src / "corrupt.mat").write_bytes(np.random.default_rng(0).bytes(4096))
    write_cheng_mat(src / "nomask.mat", _slice(99), 1, "999", with_mask=False)
    write_cheng_mat(src / "badlabel.mat", _slice(98), 4, "998")
    write_cheng_mat(src / "flat.mat", np.full((14, 10), 5, dtype=np.int16), 2, "997")
    write_cheng_mat(src / "smallmask.mat", _slice(97), 2, "996", mask=np.zeros((4, 4), dtype=np.uint8))
    write_cheng_mat(src / "fraclabel.mat", _slice(95), 1.7, "995")
    write_cheng_mat(src / "nanlabel.mat", _slice(94), np.nan, "994")
    write_cheng_mat(src / "nolabel.mat", _slice(93), np.zeros((0,)), "993")
    write_cheng_mat(src / "noimage.mat", np.zeros((0, 0), np.int16), 1, "992", mask=np.zeros((0, 0), np.uint8))
    with h5py.File(src / "nostruct.mat", "w") as handle:
        handle["image"] = _slice(96)
    out = tmp_path / "ds"
    summary = import_figshare(src, out)

    assert summary.n_imported == len(cases)
    assert set(read_manifest(out)["case_id"]) == set(cases)
    quarantine = _quarantine(out).set_index("case_id")
    expected = {
        "fig-corrupt": "not a readable MATLAB v7.3 file",
        "fig-nomask": "lacks field.*tumorMask",
        "fig-badlabel": "label 4 not in",
        "fig-flat": "constant image",
        "fig-smallmask": "tumorMask shape .* does not match",
        "fig-nostruct": "no struct 'cjdata'",
        "fig-fraclabel": "^cjdata.label 1.7 is not an integer$",
        "fig-nanlabel": "^cjdata.label is nan \\(not an integer\\)$",
        "fig-nolabel": "^cjdata.label is empty$",
        "fig-noimage": "^cjdata.image is empty$",
    }
    assert set(quarantine.index) == set(expected)
    for case_id, reason in expected.items():
        assert re.search(reason, quarantine.loc[case_id, "reason"]), (case_id, quarantine.loc[case_id, "reason"])
        assert Path(quarantine.loc[case_id, "file"]).name == case_id[len("fig-"):] + ".mat"
    assert not list((out / "images").glob("fig-corrupt*"))


@pytest.mark.parametrize(
    ("image", "stored_dtype"),
    [(_slice(1), np.int16),
     (np.random.default_rng(0).random((14, 10)), np.float64),  # in [0, 1): int16 made it all zeros
     (np.random.default_rng(0).random((14, 10)).astype(np.float32), np.float32),
     (np.random.default_rng(0).integers(30000, 65535, size=(14, 10)).astype(np.uint16), np.uint16),  # > 32767 wrapped
     (np.random.default_rng(0).integers(-5, 1000, size=(14, 10)).astype(np.float64), np.int16),  # MATLAB double
     (np.random.default_rng(0).integers(-70000, 70000, size=(14, 10)).astype(np.int64), np.int32)],
)
def test_figshare_keeps_image_values_exactly(tmp_path, image, stored_dtype):
    write_cheng_mat(tmp_path / "figshare" / "1.mat", image, 1, "P1")
    import_figshare(tmp_path / "figshare", tmp_path / "ds")
    stored = nib.load(tmp_path / "ds" / "images" / "fig-1.nii.gz")
    assert stored.get_data_dtype() == stored_dtype
    np.testing.assert_array_equal(np.asarray(stored.dataobj)[:, :, 0], image)
    assert validate_dataset(tmp_path / "ds").ok


def test_figshare_names_giving_one_case_id_are_refused(tmp_path):
    src = tmp_path / "figshare"
    for k, name in enumerate(["a b", "a_b", "a@b", "c", "d"]):
        write_cheng_mat(src / f"{name}.mat", _slice(k), k % 3 + 1, f"P{k}")
    expected = r"figshare: files 'a b.mat', 'a@b.mat', 'a_b.mat' give the same case_id 'fig-a_b'; rename all but one$"
    with pytest.raises(DatasetError, match=expected):
        import_figshare(src, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_figshare_errors(tmp_path, figshare_src):
    src, _ = figshare_src
    with pytest.raises(DatasetError, match="source folder does not exist"):
        import_figshare(tmp_path / "nope", tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .mat files"):
        import_figshare(tmp_path / "empty", tmp_path / "ds")
    make_dataset(tmp_path / "existing", n_per_class=(3,), shape=SHAPE)
    with pytest.raises(DatasetError, match="already holds a dataset"):
        import_figshare(src, tmp_path / "existing")


# --- import_unlabelled ---------------------------------------------------------------------


def _pool(root: Path, n: int) -> Path:
    for k in range(n):
        write_nifti(root / ("nested" if k % 2 else "") / f"u{k}.nii.gz", blob_volume(SHAPE, seed=200 + k)[0])
    return root


def test_unlabelled_adds_rows(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=SHAPE)
    before = read_manifest(dataset)
    classes_before = read_classes(dataset)
    summary = import_unlabelled(_pool(tmp_path / "pool", 4), dataset, threads=2)
    assert summary.n_imported == 4 and summary.problems == []

    after = read_manifest(dataset)
    pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
    added = after.iloc[len(before):]
    assert sorted(added["case_id"]) == ["unl-nested_u1", "unl-nested_u3", "unl-u0", "unl-u2"]
    assert (added["split"] == "unlabelled").all() and (added["source"] == "unlabelled").all()
    assert added["label"].isna().all() and added["label_name"].isna().all()
    assert added["mask"].isna().all() and added["mask_kind"].isna().all()
    pd.testing.assert_frame_equal(read_classes(dataset), classes_before)
    assert validate_dataset(dataset).ok


def test_unlabelled_second_import_adds_only_new_files(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    pool = _pool(tmp_path / "pool", 2)
    BAD_CASES[0].write(pool)
    import_unlabelled(pool, dataset)
    before = read_manifest(dataset)
    summary = import_unlabelled(pool, dataset)
    assert summary.n_imported == 0 and summary.n_already_in_manifest == 2
    pd.testing.assert_frame_equal(read_manifest(dataset), before)
    assert len(_quarantine(dataset)) == 1  # the bad file checked again, not listed twice

    write_nifti(pool / "u9.nii.gz", blob_volume(SHAPE, seed=209)[0])
    summary = import_unlabelled(pool, dataset)
    assert summary.n_imported == 1 and summary.n_already_in_manifest == 2
    assert read_manifest(dataset)["case_id"].tolist() == [*before["case_id"], "unl-u9"]


def test_unlabelled_nothing_new_is_an_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    pool = _pool(tmp_path / "pool", 2)
    import_unlabelled(pool, dataset)
    before = read_manifest(dataset)
    with pytest.raises(DatasetError, match=r"pool: all 2 file\(s\) are already in the manifest of .*ds \(imported twice\?\)$"):
        import_unlabelled(pool, dataset)
    pd.testing.assert_frame_equal(read_manifest(dataset), before)
    with pytest.raises(DatasetError, match="all 3 file"):
        import_unlabelled(dataset / "images", dataset)  # stored relative to the dataset


def test_unlabelled_another_file_with_a_taken_case_id_is_an_error(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    import_unlabelled(_pool(tmp_path / "pool", 1), dataset)
    before = read_manifest(dataset)
    expected = r"other_pool/u0.nii.gz: case_id 'unl-u0' is already in the manifest, for .*/pool/u0.nii.gz; rename the file$"
    with pytest.raises(DatasetError, match=expected):
        import_unlabelled(_pool(tmp_path / "other_pool", 1), dataset)
    pd.testing.assert_frame_equal(read_manifest(dataset), before)


@pytest.mark.parametrize(
    "names",
    [("x.nii", "x.nii.gz"), ("a b.nii.gz", "a_b.nii.gz"), ("sub/y.nii.gz", "sub_y.nii.gz")],
)
def test_unlabelled_names_giving_one_case_id_are_refused(tmp_path, names):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    before = read_manifest(dataset)
    pool = tmp_path / "pool"
    for k, name in enumerate(names):
        write_nifti(pool / name, blob_volume(SHAPE, seed=200 + k)[0])
    with pytest.raises(DatasetError, match=f"pool: files {', '.join(repr(n) for n in names)} give the same case_id"):
        import_unlabelled(pool, dataset)
    pd.testing.assert_frame_equal(read_manifest(dataset), before)


def test_unlabelled_skips_files_the_manifest_holds(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    before = read_manifest(dataset)
    pool = _pool(tmp_path / "pool", 2)
    # A labelled image and a mask under other names: neither may reach pre-training.
    (pool / "scan7.nii.gz").symlink_to(dataset / "images" / "c000.nii.gz")
    (pool / "scan8.nii.gz").symlink_to(dataset / "masks" / "c001.nii.gz")
    summary = import_unlabelled(pool, dataset)
    assert summary.n_imported == 2 and summary.n_already_in_manifest == 2
    assert summary.summary().endswith("; skipped 2 file(s) the manifest already holds")
    added = read_manifest(dataset).iloc[len(before):]
    assert sorted(added["case_id"]) == ["unl-nested_u1", "unl-u0"]


def test_unlabelled_bad_files_quarantined(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    pool = _pool(tmp_path / "pool", 3)
    bad = [c for c in BAD_CASES if c.culprit == "image" and c.name not in ("missing_image", "text_file")]
    for case in bad:
        _, mask = case.write(pool / "bad" / case.name)
        if mask is not None:
            mask.unlink()  # a pool holds images only
    summary = import_unlabelled(pool, dataset)
    assert summary.n_imported == 3 and summary.n_quarantined == len(bad)
    manifest = read_manifest(dataset)
    assert (manifest["case_id"].str.startswith("unl-bad")).sum() == 0
    quarantine = _quarantine(dataset)
    assert len(quarantine) == len(bad)
    for case in bad:
        (row,) = quarantine[quarantine["file"].str.contains(f"/bad/{case.name}/")].itertuples()
        assert re.search(case.reason, row.reason, re.IGNORECASE), (case.name, row.reason)

    # A later import keeps the earlier quarantine entries.
    more = tmp_path / "more"
    write_nifti(more / "fine.nii.gz", blob_volume(SHAPE, seed=300)[0])
    BAD_CASES[0].write(more)
    import_unlabelled(more, dataset)
    assert len(_quarantine(dataset)) == len(bad) + 1


def test_unlabelled_errors(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    with pytest.raises(DatasetError, match="source folder does not exist"):
        import_unlabelled(tmp_path / "nope", dataset)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \.nii or \.nii\.gz files"):
        import_unlabelled(tmp_path / "empty", dataset)
    with pytest.raises(DatasetError, match="no such dataset directory"):
        import_unlabelled(_pool(tmp_path / "pool", 1), tmp_path / "missing")
