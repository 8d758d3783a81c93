"""Dataset validation: every case read fully, every problem named with its file and reason."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pandas as pd

from raytumor.data.manifest import read_classes, read_manifest, resolve_path
from raytumor.data.volumes import Volume, VolumeError, check_image_content, check_mask, read_volume
from raytumor.storage import atomic_write_text

QUARANTINE_FILE = "quarantine.csv"


@dataclass(frozen=True)
class CaseProblem:
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
    """Read a case's image and mask fully; raise ``(file, reason)`` as a :class:`CaseCheckError`."""
    try:
        image = read_volume(image_path, allow_2d=allow_2d)
        check_image_content(image.data)
    except VolumeError as exc:
        raise CaseCheckError(image_path, str(exc)) from None
    mask = None
    if mask_path is not None:
        try:
            mask = read_volume(mask_path, allow_2d=allow_2d)
            check_mask(mask, image)
        except VolumeError as exc:
            raise CaseCheckError(mask_path, str(exc)) from None
    return image, mask


class CaseCheckError(Exception):
    def __init__(self, file: str, reason: str):
        super().__init__(f"{os.path.basename(file)}: {reason}")
        self.file = file
        self.reason = reason


def table_problems(manifest: pd.DataFrame, class_labels: Iterable[int] | None) -> list[CaseProblem]:
    """Problems visible from the manifest alone: duplicate ids, labels missing from the class table."""
    problems = []
    duplicated = manifest["case_id"].duplicated(keep=False)
    for row in manifest[duplicated].itertuples(index=False):
        problems.append(CaseProblem(row.case_id, "manifest.parquet", "duplicate case_id"))
    if class_labels is not None:
        known = {int(x) for x in class_labels}
        labelled = manifest[manifest["label"].notna()]
        for row in labelled[~labelled["label"].astype(int).isin(known)].itertuples(index=False):
            problems.append(CaseProblem(row.case_id, "manifest.parquet", f"label {int(row.label)} not in the class table"))
    return problems


def validate_dataset(
    dataset_dir: str | os.PathLike,
    *,
    allow_2d: bool = False,
    threads: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Read every case of a dataset fully and collect every problem.

    Threads suffice here: decompression and NumPy release the GIL. The same checks run
    inside the Ray Data preprocessing, so a run never depends on ``validate`` being called.
    """
    manifest = read_manifest(dataset_dir)
    try:
        class_labels = read_classes(dataset_dir)["label"].tolist()
    except Exception:  # noqa: BLE001 - a missing class table is reported below
        class_labels = None
    report = ValidationReport(n_cases=len(manifest), case_ids=manifest["case_id"].tolist())
    report.problems.extend(table_problems(manifest, class_labels))
    if class_labels is None and manifest["label"].notna().any():
        report.problems.append(CaseProblem("*", "classes.parquet", "missing class table"))

    def one(row) -> tuple[str, CaseProblem | None, str | None]:
        image_path = resolve_path(dataset_dir, row.image)
        mask_path = resolve_path(dataset_dir, row.mask)
        try:
            image, _ = check_case(image_path, mask_path, allow_2d=allow_2d)
        except CaseCheckError as exc:
            return row.case_id, CaseProblem(row.case_id, exc.file, exc.reason), None
        return row.case_id, None, image.orientation

    rows = list(manifest.itertuples(index=False))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (_, problem, orientation) in enumerate(pool.map(one, rows), start=1):
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
