"""Stratified, patient-grouped train/val/test splits with a fixed seed."""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_ORDER = ("train", "val", "test")


def assign_splits(
    manifest: pd.DataFrame,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    *,
    resplit: bool = False,
) -> pd.DataFrame:
    """Return a copy of ``manifest`` whose labelled cases have a ``split``.

    Stratified by label: within each label the patient groups (or single cases when
    ``patient_id`` is null) are shuffled with ``seed`` and dealt, one group at a time, to the
    split furthest below its target share, so a class with >= 3 groups lands in every split.
    All cases of one patient stay in one split (a patient's group is stratified under its most
    common label). Unlabelled cases get ``unlabelled``. Rows that already have a labelled split
    keep it unless ``resplit``; a new case of a patient who already has a split joins it.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    out = manifest.copy().reset_index(drop=True)
    if "split" not in out.columns:
        out["split"] = None
    labelled = out["label"].notna()
    out.loc[~labelled, "split"] = "unlabelled"
    pending = labelled & (resplit | ~out["split"].isin(SPLIT_ORDER))
    if "patient_id" in out.columns and not resplit:
        # New cases of a patient who already has a split join it, so patients never straddle splits.
        settled = out[labelled & ~pending & out["patient_id"].notna()]
        known = settled.groupby("patient_id")["split"].agg(lambda s: s.value_counts().idxmax())
        joins = pending & out["patient_id"].isin(known.index)
        out.loc[joins, "split"] = out.loc[joins, "patient_id"].map(known)
        pending &= ~joins
    if not pending.any():
        return out

    rows = out[pending]
    patient = rows["patient_id"] if "patient_id" in rows.columns else pd.Series(None, index=rows.index)
    group_key = patient.where(patient.notna(), "case::" + rows["case_id"].astype(str))
    group_label = rows.groupby(group_key)["label"].agg(lambda s: s.astype(int).value_counts().idxmax())
    group_size = group_key.value_counts()

    rng = np.random.default_rng(seed)
    target = np.asarray(fractions, dtype=float)
    assignment: dict[str, str] = {}
    for label in sorted(group_label.unique()):
        groups = sorted(group_label.index[group_label == label])
        rng.shuffle(groups)
        total = float(sum(group_size[g] for g in groups))
        filled = np.zeros(3)
        for group in groups:
            deficit = (target * total - filled) / (target * total)
            choice = int(np.argmax(deficit))  # ties go to train, then val, then test
            assignment[group] = SPLIT_ORDER[choice]
            filled[choice] += group_size[group]
    out.loc[pending, "split"] = group_key.map(assignment).values
    return out
