"""Validation: every bad case is named with its file and a one-line reason; good cases survive."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raytumor.data.manifest import CLASSES_FILE, read_manifest, write_manifest
from raytumor.data.validate import CaseCheckError, check_case, validate_dataset, write_quarantine
from tests.conftest import blob_volume, make_dataset, write_nifti
from tests.data.bad_volumes import BAD_CASES, SHAPE, BadCase

N_GOOD = 9


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "ds", n_per_class=(3, 3, 3), shape=SHAPE)


def _add_rows(dataset: Path, rows: list[dict]) -> None:
    manifest = read_manifest(dataset)
    write_manifest(dataset, pd.concat([manifest, pd.DataFrame(rows)], ignore_index=True))


def _row(case_id: str, dataset: Path, image: Path, mask: Path | None, label: int = 0) -> dict:
    rel = lambda p: None if p is None else str(p.relative_to(dataset))  # noqa: E731 - stored relative, like importers
    return dict(case_id=case_id, image=rel(image), mask=rel(mask), label=label, label_name=f"type{label}",
                patient_id=None, split="train", source="test", mask_kind="ground_truth" if mask else None)


def _add_bad(dataset: Path, cases: list[BadCase]) -> dict[str, Path]:
    """Add each bad case to the manifest; returns case_id -> the file its problem must name."""
    rows, culprits = [], {}
    for case in cases:
        image, mask = case.write(dataset / "bad" / case.name)
        rows.append(_row(f"bad-{case.name}", dataset, image, mask))
        culprits[f"bad-{case.name}"] = image if case.culprit == "image" else mask
    _add_rows(dataset, rows)
    return culprits


def test_good_dataset_is_ok(dataset):
    calls = []
    report = validate_dataset(dataset, threads=2, progress=lambda done, total: calls.append((done, total)))
    assert report.ok and report.problems == []
    assert report.n_cases == N_GOOD and report.n_bad == 0
    assert report.orientations == {"RAS": N_GOOD}
    assert report.summary().startswith(f"{N_GOOD} of {N_GOOD} cases valid, 0 quarantined")
    assert calls[-1] == (N_GOOD, N_GOOD) and len(calls) == N_GOOD


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.name for c in BAD_CASES])
def test_each_bad_case_is_named(dataset, case):
    culprits = _add_bad(dataset, [case])
    report = validate_dataset(dataset, threads=2)
    assert not report.ok
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.case_id == f"bad-{case.name}"
    assert problem.file == str(culprits[problem.case_id].relative_to(dataset))  # as the manifest stores it
    assert problem.reason.startswith(f"{case.culprit}: ")
    assert re.search(case.reason, problem.reason, re.IGNORECASE), problem.reason
    assert "\n" not in problem.reason and str(dataset) not in problem.reason
    assert report.n_bad == 1 and report.n_cases == N_GOOD + 1
    assert report.summary().startswith(f"{N_GOOD} of {N_GOOD + 1} cases valid, 1 quarantined")


def test_whole_corpus_at_once(dataset):
    culprits = _add_bad(dataset, BAD_CASES)
    good_image, _ = blob_volume(SHAPE, seed=50)
    dup_a = write_nifti(dataset / "dup" / "a.nii.gz", good_image)
    dup_b = write_nifti(dataset / "dup" / "b.nii.gz", good_image + 1)
    stray = write_nifti(dataset / "dup" / "stray.nii.gz", good_image)
    _add_rows(dataset, [_row("dup", dataset, dup_a, None), _row("dup", dataset, dup_b, None),
                        _row("stray-label", dataset, stray, None, label=7)])
    report = validate_dataset(dataset, threads=2)

    by_case: dict[str, list] = {}
    for problem in report.problems:
        by_case.setdefault(problem.case_id, []).append(problem)
    assert set(by_case) == set(culprits) | {"dup", "stray-label"}
    for case in BAD_CASES:
        (problem,) = by_case[f"bad-{case.name}"]
        assert problem.file == str(culprits[problem.case_id].relative_to(dataset))
        assert problem.reason.startswith(f"{case.culprit}: ")
        assert re.search(case.reason, problem.reason, re.IGNORECASE), (case.name, problem.reason)
    assert [(p.file, p.reason) for p in by_case["dup"]] == [("manifest.parquet", "duplicate case_id")] * 2
    (stray_problem,) = by_case["stray-label"]
    assert stray_problem.file == "manifest.parquet" and stray_problem.reason == "label 7 not in the class table"

    n_rows = N_GOOD + len(BAD_CASES) + 3
    assert report.n_cases == n_rows
    # Both rows of a duplicated case_id are bad: only the original cases are good.
    assert report.n_bad == n_rows - N_GOOD
    assert report.summary().startswith(f"{N_GOOD} of {n_rows} cases valid")
    assert all("\n" not in p.reason for p in report.problems)

    frame = report.to_frame()
    assert list(frame.columns) == ["case_id", "file", "reason"] and len(frame) == len(report.problems)


def test_missing_class_table_is_reported(dataset):
    (dataset / CLASSES_FILE).unlink()
    report = validate_dataset(dataset)
    assert [(p.case_id, p.file, p.reason) for p in report.problems] == [("*", "classes.parquet", "missing class table")]
    assert report.summary().startswith(f"{N_GOOD} of {N_GOOD} cases valid")


def test_orientations_are_counted(dataset):
    image, mask = blob_volume(SHAPE, seed=9)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    image_path = write_nifti(dataset / "lps" / "img.nii.gz", image, lps)
    mask_path = write_nifti(dataset / "lps" / "mask.nii.gz", mask, lps)
    _add_rows(dataset, [_row("lps", dataset, image_path, mask_path)])
    report = validate_dataset(dataset)
    assert report.ok
    assert report.orientations == {"RAS": N_GOOD, "LPS": 1}


def test_mask_orientation_must_match_image(tmp_path):
    image, mask = blob_volume(SHAPE)
    image_path = write_nifti(tmp_path / "img.nii.gz", image)
    mask_path = write_nifti(tmp_path / "mask.nii.gz", mask, np.diag([-1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(CaseCheckError) as info:
        check_case(str(image_path), str(mask_path))
    assert info.value.file == str(mask_path) and "orientation" in info.value.reason


def test_check_case_reads_image_and_mask(tmp_path):
    image, mask = blob_volume(SHAPE)
    image_path = write_nifti(tmp_path / "img.nii.gz", image)
    mask_path = write_nifti(tmp_path / "mask.nii.gz", mask)
    volume, mask_volume = check_case(str(image_path), str(mask_path))
    np.testing.assert_allclose(volume.data, image)
    np.testing.assert_array_equal(mask_volume.data, mask)
    assert volume.data.dtype == np.float32 and volume.orientation == "RAS"
    _, none = check_case(str(image_path), None)
    assert none is None


def test_check_case_allow_2d(tmp_path):
    image, _ = blob_volume(SHAPE)
    path = write_nifti(tmp_path / "slice.nii.gz", image[:, :, 0])
    with pytest.raises(CaseCheckError, match="2-D"):
        check_case(str(path), None)
    volume, _ = check_case(str(path), None, allow_2d=True)
    assert volume.data.shape == (SHAPE[0], SHAPE[1], 1)


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    image, _ = blob_volume(SHAPE)
    path = write_nifti(tmp_path / "img.nii.gz", image[..., np.newaxis])
    volume, _ = check_case(str(path), None)
    assert volume.data.shape == SHAPE


def test_write_quarantine(tmp_path, dataset):
    _add_bad(dataset, BAD_CASES[:3])
    report = validate_dataset(dataset)
    write_quarantine(tmp_path / "q.csv", report.problems)
    frame = pd.read_csv(tmp_path / "q.csv")
    assert list(frame.columns) == ["case_id", "file", "reason"]
    assert sorted(frame["case_id"]) == sorted(f"bad-{c.name}" for c in BAD_CASES[:3])
    write_quarantine(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text().strip() == "case_id,file,reason"


def test_rows_sharing_an_image_are_flagged_after_the_first(dataset):
    manifest = read_manifest(dataset)
    first = manifest.iloc[0]
    image = dataset / first["image"]
    (dataset / "links").mkdir()
    (dataset / "links" / "same.nii.gz").symlink_to(image)
    leak = lambda case_id, path, split: dict(  # noqa: E731
        case_id=case_id, image=path, mask=None, label=int(first["label"]), label_name=first["label_name"],
        patient_id=None, split=split, source="test", mask_kind=None)
    _add_rows(dataset, [leak("again-relative", f"./images/../{first['image']}", "test"),
                        leak("again-absolute", str(image), "val"),
                        leak("again-symlink", "links/same.nii.gz", "train")])
    report = validate_dataset(dataset, threads=2)
    assert [(p.case_id, p.file) for p in report.problems] == [
        ("again-relative", f"./images/../{first['image']}"), ("again-absolute", str(image)),
        ("again-symlink", "links/same.nii.gz")]
    for problem in report.problems:
        assert problem.reason == f"image: also the image of case {first['case_id']} (split {first['split']})"
    assert report.n_bad == 3  # the first row keeps its image


def _with_mask(dataset: Path, case_id: str, mask: np.ndarray, mask_kind: str = "ground_truth") -> str:
    """A good image with ``mask``; returns the mask's path as the manifest stores it."""
    image, _ = blob_volume(SHAPE, seed=7)
    image_path = write_nifti(dataset / "masked" / f"{case_id}.nii.gz", image)
    mask_path = write_nifti(dataset / "masked" / f"{case_id}_mask.nii.gz", mask)
    _add_rows(dataset, [{**_row(case_id, dataset, image_path, mask_path), "mask_kind": mask_kind}])
    return str(mask_path.relative_to(dataset))


