"""The dataset contract every stage reads: ``manifest.parquet`` and ``classes.parquet``.

A dataset is a directory holding

* ``manifest.parquet``: one row per case (schema :data:`MANIFEST_SCHEMA`);
* ``classes.parquet``: ``label, name, count, rare`` (schema :data:`CLASSES_SCHEMA`).

Image and mask paths are relative to the dataset directory, or absolute, or ``file://`` URIs.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raytumor.data.layout import CLASSES_FILE, MANIFEST_FILE
from raytumor.errors import DatasetError
from raytumor.storage import atomic_write_bytes

SPLITS = ("train", "val", "test", "unlabelled")
LABELLED_SPLITS = ("train", "val", "test")
MASK_KINDS = ("ground_truth", "pseudo")
DEFAULT_RARE_FRACTION = 0.01

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("mask", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("label_name", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        # Not in the minimal contract: where the mask came from ("ground_truth" or "pseudo").
        pa.field("mask_kind", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)
REQUIRED_COLUMNS = ("case_id", "image", "split", "source")
CLASSES_CSV_FILE = "classes.csv"
RARE_FLAGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

CLASSES_SCHEMA = pa.schema(
    [
        pa.field("label", pa.int32(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("rare", pa.bool_(), nullable=False),
    ]
)


def _to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def normalise_manifest(df: pd.DataFrame, where: str = "manifest") -> pd.DataFrame:
    """Return ``df`` with every manifest column, in order, with the contract's dtypes.

    ``where`` names the manifest in error messages (its path, when it was read from a file).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DatasetError(f"{where}: missing required column(s) {', '.join(missing)}")
    unknown = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise DatasetError(f"{where}: unknown column(s) {', '.join(unknown)}")
    out = pd.DataFrame(index=range(len(df)))
    values = df.reset_index(drop=True)
    for name in MANIFEST_COLUMNS:
        column = values[name] if name in values.columns else pd.Series([None] * len(values))
        if name == "label":
            try:
                out[name] = pd.array(pd.to_numeric(column, errors="raise"), dtype="Int32")
            except (ValueError, TypeError) as exc:
                raise DatasetError(f"{where}: column label must hold integers or nulls ({exc})") from None
        else:
            out[name] = column.astype(object).where(column.notna(), None)
            out[name] = out[name].map(lambda v: None if v is None else str(v))
    for name in ("case_id", "image", "source"):
        blank = out[name].map(lambda v: v is None or not v.strip())
        if blank.any():
            row = int(blank.idxmax())
            case = f"case {out.at[row, 'case_id']}" if name != "case_id" else f"image {out.at[row, 'image']}"
            raise DatasetError(f"{where}: column {name} is null or empty in row {row} ({case}); every case needs one")
    bad_split = sorted(set(out["split"].dropna()) - set(SPLITS))
    if bad_split or out["split"].isna().any():
        raise DatasetError(f"{where}: column split must be one of {', '.join(SPLITS)}; got {bad_split or 'null'}")
    bad_kind = sorted(set(out["mask_kind"].dropna()) - set(MASK_KINDS))
    if bad_kind:
        raise DatasetError(f"{where}: column mask_kind must be one of {', '.join(MASK_KINDS)}; got {bad_kind}")
    unlabelled_with_label = (out["split"] == "unlabelled") & out["label"].notna()
    if unlabelled_with_label.any():
        case = out.loc[unlabelled_with_label, "case_id"].iloc[0]
        raise DatasetError(f"{where}: case {case} is in split unlabelled but has a label")
    labelled_without_label = out["split"].isin(LABELLED_SPLITS) & out["label"].isna()
    if labelled_without_label.any():
        case = out.loc[labelled_without_label, "case_id"].iloc[0]
        raise DatasetError(f"{where}: case {case} is in a labelled split but has no label")
    return out


def manifest_table(df: pd.DataFrame, where: str = "manifest") -> pa.Table:
    df = normalise_manifest(df, where)
    return pa.Table.from_pandas(df, schema=MANIFEST_SCHEMA, preserve_index=False)


