"""BraTS-style NIfTI folders: each case is a set of files ``<case>_<modality>.nii[.gz]``.

The releases lay them out, and say what a case is, in three ways:

- 2018-2019: ``HGG/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` and ``LGG/...``: the grade
  is the folder above the case's (a *class folder*).
- 2020: ``<case>/<case>_{...}.nii`` side by side; the grade is a column (``Grade``) of
  ``name_mapping.csv``, next to each release's case ids. 2021 has the same names, no grades.
- 2023 on: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``: the
  sub-challenge (``GLI``, ``MEN``, ``MET``, ``PED``, ``SSA``) names the tumour kind, the
  first number the patient, the last the time point.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from raytumor.data.manifest import read_labels_csv
from raytumor.errors import DatasetError

MODALITIES = {"t1": ("t1", "t1n"), "t1ce": ("t1ce", "t1c", "t1gd"), "t2": ("t2", "t2w"), "flair": ("flair", "t2f")}
MASK = "seg"
MODALITY_OF_TOKEN = {token: modality for modality, tokens in MODALITIES.items() for token in tokens}
MAPPING_CSV = "name_mapping.csv"
LABEL_SOURCES = ("auto", "folder", "challenge", "csv")
CHALLENGE_NAMES = {"GLI": "glioma", "SSA": "glioma", "MEN": "meningioma", "MET": "metastasis", "PED": "pediatric glioma"}

_TOKENS = sorted({*MODALITY_OF_TOKEN, MASK}, key=len, reverse=True)
_FILE_NAME = re.compile(rf"^(?P<case>.+)[_-](?P<token>{'|'.join(_TOKENS)})\.nii(\.gz)?$", re.IGNORECASE)
_CHALLENGE_CASE = re.compile(r"^BraTS-(?P<code>[A-Za-z]+)(?:-[A-Za-z]+)*-(?P<patient>\d+)-(?P<timepoint>\d+)$")
NAMING = "<case>_<modality>.nii[.gz], modality one of t1, t1ce, t2, flair, seg (or BraTS 2023's t1n, t1c, t2w, t2f)"


@dataclass
class BratsCase:
    name: str  # the files' common stem, e.g. BraTS19_2013_10_1
    folder: Path  # the folder holding its files
    files: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))  # modality or "seg" -> files

    @property
    def class_folder(self) -> Path:
        """The folder a class-folder layout names the class by: the one above the case's own
        folder, or the one holding its files when they lie loose in it."""
        return self.folder.parent if self.folder.name == self.name else self.folder


def modality_of(text: str) -> str:
    modality = MODALITY_OF_TOKEN.get(text.strip().lower())
    if modality is None:
        raise DatasetError(f"modality {text!r}: not one of t1, t1ce, t2, flair (or BraTS 2023's t1n, t1c, t2w, t2f)")
    return modality


def find_cases(src: Path) -> tuple[list[BratsCase], int]:
    """The cases under ``src`` (files grouped by folder and stem), and how many NIfTI files
    are not named like a BraTS case's."""
    cases: dict[tuple[Path, str], BratsCase] = {}
    unnamed = 0
    for path in sorted(src.rglob("*")):
        lower = path.name.lower()
        if not lower.endswith((".nii", ".nii.gz")) or path.is_dir():
            continue
        match = _FILE_NAME.match(path.name)
        if match is None:
            unnamed += 1
            continue
        token = match["token"].lower()
        key = (path.parent, match["case"])
        case = cases.setdefault(key, BratsCase(match["case"], path.parent))
        case.files[MASK if token == MASK else MODALITY_OF_TOKEN[token]].append(path)
    if not cases:
        raise DatasetError(f"{src}: no BraTS-style files found (expected {NAMING})")
    return list(cases.values()), unnamed


def one_file(case: BratsCase, modality: str) -> Path:
    """The case's single file of ``modality``; a ``ValueError`` says why there is none."""
    files = case.files.get(modality, [])
    if len(files) > 1:
        raise ValueError(f"{len(files)} {modality} files ({', '.join(p.name for p in files)}); keep one")
    if not files:
        held = ", ".join(sorted(m for m in case.files if m != MASK)) or "only a mask"
        raise ValueError(f"no {modality} file (has {held})")
    return files[0]


def mask_file(case: BratsCase) -> Path | None:
    """The case's ``seg`` file, if it has one; a ``ValueError`` when it has two."""
    masks = case.files.get(MASK, [])
    if len(masks) > 1:
        raise ValueError(f"{len(masks)} seg files ({', '.join(p.name for p in masks)}); keep one")
    return masks[0] if masks else None


def challenge_patient(name: str) -> str | None:
    """``BraTS-GLI-00000-000`` -> ``BraTS-GLI-00000``: a patient's time points stay together."""
    match = _CHALLENGE_CASE.match(name)
    return name[: -len(match["timepoint"]) - 1] if match else None