def test_mask_contents_are_checked(dataset):
    image, blob = blob_volume(SHAPE, seed=7)
    negative = _with_mask(dataset, "negative", -blob.astype(np.float32))
    continuous = _with_mask(dataset, "image-as-mask", image - image.min() + 0.5)
    empty = _with_mask(dataset, "empty", np.zeros(SHAPE, dtype=np.uint8))
    report = validate_dataset(dataset, threads=2)
    problems = {p.case_id: p for p in report.problems}
    assert set(problems) == {"negative", "image-as-mask", "empty"}
    assert problems["negative"].file == negative
    assert re.fullmatch(r"mask: negative values \(min -1\).*", problems["negative"].reason)
    assert problems["image-as-mask"].file == continuous
    assert problems["image-as-mask"].reason.startswith("mask: non-integer values")
    assert problems["empty"].file == empty
    assert problems["empty"].reason == "mask: empty ground-truth mask (no voxel > 0)"
    with pytest.raises(CaseCheckError, match="negative values") as info:
        check_case(str(dataset / "masked" / "negative.nii.gz"), str(dataset / negative))
    assert info.value.role == "mask"  # preprocessing and the importers quarantine it too


def test_label_maps_and_empty_pseudo_masks_are_valid(dataset):
    _, blob = blob_volume(SHAPE, seed=7)
    brats = blob.astype(np.int16)
    brats[blob > 0] = np.resize([1, 2, 4], int(blob.sum()))  # BraTS: 1 necrosis, 2 oedema, 4 enhancing
    _with_mask(dataset, "brats", brats)
    _with_mask(dataset, "no-tumour-found", np.zeros(SHAPE, dtype=np.uint8), mask_kind="pseudo")
    report = validate_dataset(dataset, threads=2)
    assert report.ok, report.problems