def write_manifest(dataset_dir: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Validate the columns of ``df`` and write ``manifest.parquet`` atomically."""
    path = Path(dataset_dir) / MANIFEST_FILE
    atomic_write_bytes(path, _to_parquet_bytes(manifest_table(df, str(path))))
    return path


def read_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``manifest.parquet`` of a dataset; a missing or broken file is a :class:`DatasetError`."""
    return read_manifest_and_digest(dataset_dir)[0]


def read_manifest_and_digest(dataset_dir: str | os.PathLike) -> tuple[pd.DataFrame, str]:
    """:func:`read_manifest`, and the SHA-256 of the very bytes it parsed."""
    path = Path(dataset_dir) / MANIFEST_FILE
    if not Path(dataset_dir).is_dir():
        raise DatasetError(f"{dataset_dir}: no such dataset directory")
    if not path.is_file():
        raise DatasetError(f"{path}: missing; create a dataset with `raytumor data demo` or an importer")
    try:
        data = path.read_bytes()
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # noqa: BLE001 - any parquet failure is a broken manifest
        raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from None
    return normalise_manifest(table.to_pandas(), str(path)), hashlib.sha256(data).hexdigest()


def resolve_path(dataset_dir: str | os.PathLike, path: str | None) -> str | None:
    """An image/mask path as stored in the manifest -> a path usable from anywhere.

    A ``file://`` URI becomes its local path. Other URIs come back unchanged: nothing reads
    them, and :func:`raytumor.data.validate.check_case` reports them.
    """
    if path is None or (isinstance(path, float) and np.isnan(path)):
        return None
    if path[:7].lower() == "file://":
        parts = urlsplit(path)
        if parts.netloc in ("", "localhost"):
            return os.path.abspath(unquote(parts.path))
    if "://" in path or os.path.isabs(path):
        return path
    # abspath, not Path.resolve: no symlink walk (an lstat per path component, per case)
    return os.path.abspath(os.path.join(dataset_dir, path))


def build_class_table(
    manifest: pd.DataFrame,
    *,
    names: dict[int, str] | None = None,
    rare_fraction: float = DEFAULT_RARE_FRACTION,
    rare_classes: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Class table from the labelled cases of a manifest.

    A class is rare when it holds ``<= rare_fraction`` of the labelled cases (the paper's
    rule); an explicit ``rare_classes`` list overrides the rule.
    """
    labelled = manifest[manifest["label"].notna()]
    counts = labelled["label"].astype(int).value_counts().sort_index()
    if names is None:
        names = {}
        for label, name in labelled[["label", "label_name"]].drop_duplicates("label").itertuples(index=False):
            names[int(label)] = name if name is not None else str(int(label))
    all_labels = sorted(set(counts.index.tolist()) | set(names))
    total = int(counts.sum())
    explicit = None if rare_classes is None else {int(c) for c in rare_classes}
    rows = []
    for label in all_labels:
        count = int(counts.get(label, 0))
        rare = (label in explicit) if explicit is not None else (total > 0 and count <= rare_fraction * total)
        rows.append({"label": int(label), "name": str(names.get(label, label)), "count": count, "rare": bool(rare)})
    return pd.DataFrame(rows, columns=["label", "name", "count", "rare"])


def write_classes(dataset_dir: str | os.PathLike, classes: pd.DataFrame) -> Path:
    path = Path(dataset_dir) / CLASSES_FILE
    table = pa.Table.from_pandas(classes[list(CLASSES_SCHEMA.names)], schema=CLASSES_SCHEMA, preserve_index=False)
    atomic_write_bytes(path, _to_parquet_bytes(table))
    return path


class ClassTableError(DatasetError):
    """A class table that is missing or unusable: ``file`` and ``reason`` for a problem list."""

    def __init__(self, file: Path, reason: str):
        super().__init__(f"{file}: {reason}")
        self.file = file
        self.reason = reason


def read_classes(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``classes.parquet`` (or ``classes.csv``) of a dataset.

    ``rare`` in a CSV may be true/false, yes/no or 1/0 (any case); anything else, like a
    missing, unreadable or incomplete table, is a :class:`ClassTableError`.
    """
    base = Path(dataset_dir)
    parquet, csv = base / CLASSES_FILE, base / CLASSES_CSV_FILE
    if parquet.is_file():
        source = parquet
    elif csv.is_file():
        source = csv
    else:
        raise ClassTableError(parquet, "missing class table")
    try:
        df = pq.read_table(source).to_pandas() if source == parquet else pd.read_csv(source)
    except Exception as exc:  # noqa: BLE001 - any parse failure is an unreadable table
        detail = " ".join(str(exc).split()).replace(str(source), source.name)
        raise ClassTableError(source, f"unreadable class table ({type(exc).__name__}: {detail})") from None
    missing = [c for c in CLASSES_SCHEMA.names if c not in df.columns]
    if missing:
        raise ClassTableError(source, f"missing column(s) {', '.join(missing)}")
    df = df[list(CLASSES_SCHEMA.names)].copy()
    for name in ("label", "count"):
        values = pd.to_numeric(df[name], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            first = bad.idxmax()
            raise ClassTableError(source, f"column {name} must hold integers; got {df.at[first, name]!r} "
                                          f"in row {first}")
        df[name] = values.astype(int)
    df["rare"] = _rare_flags(df, source)
    return df.sort_values("label").reset_index(drop=True)


def _rare_flags(classes: pd.DataFrame, source: Path) -> pd.Series:
    """The ``rare`` column as bools; ``astype(bool)`` would read the string "no" as True."""
    column = classes["rare"]
    if column.dtype == bool:
        return column
    flags = column.map(lambda v: RARE_FLAGS.get(str(v).strip().lower()))
    bad = flags.isna()
    if bad.any():
        first = bad.idxmax()
        raise ClassTableError(source, f"column rare must be true/false, yes/no or 1/0; got {column[first]!r} "
                                      f"for label {classes.at[first, 'label']}")
    return flags.astype(bool)


def rare_labels(classes: pd.DataFrame) -> list[int]:
    return [int(label) for label in classes.loc[classes["rare"], "label"]]


def labels_from_names(names: Sequence[str]) -> dict[str, int]:
    """Map class names to ints, sorted by name, as the importers do."""
    return {name: index for index, name in enumerate(sorted(set(names)))}


def read_labels_csv(path: Path) -> pd.DataFrame:
    """A labels CSV as stripped-header string cells ("NA" stays "NA"); one-line errors."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: labels CSV does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise DatasetError(f"{path}: unreadable CSV ({str(exc).strip()})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def unlabelled_without_masks(manifest: pd.DataFrame) -> tuple[int, int]:
    """How many cases of the unlabelled pool have no mask, and how many it holds."""
    pool = manifest[manifest["split"] == "unlabelled"]
    return int(pool["mask"].isna().sum()), len(pool)