def challenge_label(name: str) -> str | None:
    match = _CHALLENGE_CASE.match(name)
    return CHALLENGE_NAMES.get(match["code"].upper(), match["code"].upper()) if match else None


def find_mapping_csv(src: Path) -> Path | None:
    found = sorted(src.rglob(MAPPING_CSV))
    if len(found) > 1:
        raise DatasetError(f"{src}: {len(found)} {MAPPING_CSV} files ({', '.join(str(p.relative_to(src)) for p in found)}); "
                           "choose one with --labels-csv")
    return found[0] if found else None


def labels_from_csv(csv_path: Path, names: list[str], label_column: str) -> dict[str, str]:
    """Case name -> label from a CSV such as ``name_mapping.csv``: the id column is the one
    holding the most of ``names`` (each release has its own)."""
    table = read_labels_csv(csv_path)
    if label_column not in table.columns:
        raise DatasetError(f"{csv_path}: no column {label_column!r} (columns: {', '.join(table.columns)}); "
                           "choose the label column with --label-column")
    wanted = set(names)
    hits = {c: len(wanted & {v.strip() for v in table[c]}) for c in table.columns if c != label_column}
    id_column = max(hits, key=hits.get, default=None)
    if id_column is None or hits[id_column] == 0:
        raise DatasetError(f"{csv_path}: no column holds the case names (such as {sorted(wanted)[0]!r})")
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, (case, label) in enumerate(zip(table[id_column], table[label_column]), start=2):
        case, label = case.strip(), label.strip()
        if case not in wanted or not label:
            continue
        if case in labels and labels[case] != label:
            raise DatasetError(f"{csv_path}: line {line}: {id_column} {case!r} has label {label!r}, "
                               f"but {labels[case]!r} on line {first_line[case]}")
        labels.setdefault(case, label)
        first_line.setdefault(case, line)
    return labels


def choose_label_source(src: Path, cases: list[BratsCase], label_from: str, labels_csv: Path | None) -> tuple[str, Path | None]:
    """``label_from`` as given, or for ``auto`` the first of: a labels CSV (given, or one
    ``name_mapping.csv`` in ``src``), BraTS 2023 names of two or more tumour kinds (before
    folders: that release keeps each kind in a folder of its own), class folders of two or
    more names."""
    if label_from not in LABEL_SOURCES:
        raise DatasetError(f"label source {label_from!r}: not one of {', '.join(LABEL_SOURCES)}")
    if label_from in ("csv", "auto"):
        csv_path = labels_csv or find_mapping_csv(src)
        if csv_path is not None:
            return "csv", csv_path
        if label_from == "csv":
            raise DatasetError(f"{src}: no {MAPPING_CSV} found; give the labels CSV with --labels-csv")
    elif labels_csv is not None:
        raise DatasetError(f"--labels-csv is read only with --label-from csv or auto, not {label_from}")
    if label_from != "auto":
        return label_from, None
    kinds = {challenge_label(case.name) for case in cases}
    if None not in kinds and len(kinds) >= 2:
        return "challenge", None
    folders = {case.class_folder for case in cases}
    if src.resolve() not in {f.resolve() for f in folders} and len({f.name for f in folders}) >= 2:
        return "folder", None
    raise DatasetError(
        f"{src}: {len(cases)} BraTS case(s) but no class labels: no {MAPPING_CSV}, no class folders such as HGG/ and "
        "LGG/, no BraTS 2023 names of two or more tumour kinds (BraTS-GLI-..., BraTS-MEN-...); give --labels-csv, "
        "or add the scans as an unlabelled pool: raytumor data import-unlabelled SRC --into DATASET --modality t2")


def case_labels(src: Path, cases: list[BratsCase], source: str, csv_path: Path | None, label_column: str) -> dict[int, str]:
    """Index into ``cases`` -> label name; a case missing here has no label in ``source``."""
    if source == "csv":
        by_name = labels_from_csv(csv_path, [case.name for case in cases], label_column)
        return {i: by_name[case.name] for i, case in enumerate(cases) if case.name in by_name}
    if source == "folder":
        root = src.resolve()
        return {i: case.class_folder.name for i, case in enumerate(cases) if case.class_folder.resolve() != root}
    return {i: label for i, case in enumerate(cases) if (label := challenge_label(case.name)) is not None}


def missing_label_reason(source: str, csv_path: Path | None, label_column: str) -> str:
    return {
        "csv": f"no {label_column} for it in {csv_path}",
        "folder": "no class folder above it (its files lie directly in the source folder)",
        "challenge": "its name is not BraTS-<kind>-<patient>-<time point>",
    }[source]
