"""Importers: a folder + labels CSV, BraTS-style folders, the public Figshare brain-tumour set,
an unlabelled pool.

Each importer checks every case with the same checks as ``validate`` (every voxel read):
good cases go into the manifest, bad ones into ``import-quarantine.csv`` with reasons.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from raytumor.data.manifest import (
    DEFAULT_RARE_FRACTION,
    MANIFEST_FILE,
    build_class_table,
    labels_from_names,
    read_labels_csv,
    read_manifest,
    resolve_path,
    write_classes,
    write_manifest,
)
from raytumor.data.splits import DEFAULT_FRACTIONS, assign_splits
from raytumor.data.validate import CaseCheckError, CaseProblem, check_case, write_quarantine
from raytumor.errors import DatasetError

IMPORT_QUARANTINE_FILE = "import-quarantine.csv"
FIGSHARE_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}
LARGEST_LABEL = int(np.iinfo(np.int32).max)  # the manifest's label column is int32
# A Figshare image is stored in the first of these that holds every value exactly; the
# published set is int16.
FIGSHARE_IMAGE_DTYPES = (np.int16, np.uint16, np.int32, np.float32, np.float64)

Progress = Callable[[int, int], None]


@dataclass
class ImportSummary:
    dataset_dir: Path
    n_imported: int
    problems: list[CaseProblem] = field(default_factory=list)
    n_already_in_manifest: int = 0
    n_unnamed_files: int = 0  # NIfTI files a BraTS-style import could not tie to a case

    @property
    def n_quarantined(self) -> int:
        return len({p.case_id for p in self.problems})

    def summary(self) -> str:
        text = f"imported {self.n_imported} case(s) into {self.dataset_dir}"
        if self.problems:
            text += f"; {self.n_quarantined} quarantined (see {self.dataset_dir / IMPORT_QUARANTINE_FILE})"
        if self.n_already_in_manifest:
            text += f"; skipped {self.n_already_in_manifest} file(s) the manifest already holds"
        if self.n_unnamed_files:
            text += f"; ignored {self.n_unnamed_files} NIfTI file(s) not named <case>_<modality>"
        return text


@contextlib.contextmanager
def _new_dataset_dir(out: Path, subdirs: Iterable[str] = ()) -> Iterator[None]:
    """Create ``out`` (and ``subdirs`` in it) for an import; if the import fails, remove
    the directories it created that are still empty."""
    if (out / MANIFEST_FILE).exists():
        raise DatasetError(f"{out}: already holds a dataset; choose a new --out directory")
    wanted = [out / name for name in subdirs]
    created = [d for d in (*wanted, out, *out.parents) if not d.exists()]  # deepest first
    for directory in (out, *wanted):
        directory.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: it holds what the import wrote
                directory.rmdir()
        raise


def _file_case_id(prefix: str, stem: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_.-]", "_", stem)


def _refuse_clashing_case_ids(src: Path, case_ids: list[str], files: list[Path], what: str = "files") -> None:
    """Two files (or case folders) whose names give one case id would share a case (or overwrite its NIfTI)."""
    files_by_id: dict[str, list[Path]] = defaultdict(list)
    for case_id, path in zip(case_ids, files):
        files_by_id[case_id].append(path)
    clashes = {case_id: paths for case_id, paths in files_by_id.items() if len(paths) > 1}
    if clashes:
        case_id, paths = next(iter(clashes.items()))
        names = ", ".join(repr(str(p.relative_to(src))) for p in paths)
        more = f" ({len(clashes) - 1} more case_id(s) clash too)" if len(clashes) > 1 else ""
        raise DatasetError(f"{src}: {what} {names} give the same case_id {case_id!r}; rename all but one{more}")


def _check_rows(rows: list[dict], *, allow_2d: bool, threads: int, progress: Progress | None) -> tuple[list[dict], list[CaseProblem]]:
    """Split rows into those whose files pass every check and the problems of the others."""

    def one(row: dict) -> CaseProblem | None:
        try:
            check_case(row["_image_abs"], row.get("_mask_abs"), allow_2d=allow_2d)
        except CaseCheckError as exc:
            return CaseProblem(row["case_id"], exc.file, exc.reason)
        return None

    good, problems = [], []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, (row, problem) in enumerate(zip(rows, pool.map(one, rows)), start=1):
            (problems.append(problem) if problem else good.append(row))
            if progress:
                progress(done, len(rows))
    return good, problems


def _finish(
    out: Path,
    rows: list[dict],
    problems: list[CaseProblem],
    *,
    seed: int,
    fractions: tuple[float, float, float],
    rare_fraction: float,
    rare_classes: Iterable[int] | None,
    names: dict[int, str] | None = None,
) -> ImportSummary:
    if not rows:
        write_quarantine(out / IMPORT_QUARANTINE_FILE, problems)
        raise DatasetError(f"{out}: no case passed the checks; see {out / IMPORT_QUARANTINE_FILE}")
    frame = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    frame["split"] = None
    manifest = assign_splits(frame, fractions, seed)
    write_manifest(out, manifest)
    write_classes(out, build_class_table(manifest, names=names, rare_fraction=rare_fraction, rare_classes=rare_classes))
    write_quarantine(out / IMPORT_QUARANTINE_FILE, problems)
    return ImportSummary(out, len(rows), problems)


def _stored_path(path: Path, out: Path) -> str:
    """Relative to the dataset dir when inside it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(out.resolve()))
    except ValueError:
        return str(path)


