"""BraTS-style folders: the 2019 (class folders), 2020 (name_mapping.csv) and 2023 (kind in
the name) layouts, as a labelled dataset or as an unlabelled pool."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from raytumor.data.importers import IMPORT_QUARANTINE_FILE, import_brats, import_unlabelled
from raytumor.data.manifest import read_classes, read_manifest, resolve_path
from raytumor.data.validate import validate_dataset
from raytumor.errors import DatasetError
from tests.conftest import blob_volume, make_dataset, write_nifti
from tests.data.bad_volumes import SHAPE

OLD_TOKENS = ("t1", "t1ce", "t2", "flair", "seg")
NEW_TOKENS = ("t1n", "t1c", "t2w", "t2f", "seg")


def write_case(folder: Path, name: str, *, tokens=OLD_TOKENS, sep: str = "_", ext: str = ".nii.gz", seed: int = 0) -> dict[str, Path]:
    """One case's files: a distinct volume per modality; ``seg`` holds BraTS's labels 1, 2 and 4."""
    files = {}
    for k, token in enumerate(tokens):
        image, mask = blob_volume(SHAPE, radius=2.5, seed=seed * 10 + k)
        if token == "seg":
            data = mask.astype(np.uint8)
            data[data > 0] = 2
            data[SHAPE[0] // 2, SHAPE[1] // 2, :] *= 2  # necrotic core 4 where the blob is
            data[(data == 2) & (image > 185)] = 1
        else:
            data = image
        files[token] = write_nifti(folder / f"{name}{sep}{token}{ext}", data)
    return files


def brats_2019(root: Path, per_grade: int = 4) -> Path:
    top = root / "MICCAI_BraTS_2019_Data_Training"
    for g, grade in enumerate(("HGG", "LGG")):
        for k in range(per_grade):
            name = f"BraTS19_{grade}_{k}"
            write_case(top / grade / name, name, seed=g * 100 + k)
    return root


def _quarantine(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / IMPORT_QUARANTINE_FILE, dtype=str, keep_default_na=False)


def test_2019_class_folders_give_the_labels_and_seg_the_masks(tmp_path):
    src = brats_2019(tmp_path / "src")
    summary = import_brats(src, tmp_path / "ds", threads=2)
    assert summary.n_imported == 8 and summary.problems == []
    assert summary.summary() == f"imported 8 case(s) into {tmp_path / 'ds'}"
    manifest = read_manifest(tmp_path / "ds").set_index("case_id")
    assert sorted(manifest.index) == [f"BraTS19_{g}_{k}" for g in ("HGG", "LGG") for k in range(4)]
    for case_id, row in manifest.iterrows():
        grade = case_id.split("_")[1]
        assert row["label_name"] == grade and row["label"] == {"HGG": 0, "LGG": 1}[grade]
        assert resolve_path(tmp_path / "ds", row["image"]).endswith(f"/{grade}/{case_id}/{case_id}_t2.nii.gz")
        assert resolve_path(tmp_path / "ds", row["mask"]).endswith(f"/{case_id}_seg.nii.gz")
        assert row["mask_kind"] == "ground_truth" and row["source"] == "brats" and pd.isna(row["patient_id"])
        assert row["split"] in {"train", "val", "test"}
    classes = read_classes(tmp_path / "ds")
    assert classes[["label", "name", "count"]].values.tolist() == [[0, "HGG", 4], [1, "LGG", 4]]
    assert validate_dataset(tmp_path / "ds").ok  # seg's labels 1, 2 and 4 are a label map


@pytest.mark.parametrize("modality, token", [("flair", "flair"), ("T1ce", "t1ce"), ("t1gd", "t1ce"), ("t1", "t1")])
def test_the_modality_chooses_the_image(tmp_path, modality, token):
    src = brats_2019(tmp_path / "src", per_grade=2)
    import_brats(src, tmp_path / "ds", modality=modality)
    images = read_manifest(tmp_path / "ds")["image"]
    assert all(Path(image).name.endswith(f"_{token}.nii.gz") for image in images), images.tolist()


def brats_2020(root: Path, n: int = 6) -> Path:
    """Flat case folders of uncompressed .nii files, grades in name_mapping.csv; case 355's seg
    carries another name, as in the real release."""
    top = root / "MICCAI_BraTS2020_TrainingData"
    rows = []
    for k in range(1, n + 1):
        name = f"BraTS20_Training_{k:03d}"
        files = write_case(top / name, name, ext=".nii", seed=k)
        rows.append({"Grade": "HGG" if k % 2 else "LGG", "BraTS_2019_subject_ID": f"BraTS19_x_{k}",
                     "BraTS_2020_subject_ID": name})
    files["seg"].rename(files["seg"].with_name("W39_1998.09.19_Segm.nii"))
    pd.DataFrame(rows).to_csv(top / "name_mapping.csv", index=False)
    return root


def test_2020_grades_come_from_name_mapping_csv_found_in_the_folder(tmp_path):
    src = brats_2020(tmp_path / "src")
    summary = import_brats(src, tmp_path / "ds")
    assert summary.n_imported == 6 and summary.n_unnamed_files == 1
    assert summary.summary().endswith("; ignored 1 NIfTI file(s) not named <case>_<modality>")
    manifest = read_manifest(tmp_path / "ds").set_index("case_id")
    expected = {f"BraTS20_Training_{k:03d}": "HGG" if k % 2 else "LGG" for k in range(1, 7)}
    assert manifest["label_name"].to_dict() == expected
    assert manifest["image"].str.endswith("_t2.nii").all()
    # The last case's seg was renamed: it comes without a mask instead of with a wrong one.
    assert manifest["mask"].isna().tolist() == [False] * 5 + [True]
    assert manifest["mask_kind"].isna().tolist() == [False] * 5 + [True]


def test_a_case_missing_from_the_csv_is_quarantined_with_the_reason(tmp_path):
    src = brats_2020(tmp_path / "src")
    csv = src / "MICCAI_BraTS2020_TrainingData" / "name_mapping.csv"
    table = pd.read_csv(csv)
    table.loc[1, "Grade"] = ""
    table.drop(index=2).to_csv(csv, index=False)
    summary = import_brats(src, tmp_path / "ds")
    assert summary.n_imported == 4 and summary.n_quarantined == 2
    quarantine = _quarantine(tmp_path / "ds")
    assert sorted(quarantine["case_id"]) == ["BraTS20_Training_002", "BraTS20_Training_003"]
    assert (quarantine["reason"] == f"no Grade for it in {csv}").all()
    assert quarantine["file"].str.endswith("_t2.nii").all()


def test_a_labels_csv_given_and_another_label_column(tmp_path):
    src = tmp_path / "src"
    for k in range(4):
        write_case(src / f"case{k}", f"case{k}", seed=k)
    labels = pd.DataFrame({"subject": [f"case{k}" for k in range(4)], "kind": ["b", "a", "b", "a"],
                           "Grade": ["x"] * 4})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    import_brats(src, tmp_path / "ds", labels_csv=tmp_path / "labels.csv", label_column="kind")
    manifest = read_manifest(tmp_path / "ds").set_index("case_id")
    assert manifest["label"].to_dict() == {"case0": 1, "case1": 0, "case2": 1, "case3": 0}


def brats_2023(root: Path) -> Path:
    """Three tumour kinds; patient 00001 of GLI has two time points."""
    names = ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000",
             "BraTS-MEN-00004-000", "BraTS-MEN-00005-000", "BraTS-MEN-00006-000",
             "BraTS-MET-00007-000", "BraTS-MET-00008-000", "BraTS-MET-00009-000"]
    for k, name in enumerate(names):
        challenge = name.split("-")[1]
        write_case(root / f"ASNR-MICCAI-BraTS2023-{challenge}-Challenge-TrainingData" / name, name,
                   tokens=NEW_TOKENS, sep="-", seed=k)
    return root


def test_2023_names_give_kind_and_patient(tmp_path):
    src = brats_2023(tmp_path / "src")
    summary = import_brats(src, tmp_path / "ds", modality="t2")
    assert summary.n_imported == 10 and summary.problems == []
    manifest = read_manifest(tmp_path / "ds").set_index("case_id")
    assert manifest["image"].str.endswith("-t2w.nii.gz").all() and manifest["mask"].str.endswith("-seg.nii.gz").all()
    assert manifest.loc["BraTS-GLI-00001-001", "label_name"] == "glioma"
    assert manifest.loc["BraTS-MEN-00004-000", "label_name"] == "meningioma"
    assert manifest.loc["BraTS-MET-00009-000", "label_name"] == "metastasis"
    assert read_classes(tmp_path / "ds")["name"].tolist() == ["glioma", "meningioma", "metastasis"]
    assert manifest.loc["BraTS-GLI-00001-001", "patient_id"] == "BraTS-GLI-00001"
    assert manifest.loc["BraTS-GLI-00001-000", "split"] == manifest.loc["BraTS-GLI-00001-001", "split"]


def test_bad_cases_are_quarantined_and_good_ones_kept(tmp_path):
    src = brats_2019(tmp_path / "src", per_grade=3)
    hgg = src / "MICCAI_BraTS_2019_Data_Training" / "HGG"
    write_case(hgg / "no_t2", "no_t2", tokens=("t1", "flair", "seg"), seed=50)
    write_case(hgg / "two_t2", "two_t2", tokens=("t2", "t2w", "seg"), seed=51)
    write_case(hgg / "two_seg", "two_seg", tokens=("t2", "seg"), seed=52)
    write_nifti(hgg / "two_seg" / "two_seg_seg.nii", blob_volume(SHAPE, seed=53)[1])
    nan = write_case(hgg / "NA", "NA", tokens=("t2", "seg"), seed=54)["t2"]
    image = nib.load(str(nan)).get_fdata()
    image[1, 1, 1] = np.nan
    write_nifti(nan, image)
    summary = import_brats(src, tmp_path / "ds")
    assert summary.n_imported == 6 and summary.n_quarantined == 4
    reasons = _quarantine(tmp_path / "ds").set_index("case_id")["reason"].to_dict()
    assert reasons["no_t2"] == "no t2 file (has flair, t1)"
    assert reasons["two_t2"] == "2 t2 files (two_t2_t2.nii.gz, two_t2_t2w.nii.gz); keep one"
    assert reasons["two_seg"] == "2 seg files (two_seg_seg.nii, two_seg_seg.nii.gz); keep one"
    assert "NaN/Inf" in reasons["NA"]
    assert len(read_manifest(tmp_path / "ds")) == 6


def test_no_labels_anywhere_is_an_error_that_points_to_the_unlabelled_import(tmp_path):
    src = tmp_path / "src"
    for k in range(3):
        write_case(src / f"BraTS2021_{k:05d}", f"BraTS2021_{k:05d}", seed=k)
    with pytest.raises(DatasetError, match=r"src: 3 BraTS case\(s\) but no class labels: no name_mapping.csv.*"
                                           r"raytumor data import-unlabelled SRC --into DATASET --modality t2$"):
        import_brats(src, tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"no case has a label \(no class folder above it"):
        import_brats(src, tmp_path / "ds", label_from="folder")
    with pytest.raises(DatasetError, match=r"src: no name_mapping.csv found; give the labels CSV with --labels-csv$"):
        import_brats(src, tmp_path / "ds", label_from="csv")
    assert not (tmp_path / "ds").exists()


def test_one_grade_folder_is_no_label_source_for_auto(tmp_path):
    src = tmp_path / "src"
    for k in range(3):
        write_case(src / "HGG" / f"c{k}", f"c{k}", seed=k)
    with pytest.raises(DatasetError, match="but no class labels"):
        import_brats(src, tmp_path / "ds")
    assert import_brats(src, tmp_path / "ds", label_from="folder").n_imported == 3  # asked for: one class


def test_errors_name_what_is_wrong(tmp_path):
    src = brats_2019(tmp_path / "src", per_grade=2)
    with pytest.raises(DatasetError, match=r"^modality 't3': not one of t1, t1ce, t2, flair"):
        import_brats(src, tmp_path / "ds", modality="t3")
    with pytest.raises(DatasetError, match=r"^label source 'grade': not one of auto, folder, challenge, csv$"):
        import_brats(src, tmp_path / "ds", label_from="grade")
    with pytest.raises(DatasetError, match=r"--labels-csv is read only with --label-from csv or auto, not folder"):
        import_brats(src, tmp_path / "ds", label_from="folder", labels_csv=tmp_path / "x.csv")
    with pytest.raises(DatasetError, match=r"nope: source folder does not exist"):
        import_brats(tmp_path / "nope", tmp_path / "ds")
    write_nifti(tmp_path / "plain" / "scan.nii.gz", blob_volume(SHAPE)[0])
    with pytest.raises(DatasetError, match=r"plain: no BraTS-style files found \(expected <case>_<modality>"):
        import_brats(tmp_path / "plain", tmp_path / "ds")

    csv = tmp_path / "labels.csv"
    pd.DataFrame({"id": ["a"], "label": ["x"]}).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"labels.csv: no column 'Grade' \(columns: id, label\); choose the label column"):
        import_brats(src, tmp_path / "ds", labels_csv=csv)
    with pytest.raises(DatasetError, match=r"labels.csv: no column holds the case names \(such as 'BraTS19_HGG_0'\)"):
        import_brats(src, tmp_path / "ds", labels_csv=csv, label_column="label")
    pd.DataFrame({"id": ["BraTS19_HGG_0", "BraTS19_HGG_0"], "label": ["x", "y"]}).to_csv(csv, index=False)
    with pytest.raises(DatasetError, match=r"labels.csv: line 3: id 'BraTS19_HGG_0' has label 'y', but 'x' on line 2$"):
        import_brats(src, tmp_path / "ds", labels_csv=csv, label_column="label")
    assert not (tmp_path / "ds").exists()


def test_one_case_name_in_two_folders_is_refused(tmp_path):
    src = tmp_path / "src"
    write_case(src / "HGG" / "X", "X", seed=1)
    write_case(src / "LGG" / "X", "X", seed=2)
    with pytest.raises(DatasetError, match=r"src: case folders 'HGG/X', 'LGG/X' give the same case_id 'X'; rename all but one$"):
        import_brats(src, tmp_path / "ds")


def test_two_csvs_named_name_mapping_want_a_choice(tmp_path):
    src = brats_2020(tmp_path / "src", n=2)
    (src / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\n")
    with pytest.raises(DatasetError, match=r"src: 2 name_mapping.csv files .*; choose one with --labels-csv$"):
        import_brats(src, tmp_path / "ds")


# --- the unlabelled pool -------------------------------------------------------------------


def test_unlabelled_brats_pool_adds_one_volume_per_case(tmp_path):
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3, 3), shape=SHAPE)
    before = read_manifest(dataset)
    pool = tmp_path / "BraTS2021"
    for k in range(3):
        write_case(pool / f"BraTS2021_{k:05d}", f"BraTS2021_{k:05d}", seed=k)
    write_case(pool / "BraTS2021_00009", "BraTS2021_00009", tokens=("t1", "seg"), seed=9)
    summary = import_unlabelled(pool, dataset, modality="t2w")
    assert summary.n_imported == 3 and summary.n_quarantined == 1
    added = read_manifest(dataset).iloc[len(before):]
    assert added["case_id"].tolist() == [f"unl-BraTS2021_{k:05d}" for k in range(3)]
    assert added["image"].str.endswith("_t2.nii.gz").all() and added["mask"].isna().all()
    assert (added["split"] == "unlabelled").all()
    (problem,) = _quarantine(dataset).itertuples()
    assert problem.case_id == "unl-BraTS2021_00009" and problem.reason == "no t2 file (has t1)"

    with pytest.raises(DatasetError, match=r"all 3 file\(s\) are already in the manifest"):
        import_unlabelled(pool, dataset, modality="t2")
    assert len(_quarantine(dataset)) == 1  # the case without t2 checked again, listed once
    with pytest.raises(DatasetError, match=r"case_id 'unl-BraTS2021_00000' is already in the manifest, for .*_t2.nii.gz"):
        import_unlabelled(pool, dataset, modality="flair")  # a second volume of a case is no new case
    only_t1 = tmp_path / "only_t1"
    write_case(only_t1 / "a", "a", tokens=("t1", "seg"), seed=20)
    with pytest.raises(DatasetError, match=r"only_t1: no case has a t1ce file$"):
        import_unlabelled(only_t1, dataset, modality="t1c")


def test_unlabelled_import_keeps_earlier_quarantine_ids_as_written(tmp_path):
    """An id such as "NA", quarantined by an earlier import, is not read back as a missing value."""
    dataset = make_dataset(tmp_path / "ds", n_per_class=(3,), shape=SHAPE)
    (dataset / IMPORT_QUARANTINE_FILE).write_text("case_id,file,reason\nNA,/x/NA.nii.gz,constant image\n")
    pool = tmp_path / "pool"
    write_case(pool / "a", "a", tokens=("t2",), seed=1)
    write_case(pool / "b", "b", tokens=("t1",), seed=2)
    import_unlabelled(pool, dataset, modality="t2")
    lines = (dataset / IMPORT_QUARANTINE_FILE).read_text().splitlines()
    assert lines == ["case_id,file,reason", "NA,/x/NA.nii.gz,constant image", f"unl-b,{pool / 'b'},no t2 file (has t1)"]
