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
    assert Path(problem.file) == culprits[problem.case_id].resolve()
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
        assert Path(problem.file) == culprits[problem.case_id].resolve()
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