def _csv_cells(column: pd.Series) -> list[str]:
    """A CSV column's stripped cells; a short (ragged) row's missing cell is ""."""
    return ["" if pd.isna(v) else str(v).strip() for v in column]


def _check_case_ids(case_ids: list[str], csv_path: Path) -> None:
    first_line: dict[str, int] = {}
    for line, case_id in enumerate(case_ids, start=2):
        if not case_id:
            raise DatasetError(f"{csv_path}: line {line}: empty case_id")
        if case_id in first_line:
            raise DatasetError(f"{csv_path}: line {line}: duplicate case_id {case_id!r} (first on line {first_line[case_id]})")
        first_line[case_id] = line


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_labels(cells: list[str], csv_path: Path) -> tuple[list[int], list[str], dict[int, str]]:
    """Labels are all integers (``1.0`` counts) or all class names, names mapped to ints in sorted order."""
    numbers = [_as_number(text) for text in cells]
    for line, (text, number) in enumerate(zip(cells, numbers), start=2):
        if not text:
            raise DatasetError(f"{csv_path}: line {line}: empty label")
        if number is not None and not number.is_integer():  # 1.5, NaN, inf
            raise DatasetError(f"{csv_path}: line {line}: label {text!r} is not an integer; a label is an integer or a class name")
    is_number = [number is not None for number in numbers]
    if any(is_number) and not all(is_number):
        line = is_number.index(not is_number[0]) + 2
        raise DatasetError(f"{csv_path}: column label mixes numbers and names (line {line}: {cells[line - 2]!r}); use one or the other")
    if all(is_number):
        for line, (text, number) in enumerate(zip(cells, numbers), start=2):
            if not 0 <= number <= LARGEST_LABEL:
                raise DatasetError(f"{csv_path}: line {line}: label {text!r} is out of range; labels go from 0 to {LARGEST_LABEL}")
        labels = [int(number) for number in numbers]
        return labels, [str(v) for v in labels], {v: str(v) for v in labels}
    mapping = labels_from_names(cells)
    return [mapping[v] for v in cells], cells, {i: n for n, i in mapping.items()}


