"""Stratified, patient-grouped, seeded splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raytumor.data.splits import DEFAULT_FRACTIONS, SPLIT_ORDER, assign_splits


def _manifest(counts, unlabelled=0) -> pd.DataFrame:
    rows = []
    for label, n in enumerate(counts):
        rows += [dict(case_id=f"c{label}-{k}", label=label, patient_id=None, split=None) for k in range(n)]
    rows += [dict(case_id=f"u{k}", label=None, patient_id=None, split=None) for k in range(unlabelled)]
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int32")
    return frame


def _patients(n_patients=60, seed=1) -> pd.DataFrame:
    """Many patients with 2-6 cases each; a patient's cases mostly share one label."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = p % 3
        for k in range(int(rng.integers(2, 7))):
            case_label = label if k else (label + int(rng.integers(0, 2))) % 3  # some patients mix labels
            rows.append(dict(case_id=f"p{p}-{k}", label=case_label, patient_id=f"P{p:03d}", split=None))
    frame = pd.DataFrame(rows)
    frame["label"] = frame["label"].astype("Int32")
    return frame


def test_same_seed_same_splits_other_seed_other_splits():
    manifest = _manifest((50, 30, 20))
    first = assign_splits(manifest, seed=3)
    assert first["split"].tolist() == assign_splits(manifest, seed=3)["split"].tolist()
    assert first["split"].tolist() != assign_splits(manifest, seed=4)["split"].tolist()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_proportions_per_class_close_to_target(seed):
    counts = (50, 30, 20, 100)
    out = assign_splits(_manifest(counts), seed=seed)
    per_class = out.groupby(["label", "split"]).size().unstack(fill_value=0)
    for label, n in enumerate(counts):
        for split, fraction in zip(SPLIT_ORDER, DEFAULT_FRACTIONS):
            assert abs(per_class.loc[label, split] - fraction * n) <= 1, (label, split)


def test_custom_fractions():
    out = assign_splits(_manifest((100,)), fractions=(0.5, 0.25, 0.25), seed=0)
    assert out["split"].value_counts().to_dict() == {"train": 50, "val": 25, "test": 25}


@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_every_class_with_three_cases_reaches_every_split(n):
    out = assign_splits(_manifest((40, n, 3)), seed=0)
    for label in range(3):
        assert set(out.loc[out["label"] == label, "split"]) == set(SPLIT_ORDER), label


def test_patients_never_cross_splits():
    manifest = _patients()
    out = assign_splits(manifest, seed=0)
    per_patient = out.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    assert set(out["split"]) == set(SPLIT_ORDER)
    # Dealing whole patients still lands near the target share of cases.
    share = out["split"].value_counts(normalize=True)
    for split, fraction in zip(SPLIT_ORDER, DEFAULT_FRACTIONS):
        assert abs(share[split] - fraction) < 0.08, split


def test_cases_without_patient_are_split_singly():
    manifest = _patients(n_patients=10)
    manifest.loc[manifest.index[:6], "patient_id"] = None
    out = assign_splits(manifest, seed=0)
    grouped = out[out["patient_id"].notna()].groupby("patient_id")["split"].nunique()
    assert (grouped == 1).all()
    assert out["split"].isin(SPLIT_ORDER).all()


def test_existing_splits_kept_unless_resplit():
    base = assign_splits(_manifest((30, 30)), seed=0)
    edited = base.copy()
    # Someone moved two cases by hand; a plain re-run must keep that.
    edited.loc[0, "split"] = "test" if base.loc[0, "split"] != "test" else "val"
    edited.loc[1, "split"] = "val" if base.loc[1, "split"] != "val" else "train"
    again = assign_splits(edited, seed=123)
    assert again["split"].tolist() == edited["split"].tolist()

    redone = assign_splits(edited, seed=0, resplit=True)
    assert redone["split"].tolist() == base["split"].tolist()


def test_only_new_cases_are_assigned():
    base = assign_splits(_manifest((30, 30)), seed=0)
    new = _manifest((6, 6)).assign(case_id=lambda f: "new-" + f["case_id"])
    out = assign_splits(pd.concat([base, new], ignore_index=True), seed=0)
    assert out["split"].iloc[: len(base)].tolist() == base["split"].tolist()
    assert out["split"].iloc[len(base):].isin(SPLIT_ORDER).all()


def test_new_cases_of_a_known_patient_join_its_split():
    base = assign_splits(_patients(n_patients=12), seed=0)
    known = base.drop_duplicates("patient_id")[["patient_id", "split"]].set_index("patient_id")["split"]
    new = pd.DataFrame([dict(case_id=f"late-{p}", label=int(p[1:]) % 3, patient_id=p, split=None) for p in known.index])
    new["label"] = new["label"].astype("Int32")
    out = assign_splits(pd.concat([base, new], ignore_index=True), seed=5)
    late = out[out["case_id"].str.startswith("late-")].set_index("patient_id")["split"]
    assert late.to_dict() == known.to_dict()
    assert (out.groupby("patient_id")["split"].nunique() == 1).all()


def test_unlabelled_rows_get_unlabelled():
    manifest = _manifest((10, 10), unlabelled=5)
    manifest.loc[manifest["label"].isna(), "split"] = ["train", None, "val", "unlabelled", None]
    out = assign_splits(manifest, seed=0)
    assert (out.loc[out["label"].isna(), "split"] == "unlabelled").all()
    assert out.loc[out["label"].notna(), "split"].isin(SPLIT_ORDER).all()


def test_works_without_split_or_patient_columns_and_leaves_input_alone():
    manifest = _manifest((10, 10)).drop(columns=["split", "patient_id"])
    before = manifest.copy()
    out = assign_splits(manifest, seed=0)
    pd.testing.assert_frame_equal(manifest, before)
    assert out["split"].isin(SPLIT_ORDER).all() and len(out) == 20


@pytest.mark.parametrize("fractions", [(0.7, 0.3), (0.5, 0.5, 0.5), (0.8, 0.2, 0.0), (1.2, -0.1, -0.1)])
def test_bad_fractions_rejected(fractions):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(_manifest((5,)), fractions=fractions)
