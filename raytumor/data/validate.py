"""Dataset validation: every case read fully, every problem named with its file and reason."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from raytumor.data.layout import MANIFEST_FILE, PrepareSettings
from raytumor.data.manifest import ClassTableError, read_classes, read_manifest, resolve_path
from raytumor.data.volumes import Volume, VolumeError, check_image_content, check_mask, read_volume
from raytumor.storage import atomic_write_text

QUARANTINE_FILE = "quarantine.csv"


@dataclass(frozen=True)
class CaseProblem:
    """``file``: in a :class:`ValidationReport`, the path as the manifest stores it."""

    case_id: str
    file: str
    reason: str


@dataclass
class ValidationReport:
    n_cases: int
    problems: list[CaseProblem] = field(default_factory=list)
    orientations: dict[str, int] = field(default_factory=dict)
    # The manifest's case_id column, one entry per row, so that counts are of rows.
    case_ids: list[str] = field(default_factory=list)

    @property
    def bad_case_ids(self) -> set[str]:
        return {p.case_id for p in self.problems}

    @property
    def n_bad(self) -> int:
        """Manifest rows with a problem: both rows of a duplicated case_id, not dataset-wide ones ("*")."""
        if self.case_ids:
            bad = self.bad_case_ids
            return sum(case_id in bad for case_id in self.case_ids)
        return len(self.bad_case_ids - {"*"})

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        good = self.n_cases - self.n_bad
        text = f"{good} of {self.n_cases} cases valid, {self.n_bad} quarantined"
        if self.orientations:
            text += " (orientations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.orientations.items())) + "; all reoriented to RAS)"
        return text

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([p.__dict__ for p in self.problems], columns=["case_id", "file", "reason"])


def check_case(image_path: str, mask_path: str | None, *, allow_2d: bool = False) -> tuple[Volume, Volume | None]:
    """Read a case's image and mask fully; raise ``(file, reason)`` as a :class:`CaseCheckError`
    whose ``role`` says which of the two is at fault."""
    image = _read_case_file(image_path, "image", allow_2d)
    try:
        check_image_content(image.data)
    except VolumeError as exc:
        raise CaseCheckError(image_path, str(exc), "image") from None
    mask = None
    if mask_path is not None:
        mask = _read_case_file(mask_path, "mask", allow_2d)
        try:
            check_mask(mask, image)
            check_mask_labels(mask.data)
        except VolumeError as exc:
            raise CaseCheckError(mask_path, str(exc), "mask") from None
    return image, mask


def _read_case_file(path: str, role: str, allow_2d: bool) -> Volume:
    if "://" in path:
        scheme = path.split("://", 1)[0]
        raise CaseCheckError(path, f"cannot read {scheme}:// URIs; give a local path or a file:///path URI", role)
    try:
        return read_volume(path, allow_2d=allow_2d)
    except VolumeError as exc:
        raise CaseCheckError(path, str(exc), role) from None


def check_mask_labels(data: np.ndarray) -> None:
    """A mask is a label map of integers >= 0, 0 the background; any positive label is tumour
    (BraTS's 1, 2 and 4). Preprocessing keeps ``mask > 0``, so negative labels would vanish, and
    fractions mean image intensities or an interpolated mask."""
    lowest = float(data.min())
    if lowest < 0:
        raise VolumeError(f"negative values (min {lowest:g}); a mask holds integer labels >= 0")
    fractional = data != np.floor(data)
    if fractional.any():
        raise VolumeError(f"non-integer values (e.g. {float(data[fractional][0]):g}); a mask holds integer "
                          "labels >= 0, not intensities or an interpolated mask")


class CaseCheckError(Exception):
    """``role``: which file of the case is at fault (``image`` or ``mask``)."""

    def __init__(self, file: str, reason: str, role: str = "file"):
        super().__init__(f"{role} {file}: {reason}")
        self.file = file
        self.reason = reason
        self.role = role


def check_ground_truth_mask(mask: Volume | None, mask_kind: str | None, mask_path: str | None) -> None:
    """A ground-truth mask (any ``mask_kind`` but ``pseudo``) must mark some tumour; a pseudo
    mask may be empty (the segmenter found nothing)."""
    if mask is not None and mask_kind != "pseudo" and not np.any(mask.data > 0):
        raise CaseCheckError(mask_path, "empty ground-truth mask (no voxel > 0)", "mask")


def table_problems(manifest: pd.DataFrame, class_labels: Iterable[int] | None) -> list[CaseProblem]:
    """Problems visible from the manifest alone: duplicate ids, labels missing from the class table."""
    problems = []
    duplicated = manifest["case_id"].duplicated(keep=False)
    for row in manifest[duplicated].itertuples(index=False):
        problems.append(CaseProblem(row.case_id, MANIFEST_FILE, "duplicate case_id"))
    if class_labels is not None:
        known = {int(x) for x in class_labels}
        labelled = manifest[manifest["label"].notna()]
        for row in labelled[~labelled["label"].astype(int).isin(known)].itertuples(index=False):
            problems.append(CaseProblem(row.case_id, MANIFEST_FILE, f"label {int(row.label)} not in the class table"))
    return problems


def shared_image_problems(manifest: pd.DataFrame, dataset_dir: str | os.PathLike) -> list[CaseProblem]:
    """Every row whose image file an earlier row already uses: the case counts twice, and
    across splits the test set leaks into training. Compares paths (symlinks followed), not
    contents."""
    first_row_of: dict[str, tuple] = {}
    problems = []
    for row in manifest.itertuples(index=False):
        path = resolve_path(dataset_dir, row.image)
        key = path if "://" in path else os.path.realpath(path)
        first = first_row_of.setdefault(key, row)
        if first is not row:
            problems.append(CaseProblem(row.case_id, row.image,
                                        f"image: also the image of case {first.case_id} (split {first.split})"))
    return problems


def validate_dataset(
    dataset_dir: str | os.PathLike,
    *,
    threads: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Read every case of a dataset fully and collect every problem.

    A file's problem names it as the manifest stores it, and says whether it is the image or
    the mask. 2-D images are judged as preprocessing judges them (``PrepareSettings.allow_2d``),
    so a dataset that validates is prepared without quarantine. A ground-truth mask (any
    ``mask_kind`` but ``pseudo``) must mark some tumour.

    Threads suffice here: decompression and NumPy release the GIL. The same checks run
    inside the Ray Data preprocessing, so a run never depends on ``validate`` being called.
    """
    manifest = read_manifest(dataset_dir)
    report = ValidationReport(n_cases=len(manifest), case_ids=manifest["case_id"].tolist())
    try:
        class_labels = read_classes(dataset_dir)["label"].tolist()
    except ClassTableError as exc:
        class_labels = None
        # A dataset of unlabelled cases needs no class table, but a broken one is still broken.
        if exc.file.is_file() or manifest["label"].notna().any():
            report.problems.append(CaseProblem("*", exc.file.name, exc.reason))
    report.problems.extend(table_problems(manifest, class_labels))
    report.problems.extend(shared_image_problems(manifest, dataset_dir))

    def one(row) -> tuple[CaseProblem | None, str | None]:
        try:
            mask_path = resolve_path(dataset_dir, row.mask)
            image, mask = check_case(resolve_path(dataset_dir, row.image), mask_path, allow_2d=PrepareSettings.allow_2d)
            check_ground_truth_mask(mask, row.mask_kind, mask_path)
        except CaseCheckError as exc:
            stored = row.image if exc.role == "image" else row.mask
            return CaseProblem(row.case_id, stored, f"{exc.role}: {exc.reason}"), None
        return None, image.orientation

    rows = list(manifest.itertuples(index=False))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (problem, orientation) in enumerate(pool.map(one, rows), start=1):
            if problem is not None:
                report.problems.append(problem)
            if orientation is not None:
                report.orientations[orientation] = report.orientations.get(orientation, 0) + 1
            if progress is not None:
                progress(done, len(rows))
    return report


def write_quarantine(path: str | os.PathLike, problems: list[CaseProblem]) -> None:
    frame = pd.DataFrame([p.__dict__ for p in problems], columns=["case_id", "file", "reason"])
    atomic_write_text(path, frame.to_csv(index=False))