def import_folder(
    src: str | os.PathLike,
    labels_csv: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    rare_fraction: float = DEFAULT_RARE_FRACTION,
    rare_classes: Iterable[int] | None = None,
    threads: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import NIfTI volumes listed in a CSV (``case_id,image,label`` [+ ``mask,patient_id``]).

    Paths in the CSV are relative to ``src``. Labels are ints, or names mapped to ints in
    sorted order. Files stay where they are; the manifest stores their absolute paths.
    """
    src, labels_csv, out = Path(src), Path(labels_csv), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    table = read_labels_csv(labels_csv)
    missing = [c for c in ("case_id", "image", "label") if c not in table.columns]
    if missing:
        raise DatasetError(f"{labels_csv}: missing column(s) {', '.join(missing)} (need case_id,image,label[,mask,patient_id])")
    unknown = sorted(set(table.columns) - {"case_id", "image", "label", "mask", "patient_id"})
    if unknown:
        raise DatasetError(f"{labels_csv}: unknown column(s) {', '.join(unknown)}")
    if table.empty:
        raise DatasetError(f"{labels_csv}: no cases (the CSV holds only its header)")
    case_ids = _csv_cells(table["case_id"])
    _check_case_ids(case_ids, labels_csv)
    labels, label_names, names = _parse_labels(_csv_cells(table["label"]), labels_csv)

    with _new_dataset_dir(out):
        rows = []
        for (_, rec), case_id, label, name in zip(table.iterrows(), case_ids, labels, label_names):
            image = src / rec["image"].strip()
            mask_text = rec.get("mask", "").strip() if "mask" in table.columns else ""
            mask = src / mask_text if mask_text else None
            patient = rec.get("patient_id", "").strip() if "patient_id" in table.columns else ""
            rows.append(
                {
                    "case_id": case_id,
                    "image": _stored_path(image, out),
                    "mask": _stored_path(mask, out) if mask else None,
                    "label": label,
                    "label_name": name,
                    "patient_id": patient or None,
                    "source": "folder",
                    "mask_kind": "ground_truth" if mask else None,
                    "_image_abs": str(image),
                    "_mask_abs": str(mask) if mask else None,
                }
            )
        good, problems = _check_rows(rows, allow_2d=False, threads=threads, progress=progress)
        return _finish(out, good, problems, seed=seed, fractions=fractions, rare_fraction=rare_fraction,
                       rare_classes=rare_classes, names=names)


def import_brats(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    modality: str = "t2",
    label_from: str = "auto",
    labels_csv: str | os.PathLike | None = None,
    label_column: str = "Grade",
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    rare_fraction: float = DEFAULT_RARE_FRACTION,
    rare_classes: Iterable[int] | None = None,
    threads: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import a BraTS-style folder (see :mod:`raytumor.data.brats`): one ``modality`` volume
    per case as the image, its ``seg`` file (when there is one) as the ground-truth mask.

    Labels come from ``label_from``: ``folder`` (class folders such as ``HGG/``, ``LGG/``),
    ``challenge`` (BraTS 2023's ``BraTS-GLI-...``, ``BraTS-MEN-...``), ``csv`` (``labels_csv``,
    by default the ``name_mapping.csv`` in ``src``; its ``label_column``), or ``auto``. Label
    names map to ints in sorted order. A case without the modality, or without a label, is
    quarantined. Files stay where they are.
    """
    from raytumor.data import brats

    src, out = Path(src), Path(out)
    modality = brats.modality_of(modality)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    cases, unnamed = brats.find_cases(src)
    case_ids = [_file_case_id("", case.name) for case in cases]
    _refuse_clashing_case_ids(src, case_ids, [case.folder for case in cases], what="case folders")
    source, csv_path = brats.choose_label_source(src, cases, label_from, Path(labels_csv) if labels_csv else None)
    labels = brats.case_labels(src, cases, source, csv_path, label_column)
    if not labels:
        raise DatasetError(f"{src}: no case has a label ({brats.missing_label_reason(source, csv_path, label_column)})")
    mapping = labels_from_names(list(labels.values()))

    with _new_dataset_dir(out):
        rows, problems = [], []
        for index, (case, case_id) in enumerate(zip(cases, case_ids)):
            try:
                image = brats.one_file(case, modality)
                mask = brats.mask_file(case)
            except ValueError as exc:
                problems.append(CaseProblem(case_id, str(case.folder), str(exc)))
                continue
            if index not in labels:
                problems.append(CaseProblem(case_id, str(image), brats.missing_label_reason(source, csv_path, label_column)))
                continue
            rows.append(
                {
                    "case_id": case_id,
                    "image": _stored_path(image, out),
                    "mask": _stored_path(mask, out) if mask else None,
                    "label": mapping[labels[index]],
                    "label_name": labels[index],
                    "patient_id": brats.challenge_patient(case.name),
                    "source": "brats",
                    "mask_kind": "ground_truth" if mask else None,
                    "_image_abs": str(image),
                    "_mask_abs": str(mask) if mask else None,
                }
            )
        good, bad = _check_rows(rows, allow_2d=False, threads=threads, progress=progress)
        summary = _finish(out, good, problems + bad, seed=seed, fractions=fractions, rare_fraction=rare_fraction,
                          rare_classes=rare_classes, names={i: n for n, i in mapping.items()})
    summary.n_unnamed_files = unnamed
    return summary


def _matlab_string(dataset) -> str:
    """MATLAB v7.3 stores a char array as uint16 codes."""
    codes = np.asarray(dataset).ravel()
    return "".join(chr(int(c)) for c in codes if int(c) != 0)


def read_figshare_case(path: Path) -> dict:
    """Read one Cheng (2017) ``.mat`` file: struct ``cjdata`` with image, label, PID, tumorMask.

    h5py returns MATLAB's column-major arrays transposed; transposing back gives the
    image as MATLAB shows it (rows, columns).
    """
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "cjdata" not in handle:
                raise CaseCheckError(str(path), "no struct 'cjdata' in the file")
            group = handle["cjdata"]
            missing = [k for k in ("image", "label", "PID", "tumorMask") if k not in group]
            if missing:
                raise CaseCheckError(str(path), f"cjdata lacks field(s) {', '.join(missing)}")
            image = np.asarray(group["image"]).T
            mask = np.asarray(group["tumorMask"]).T
            label_values = np.asarray(group["label"]).ravel()
            pid = _matlab_string(group["PID"])
    except CaseCheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - not HDF5, truncated, v5 .mat ...
        raise CaseCheckError(str(path), f"not a readable MATLAB v7.3 file ({type(exc).__name__}: {exc})") from None
    if image.ndim != 2:
        raise CaseCheckError(str(path), f"cjdata.image has {image.ndim} dimensions; expected 2")
    if image.size == 0:
        raise CaseCheckError(str(path), "cjdata.image is empty")
    if mask.shape != image.shape:
        raise CaseCheckError(str(path), f"cjdata.tumorMask shape {mask.shape} does not match image shape {image.shape}")
    label = _figshare_label(label_values, path)
    if not np.all(np.isfinite(image.astype(np.float64))):
        raise CaseCheckError(str(path), "cjdata.image has NaN/Inf values")
    if image.max() == image.min():
        raise CaseCheckError(str(path), "constant image")
    return {"image": _exactly_storable(image, path), "mask": mask, "label": label, "pid": pid}


def _figshare_label(values: np.ndarray, path: Path) -> int:
    if values.size != 1:
        reason = "is empty" if values.size == 0 else f"holds {values.size} values; expected one"
        raise CaseCheckError(str(path), f"cjdata.label {reason}")
    try:
        value = float(values[0])
    except (TypeError, ValueError):
        raise CaseCheckError(str(path), f"cjdata.label is not a number ({values.dtype})") from None
    if not np.isfinite(value):
        raise CaseCheckError(str(path), f"cjdata.label is {value} (not an integer)")
    if not value.is_integer():
        raise CaseCheckError(str(path), f"cjdata.label {value:g} is not an integer")
    if int(value) not in FIGSHARE_LABELS:
        raise CaseCheckError(str(path), f"cjdata.label {int(value)} not in 1 (meningioma), 2 (glioma), 3 (pituitary)")
    return int(value)


def _exactly_storable(image: np.ndarray, path: Path) -> np.ndarray:
    """The image in the first of ``FIGSHARE_IMAGE_DTYPES`` that holds every value exactly."""
    for dtype in FIGSHARE_IMAGE_DTYPES:
        if np.issubdtype(dtype, np.integer):
            limits = np.iinfo(dtype)
            if image.min() < limits.min or image.max() > limits.max:
                continue  # casting would wrap around
        stored = image.astype(dtype)
        if np.array_equal(stored.astype(image.dtype), image):
            return stored
    candidates = ", ".join(np.dtype(d).name for d in FIGSHARE_IMAGE_DTYPES)
    raise CaseCheckError(str(path), f"cjdata.image ({image.dtype}) cannot be stored exactly as any of {candidates}")


def import_figshare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    rare_fraction: float = DEFAULT_RARE_FRACTION,
    rare_classes: Iterable[int] | None = None,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import the Figshare brain-tumour set (Cheng 2017): each 2-D slice becomes a depth-1 NIfTI.

    Labels keep the dataset's order, shifted to start at 0 (0 meningioma, 1 glioma,
    2 pituitary); PID becomes ``patient_id`` so splits keep each patient in one split.
    """
    import nibabel as nib

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    files = sorted(src.rglob("*.mat"))
    if not files:
        raise DatasetError(f"{src}: no .mat files found")
    case_ids = [_file_case_id("fig-", str(path.relative_to(src).with_suffix(""))) for path in files]
    _refuse_clashing_case_ids(src, case_ids, files)
    with _new_dataset_dir(out, subdirs=("images", "masks")):
        rows, problems = [], []
        for done, (path, case_id) in enumerate(zip(files, case_ids), start=1):
            try:
                case = read_figshare_case(path)
            except CaseCheckError as exc:
                problems.append(CaseProblem(case_id, str(path), exc.reason))
            else:
                image_rel, mask_rel = f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz"
                nib.save(nib.Nifti1Image(case["image"][:, :, np.newaxis], np.eye(4)), str(out / image_rel))
                nib.save(nib.Nifti1Image((case["mask"] > 0)[:, :, np.newaxis].astype(np.uint8), np.eye(4)), str(out / mask_rel))
                rows.append(
                    {
                        "case_id": case_id,
                        "image": image_rel,
                        "mask": mask_rel,
                        "label": case["label"] - 1,
                        "label_name": FIGSHARE_LABELS[case["label"]],
                        "patient_id": case["pid"] or None,
                        "source": "figshare",
                        "mask_kind": "ground_truth",
                    }
                )
            if progress:
                progress(done, len(files))
        names = {k - 1: v for k, v in FIGSHARE_LABELS.items()}
        return _finish(out, rows, problems, seed=seed, fractions=fractions, rare_fraction=rare_fraction,
                       rare_classes=rare_classes, names=names)


def import_unlabelled(
    src: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    *,
    modality: str | None = None,
    threads: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Add every NIfTI volume under ``src`` to a dataset as unlabelled cases (no label, no mask).

    With ``modality``, ``src`` is a BraTS-style folder: each case adds its one volume of that
    modality (a case without one is quarantined), named by the case, and other files are left.
    Files the manifest already holds (as any case's image or mask) are skipped: a labelled
    test image must not reach pre-training, and importing a grown folder again adds only the
    new files (a folder with nothing new is an error). Case ids come from the file names;
    names that give one id, or an id the manifest holds for another file, are refused
    before anything is written.
    """
    src, dataset_dir = Path(src), Path(dataset_dir)
    if modality is not None:
        from raytumor.data import brats

        modality = brats.modality_of(modality)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    manifest = read_manifest(dataset_dir)
    unnamed, missing = 0, []
    if modality is None:
        files = sorted(p for p in src.rglob("*") if p.name.lower().endswith((".nii", ".nii.gz")))
        if not files:
            raise DatasetError(f"{src}: no .nii or .nii.gz files found")
        stem_of = {path: _nifti_stem(str(path.relative_to(src))) for path in files}
    else:
        cases, unnamed = brats.find_cases(src)
        stem_of = {}
        for case in cases:
            try:
                stem_of[brats.one_file(case, modality)] = case.name
            except ValueError as exc:
                missing.append(CaseProblem(_file_case_id("unl-", case.name), str(case.folder), str(exc)))
        files = sorted(stem_of)
        if not files:
            raise DatasetError(f"{src}: no case has a {modality} file")
    held = _files_held_by(manifest, dataset_dir)
    new_files = [path for path in files if os.path.realpath(path) not in held]
    if not new_files:
        raise DatasetError(f"{src}: all {len(files)} file(s) are already in the manifest of {dataset_dir} (imported twice?)")
    case_ids = [_file_case_id("unl-", stem_of[path]) for path in new_files]
    _refuse_clashing_case_ids(src, case_ids, new_files)
    image_by_id = dict(zip(manifest["case_id"], manifest["image"]))
    for case_id, path in zip(case_ids, new_files):
        if case_id in image_by_id:
            raise DatasetError(f"{path}: case_id {case_id!r} is already in the manifest, for {image_by_id[case_id]}; rename the file")
    rows = [
        {
            "case_id": case_id,
            "image": _stored_path(path, dataset_dir),
            "mask": None,
            "label": None,
            "label_name": None,
            "patient_id": None,
            "split": "unlabelled",
            "source": "unlabelled",
            "mask_kind": None,
            "_image_abs": str(path),
        }
        for path, case_id in zip(new_files, case_ids)
    ]
    good, problems = _check_rows(rows, allow_2d=False, threads=threads, progress=progress)
    if good:
        added = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in good])
        # As object columns: pandas warns (and will change dtypes) when concatenating all-null columns.
        write_manifest(dataset_dir, pd.concat([manifest.astype(object), added.astype(object)], ignore_index=True))
    earlier = dataset_dir / IMPORT_QUARANTINE_FILE
    kept = []
    if earlier.is_file() and earlier.stat().st_size:
        # A file checked again (a re-import of a grown folder) keeps only its new outcome.
        checked_now = set(case_ids) | {p.case_id for p in missing}
        earlier_problems = pd.read_csv(earlier, dtype=str, keep_default_na=False)  # a case id "NA" stays "NA"
        kept = [CaseProblem(r.case_id, r.file, r.reason) for r in earlier_problems.itertuples(index=False)
                if r.case_id not in checked_now]
    write_quarantine(earlier, kept + missing + problems)
    return ImportSummary(dataset_dir, len(good), missing + problems, n_already_in_manifest=len(files) - len(new_files),
                         n_unnamed_files=unnamed)


def _nifti_stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name[: -len(".nii")]


def _files_held_by(manifest: pd.DataFrame, dataset_dir: Path) -> set[str]:
    """Real paths of the local files the manifest's images and masks point to."""
    held = set()
    for stored in pd.concat([manifest["image"], manifest["mask"]]).dropna():
        path = resolve_path(dataset_dir, stored)
        if "://" not in path:  # a remote URI is no file of a local folder
            held.add(os.path.realpath(path))
    return held