def test_image_and_mask_with_one_basename_are_told_apart(dataset):
    manifest = read_manifest(dataset)
    case = manifest.iloc[0]
    assert Path(case["image"]).name == Path(case["mask"]).name
    write_nifti(dataset / case["mask"], np.zeros((3, 3, 3), dtype=np.uint8))
    (problem,) = validate_dataset(dataset).problems
    assert problem.file == case["mask"] and problem.reason.startswith("mask: mask shape")


def test_gzip_cut_short_in_the_header_is_named(tmp_path):
    image, _ = blob_volume(SHAPE)
    raw = write_nifti(tmp_path / "img.nii.gz", image).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[:60])
    with pytest.raises(CaseCheckError) as info:
        check_case(str(cut), None)
    assert info.value.reason.startswith("truncated or corrupt gzip (EOFError"), info.value.reason
    not_gzip = tmp_path / "text.nii.gz"
    not_gzip.write_text("notes")
    with pytest.raises(CaseCheckError, match="not NIfTI"):
        check_case(str(not_gzip), None)


def test_file_uris_are_read_and_other_schemes_named(dataset):
    image, _ = blob_volume(SHAPE, seed=3)
    path = write_nifti(dataset / "uri" / "my scan.nii.gz", image)
    rows = [dict(_row("file-uri", dataset, path, None), image=path.as_uri()),
            dict(_row("s3", dataset, path, None), image="s3://bucket/scan.nii.gz")]
    _add_rows(dataset, rows)
    (problem,) = validate_dataset(dataset).problems
    assert problem.case_id == "s3" and problem.file == "s3://bucket/scan.nii.gz"
    assert problem.reason == "image: cannot read s3:// URIs; give a local path or a file:///path URI"


def test_two_d_images_are_judged_as_preprocessing_judges_them(dataset):
    from raytumor.data.layout import PrepareSettings

    assert PrepareSettings().allow_2d is False  # `data prepare` quarantines them too
    image, _ = blob_volume(SHAPE)
    path = write_nifti(dataset / "slices" / "s.nii.gz", image[:, :, 0])
    _add_rows(dataset, [_row("slice", dataset, path, None)])
    (problem,) = validate_dataset(dataset).problems
    assert problem.case_id == "slice" and "2-D image" in problem.reason


@pytest.mark.parametrize("write, reason", [
    (lambda d: (d / "classes.parquet").write_bytes(b"junk"), r"unreadable class table \(ArrowInvalid"),
    (lambda d: ((d / "classes.parquet").unlink(), (d / "classes.csv").write_text("label,name\n0,a\n")),
     r"missing column\(s\) count, rare"),
])
def test_broken_class_table_says_what_is_wrong(dataset, write, reason):
    write(dataset)
    problems = validate_dataset(dataset).problems
    assert len(problems) == 1 and problems[0].case_id == "*"
    assert problems[0].file in ("classes.parquet", "classes.csv")
    assert re.match(reason, problems[0].reason), problems[0].reason
    assert "\n" not in problems[0].reason and str(dataset) not in problems[0].reason
