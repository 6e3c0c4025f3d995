"""Patient-disjoint train/val/test splits and nested label-fraction subsets.

Everything is drawn from ``numpy.random.default_rng([seed, stream])`` over *sorted* patient ids,
so the result depends only on the seed and the set of patients, never on the row order of the
index. Separate streams keep the validation split and the label subsets independent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_VAL_STREAM = 1
_SUBSET_STREAM = 2
SPLITS = ("train", "val", "test")


def assign_splits(index: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """``train``/``val``/``test`` per row of the NIH index.

    The official ``test`` list stays the test split; the ``train_val`` patients are divided into
    train and val by a seeded permutation (``val_fraction`` of the patients, at least one patient
    in each). The official lists are patient-disjoint; :func:`cxrssl.linear_eval.data.load_nih_index`
    checks that before we get here.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    official = index["official_split"].to_numpy()
    patients = index["patient_id"].astype(str).to_numpy()
    train_val = np.array(sorted(set(patients[official == "train_val"])))
    if len(train_val) < 2:
        raise ValueError(
            f"need at least 2 train_val patients to hold out a validation split, found {len(train_val)}"
        )
    n_val = min(max(1, int(round(val_fraction * len(train_val)))), len(train_val) - 1)
    val_patients = np.random.default_rng([seed, _VAL_STREAM]).permutation(train_val)[:n_val]
    split = np.where(official == "test", "test", np.where(np.isin(patients, val_patients), "val", "train"))
    return pd.Series(split, index=index.index, name="split")


def subset_size(n_patients: int, fraction: float) -> int:
    """Patients in a ``fraction`` subset: rounded, at least one; non-decreasing in ``fraction``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if n_patients < 1:
        raise ValueError("no training patients to draw a label subset from")
    return min(n_patients, max(1, int(round(fraction * n_patients))))


def label_subset(train_patients, fraction: float, seed: int) -> np.ndarray:
    """The first ``fraction`` of a seeded permutation of the training patients.

    The permutation does not depend on ``fraction``, so the subsets are nested
    (1 % within 10 % within 100 %) for one seed.
    """
    patients = np.array(sorted({str(p) for p in train_patients}))
    k = subset_size(len(patients), fraction)
    return np.random.default_rng([seed, _SUBSET_STREAM]).permutation(patients)[:k]
