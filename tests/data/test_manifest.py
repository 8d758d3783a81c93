"""The dataset contract: manifest schema, its checks, and the class table."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytumor.data.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    REQUIRED_COLUMNS,
    build_class_table,
    labels_from_names,
    rare_labels,
    read_classes,
    read_manifest,
    resolve_path,
    write_classes,
    write_manifest,
)
from raytumor.errors import DatasetError


def _rows() -> pd.DataFrame:
    return pd.DataFrame(
        [
            dict(case_id="a", image="images/a.nii.gz", mask="masks/a.nii.gz", label=0, label_name="glioma",
                 patient_id="p1", split="train", source="test", mask_kind="ground_truth"),
            dict(case_id="b", image="/abs/b.nii.gz", mask=None, label=2, label_name="pituitary",
                 patient_id=None, split="test", source="test", mask_kind=None),
            dict(case_id="c", image="s3://bucket/c.nii.gz", mask="masks/c.nii.gz", label=1, label_name="meningioma",
                 patient_id="p1", split="val", source="other", mask_kind="pseudo"),
            dict(case_id="u", image="unl/u.nii", mask=None, label=None, label_name=None,
                 patient_id=None, split="unlabelled", source="pool", mask_kind=None),
        ]
    )


def test_round_trip_keeps_schema_and_values(tmp_path):
    rows = _rows()
    path = write_manifest(tmp_path, rows)
    assert path == tmp_path / MANIFEST_FILE

    stored = pq.read_schema(path).remove_metadata()
    assert stored.names == list(MANIFEST_COLUMNS)
    assert stored.equals(MANIFEST_SCHEMA.remove_metadata())
    assert stored.field("label").type == pa.int32() and stored.field("label").nullable
    for name in REQUIRED_COLUMNS:
        assert not stored.field(name).nullable

    back = read_manifest(tmp_path)
    assert list(back.columns) == list(MANIFEST_COLUMNS)
    assert str(back["label"].dtype) == "Int32"
    assert back["label"].tolist()[:3] == [0, 2, 1] and back["label"].isna().tolist() == [False] * 3 + [True]
    for column in MANIFEST_COLUMNS:
        if column == "label":
            continue
        expected = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in rows[column]]
        assert back[column].tolist() == expected, column
    # A second round trip changes nothing.
    write_manifest(tmp_path / "again", back)
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "again"), back)


def test_optional_columns_may_be_absent(tmp_path):
    minimal = pd.DataFrame([dict(case_id="a", image="a.nii.gz", split="unlabelled", source="pool")])
    write_manifest(tmp_path, minimal)
    back = read_manifest(tmp_path)
    assert list(back.columns) == list(MANIFEST_COLUMNS)
    assert back.loc[0, "mask"] is None and back.loc[0, "patient_id"] is None and pd.isna(back.loc[0, "label"])


def test_unknown_column_is_named(tmp_path):
    rows = _rows().assign(scanner="GE")
    with pytest.raises(DatasetError, match="unknown column.*scanner"):
        write_manifest(tmp_path, rows)
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_unknown_column_in_a_stored_manifest_is_named(tmp_path):
    table = pa.Table.from_pandas(_rows().assign(extra=1), preserve_index=False)
    pq.write_table(table, tmp_path / MANIFEST_FILE)
    with pytest.raises(DatasetError, match="unknown column.*extra"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("column", REQUIRED_COLUMNS)
def test_missing_required_column_is_named(tmp_path, column):
    with pytest.raises(DatasetError, match=f"missing required column.*{column}"):
        write_manifest(tmp_path, _rows().drop(columns=[column]))


def test_bad_split_is_named(tmp_path):
    rows = _rows()
    rows.loc[0, "split"] = "training"
    with pytest.raises(DatasetError, match="split.*training"):
        write_manifest(tmp_path, rows)


def test_null_split_is_an_error(tmp_path):
    rows = _rows()
    rows.loc[1, "split"] = None
    with pytest.raises(DatasetError, match="split"):
        write_manifest(tmp_path, rows)


def test_labelled_split_without_label_names_case_and_label(tmp_path):
    rows = _rows()
    rows.loc[1, "label"] = None
    with pytest.raises(DatasetError, match=r"case b .*label"):
        write_manifest(tmp_path, rows)


def test_unlabelled_split_with_label_is_an_error(tmp_path):
    rows = _rows()
    rows.loc[3, "label"] = 1
    with pytest.raises(DatasetError, match=r"case u .*unlabelled.*label"):
        write_manifest(tmp_path, rows)


def test_bad_mask_kind_is_named(tmp_path):
    rows = _rows()
    rows.loc[0, "mask_kind"] = "manual"
    with pytest.raises(DatasetError, match="mask_kind.*manual"):
        write_manifest(tmp_path, rows)


@pytest.mark.parametrize("bad", ["glioma", 1.5])
def test_non_integer_label_is_a_dataset_error(tmp_path, bad):
    rows = _rows()
    rows["label"] = rows["label"].astype(object)
    rows.loc[0, "label"] = bad
    with pytest.raises(DatasetError, match="column label"):
        write_manifest(tmp_path, rows)


@pytest.mark.parametrize("column", ["case_id", "image", "source"])
@pytest.mark.parametrize("blank", [None, " "])
def test_null_or_empty_required_value_names_manifest_column_and_row(tmp_path, column, blank):
    rows = _rows()
    rows.loc[1, column] = blank
    table = pa.Table.from_pandas(rows, preserve_index=False)  # as another tool might write it
    pq.write_table(table, tmp_path / MANIFEST_FILE)
    which = "image /abs/b.nii.gz" if column == "case_id" else "case b"
    message = f"{tmp_path / MANIFEST_FILE}: column {column} is null or empty in row 1 ({which})"
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        read_manifest(tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match=f"column {column} is null or empty in row 1"):
        write_manifest(tmp_path / "new", rows)


def test_read_manifest_missing_or_broken(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="missing"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        read_manifest(tmp_path)


def test_resolve_path(tmp_path, monkeypatch):
    assert resolve_path(tmp_path, "images/a.nii.gz") == str((tmp_path / "images/a.nii.gz").resolve())
    assert resolve_path(tmp_path, "/data/a.nii.gz") == "/data/a.nii.gz"
    assert resolve_path(tmp_path, "s3://bucket/a.nii.gz") == "s3://bucket/a.nii.gz"
    assert resolve_path(tmp_path, "file:///data/my%20scan.nii.gz") == "/data/my scan.nii.gz"
    assert resolve_path(tmp_path, "FILE://localhost/data/a.nii.gz") == "/data/a.nii.gz"
    assert resolve_path(tmp_path, "file://host/data/a.nii.gz") == "file://host/data/a.nii.gz"  # not on this machine
    assert resolve_path(tmp_path, None) is None
    assert resolve_path(tmp_path, float("nan")) is None
    # Relative paths are resolved against the dataset, not the working directory.
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_path(tmp_path / "x", "a.nii") == str((tmp_path / "x" / "a.nii").resolve())


def _labelled(counts: dict[int, int]) -> pd.DataFrame:
    rows = []
    for label, n in counts.items():
        rows += [dict(label=label, label_name=f"type{label}")] * n
    rows.append(dict(label=None, label_name=None))  # unlabelled rows never count
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int32")
    return frame


def test_class_table_rare_rule_is_inclusive():
    # 200 labelled cases: 1% is 2 cases, so 2 is rare and 3 is not.
    table = build_class_table(_labelled({0: 190, 1: 2, 2: 3, 3: 5}), rare_fraction=0.01)
    assert table["label"].tolist() == [0, 1, 2, 3]
    assert table["count"].tolist() == [190, 2, 3, 5]
    assert table["name"].tolist() == ["type0", "type1", "type2", "type3"]
    assert table["rare"].tolist() == [False, True, False, False]
    assert rare_labels(table) == [1]

    wider = build_class_table(_labelled({0: 190, 1: 2, 2: 3, 3: 5}), rare_fraction=0.025)
    assert rare_labels(wider) == [1, 2, 3]


def test_class_table_explicit_rare_list_overrides_rule():
    manifest = _labelled({0: 190, 1: 2, 2: 3, 3: 5})
    assert rare_labels(build_class_table(manifest, rare_classes=[0, 3])) == [0, 3]
    assert rare_labels(build_class_table(manifest, rare_classes=[])) == []


def test_class_table_names_add_classes_without_cases():
    table = build_class_table(_labelled({0: 10, 2: 10}), names={0: "a", 1: "b", 2: "c"}, rare_fraction=0.1)
    assert table.to_dict("records") == [
        {"label": 0, "name": "a", "count": 10, "rare": False},
        {"label": 1, "name": "b", "count": 0, "rare": True},
        {"label": 2, "name": "c", "count": 10, "rare": False},
    ]


def test_classes_round_trip_parquet_and_csv(tmp_path):
    table = build_class_table(_labelled({0: 190, 1: 2, 2: 8}))
    write_classes(tmp_path / "pq", table)
    pd.testing.assert_frame_equal(read_classes(tmp_path / "pq"), table, check_dtype=False)

    (tmp_path / "csv").mkdir()
    shuffled = table.iloc[::-1]
    shuffled.to_csv(tmp_path / "csv" / "classes.csv", index=False)
    back = read_classes(tmp_path / "csv")
    assert back["label"].tolist() == [0, 1, 2]  # sorted by label
    assert back["rare"].tolist() == [False, True, False]
    assert back["rare"].dtype == bool
    assert rare_labels(back) == [1]


def test_read_classes_errors(tmp_path):
    with pytest.raises(DatasetError, match="missing class table"):
        read_classes(tmp_path)
    pd.DataFrame({"label": [0], "name": ["a"], "count": [3]}).to_csv(tmp_path / "classes.csv", index=False)
    with pytest.raises(DatasetError, match="classes.csv.*missing column.*rare"):
        read_classes(tmp_path)
    (tmp_path / "classes.csv").write_text("label,name,count,rare\nx,a,3,no\n")
    with pytest.raises(DatasetError, match=r"classes.csv: column label must hold integers; got 'x' in row 0"):
        read_classes(tmp_path)
    (tmp_path / "classes.parquet").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"classes.parquet: unreadable class table \(ArrowInvalid") as info:
        read_classes(tmp_path)
    assert "\n" not in str(info.value)


def test_rare_flags_in_csv(tmp_path):
    rows = ["0,a,5,no", "1,b,1,Yes", "2,c,5,FALSE", "3,d,1,true", "4,e,5,0", "5,f,1,1", "6,g,5, No "]
    (tmp_path / "classes.csv").write_text("label,name,count,rare\n" + "\n".join(rows) + "\n")
    assert rare_labels(read_classes(tmp_path)) == [1, 3, 5]
    (tmp_path / "classes.csv").write_text("label,name,count,rare\n0,a,5,no\n1,b,1,maybe\n")
    with pytest.raises(DatasetError, match=r"classes.csv: column rare must be true/false, yes/no or 1/0; "
                                           r"got 'maybe' for label 1"):
        read_classes(tmp_path)


def test_labels_from_names_sorted():
    assert labels_from_names(["pituitary", "glioma", "meningioma", "glioma"]) == {
        "glioma": 0, "meningioma": 1, "pituitary": 2}
