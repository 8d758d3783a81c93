"""Importers: a folder + labels CSV, the public Figshare brain-tumour set, an unlabelled pool.

Each importer checks every case with the same checks as ``validate`` (every voxel read):
good cases go into the manifest, bad ones into ``import-quarantine.csv`` with reasons.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from raytumor.data.manifest import (
    DEFAULT_RARE_FRACTION,
    MANIFEST_FILE,
    build_class_table,
    labels_from_names,
    read_manifest,
    write_classes,
    write_manifest,
)
from raytumor.data.splits import DEFAULT_FRACTIONS, assign_splits
from raytumor.data.validate import CaseCheckError, CaseProblem, check_case, write_quarantine
from raytumor.errors import DatasetError

IMPORT_QUARANTINE_FILE = "import-quarantine.csv"
FIGSHARE_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}

Progress = Callable[[int, int], None]


@dataclass
class ImportSummary:
    dataset_dir: Path
    n_imported: int
    problems: list[CaseProblem] = field(default_factory=list)

    @property
    def n_quarantined(self) -> int:
        return len({p.case_id for p in self.problems})

    def summary(self) -> str:
        text = f"imported {self.n_imported} case(s) into {self.dataset_dir}"
        if self.problems:
            text += f"; {self.n_quarantined} quarantined (see {self.dataset_dir / IMPORT_QUARANTINE_FILE})"
        return text


def _prepare_out_dir(out: Path) -> None:
    if (out / MANIFEST_FILE).exists():
        raise DatasetError(f"{out}: already holds a dataset; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)


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


def _parse_labels(raw: pd.Series, csv_path: Path) -> tuple[list[int], list[str], dict[int, str]]:
    values = raw.astype(str).str.strip()
    if (values == "").any() or raw.isna().any():
        line = int(np.flatnonzero((values == "").to_numpy() | raw.isna().to_numpy())[0]) + 2
        raise DatasetError(f"{csv_path}: line {line}: empty label")
    as_int = pd.to_numeric(values, errors="coerce")
    if as_int.notna().all() and (as_int == as_int.round()).all():
        labels = as_int.astype(int).tolist()
        if min(labels) < 0:
            raise DatasetError(f"{csv_path}: column label: negative label {min(labels)}")
        return labels, [str(v) for v in labels], {v: str(v) for v in labels}
    if as_int.notna().any():
        raise DatasetError(f"{csv_path}: column label mixes numbers and names; use one or the other")
    mapping = labels_from_names(values.tolist())
    return [mapping[v] for v in values], values.tolist(), {i: n for n, i in mapping.items()}


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
    try:
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DatasetError(f"{labels_csv}: labels CSV does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{labels_csv}: unreadable CSV ({exc})") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("case_id", "image", "label") if c not in table.columns]
    if missing:
        raise DatasetError(f"{labels_csv}: missing column(s) {', '.join(missing)} (need case_id,image,label[,mask,patient_id])")
    unknown = sorted(set(table.columns) - {"case_id", "image", "label", "mask", "patient_id"})
    if unknown:
        raise DatasetError(f"{labels_csv}: unknown column(s) {', '.join(unknown)}")
    duplicated = table["case_id"][table["case_id"].duplicated()]
    if len(duplicated):
        raise DatasetError(f"{labels_csv}: duplicate case_id {duplicated.iloc[0]!r}")
    labels, label_names, names = _parse_labels(table["label"], labels_csv)
    _prepare_out_dir(out)

    rows = []
    for (_, rec), label, name in zip(table.iterrows(), labels, label_names):
        image = src / rec["image"].strip()
        mask_text = rec.get("mask", "").strip() if "mask" in table.columns else ""
        mask = src / mask_text if mask_text else None
        patient = rec.get("patient_id", "").strip() if "patient_id" in table.columns else ""
        rows.append(
            {
                "case_id": rec["case_id"].strip(),
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
            label = int(np.asarray(group["label"]).ravel()[0])
            pid = _matlab_string(group["PID"])
    except CaseCheckError:
        raise
    except Exception as exc:  # noqa: BLE001 - not HDF5, truncated, v5 .mat ...
        raise CaseCheckError(str(path), f"not a readable MATLAB v7.3 file ({type(exc).__name__}: {exc})") from None
    if image.ndim != 2:
        raise CaseCheckError(str(path), f"cjdata.image has {image.ndim} dimensions; expected 2")
    if mask.shape != image.shape:
        raise CaseCheckError(str(path), f"cjdata.tumorMask shape {mask.shape} does not match image shape {image.shape}")
    if label not in FIGSHARE_LABELS:
        raise CaseCheckError(str(path), f"cjdata.label {label} not in 1 (meningioma), 2 (glioma), 3 (pituitary)")
    if not np.all(np.isfinite(image.astype(np.float64))):
        raise CaseCheckError(str(path), "cjdata.image has NaN/Inf values")
    if image.max() == image.min():
        raise CaseCheckError(str(path), "constant image")
    return {"image": image, "mask": mask, "label": label, "pid": pid}


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
    _prepare_out_dir(out)
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    rows, problems = [], []
    for done, path in enumerate(files, start=1):
        case_id = "fig-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(path.relative_to(src).with_suffix("")))
        try:
            case = read_figshare_case(path)
        except CaseCheckError as exc:
            problems.append(CaseProblem(case_id, str(path), exc.reason))
        else:
            image_rel, mask_rel = f"images/{case_id}.nii.gz", f"masks/{case_id}.nii.gz"
            nib.save(nib.Nifti1Image(case["image"][:, :, np.newaxis].astype(np.int16), np.eye(4)), str(out / image_rel))
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
    threads: int = 4,
    progress: Progress | None = None,
) -> ImportSummary:
    """Add every NIfTI volume under ``src`` to a dataset as unlabelled cases (no label, no mask)."""
    src, dataset_dir = Path(src), Path(dataset_dir)
    if not src.is_dir():
        raise DatasetError(f"{src}: source folder does not exist")
    manifest = read_manifest(dataset_dir)
    files = sorted(p for p in src.rglob("*") if p.name.lower().endswith((".nii", ".nii.gz")))
    if not files:
        raise DatasetError(f"{src}: no .nii or .nii.gz files found")
    rows = []
    for path in files:
        stem = str(path.relative_to(src))
        stem = stem[: -len(".nii.gz")] if stem.lower().endswith(".nii.gz") else stem[: -len(".nii")]
        rows.append(
            {
                "case_id": "unl-" + re.sub(r"[^A-Za-z0-9_.-]", "_", stem),
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
        )
    taken = set(manifest["case_id"])
    clashes = [r["case_id"] for r in rows if r["case_id"] in taken]
    if clashes:
        raise DatasetError(f"{dataset_dir}: case_id {clashes[0]!r} already in the manifest (imported twice?)")
    good, problems = _check_rows(rows, allow_2d=False, threads=threads, progress=progress)
    if good:
        added = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in good])
        # As object columns: pandas warns (and will change dtypes) when concatenating all-null columns.
        write_manifest(dataset_dir, pd.concat([manifest.astype(object), added.astype(object)], ignore_index=True))
    earlier = dataset_dir / IMPORT_QUARANTINE_FILE
    kept = []
    if earlier.is_file() and earlier.stat().st_size:
        kept = [CaseProblem(str(r.case_id), str(r.file), str(r.reason)) for r in pd.read_csv(earlier).itertuples(index=False)]
    write_quarantine(earlier, kept + problems)
    return ImportSummary(dataset_dir, len(good), problems)
