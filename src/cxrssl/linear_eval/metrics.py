"""Per-finding ROC AUC (scikit-learn) and their mean over the findings where it is defined."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)


def defined_findings(y_true: np.ndarray) -> np.ndarray:
    """Per column: whether both classes occur (ROC AUC is defined only then)."""
    y_true = np.asarray(y_true)
    return np.array([np.unique(y_true[:, j]).size == 2 for j in range(y_true.shape[1])], dtype=bool)


def per_finding_auc(y_true: np.ndarray, y_score: np.ndarray, names: Sequence[str],
                    split: str = "", warn: bool = True) -> dict[str, float]:
    """ROC AUC per column; NaN (with a warning when ``warn``) where a split has only one class."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 2 or y_true.shape[1] != len(names):
        raise ValueError(f"labels {y_true.shape}, scores {y_score.shape} and {len(names)} names do not match")
    if not np.isfinite(y_score).all():
        raise ValueError(f"{split or 'scores'}: non-finite scores (training diverged?)")
    out: dict[str, float] = {}
    defined = defined_findings(y_true)
    for j, name in enumerate(names):
        column = y_true[:, j]
        if not defined[j]:
            if warn:
                log.warning("%s: %s has only %s labels (%d images); its AUC is undefined and left out "
                            "of the mean", split or "split", name,
                            "positive" if column.size and column[0] == 1 else "negative", column.size)
            out[name] = math.nan
        else:
            out[name] = float(roc_auc_score(column, y_score[:, j]))
    return out


def mean_auc(aucs: dict[str, float]) -> float:
    """Mean of the defined AUCs; NaN when none is defined."""
    values = [v for v in aucs.values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def weighted_auc(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one finding under each row of ``weights`` (resamples x images), vectorised.

    Equal to ``roc_auc_score(y_true, y_score, sample_weight=w)`` for every row ``w`` (ties count
    half): the Mann-Whitney statistic with image weights. NaN where a row leaves one class empty.
    """
    y_true = np.asarray(y_true).astype(bool)
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    values, groups = np.unique(np.asarray(y_score, dtype=np.float64), return_inverse=True)
    onehot = np.zeros((y_true.size, values.size))
    onehot[np.arange(y_true.size), groups] = 1.0
    neg = (weights * ~y_true) @ onehot  # negative weight per distinct score, resamples x scores
    pos = (weights * y_true) @ onehot
    below = np.cumsum(neg, axis=1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)


def patient_resamples(patients: Sequence, y_true: np.ndarray, n_resamples: int, seed: int,
                      max_draws: int = 2_000_000, chunk: int = 4096) -> np.ndarray:
    """Patient bootstrap of a test split as per-image draw counts (resamples x images).

    Patients are drawn with replacement (images of one patient are not independent); a draw in
    which a finding defined on the whole split (both classes present) loses a class is drawn again,
    so every resample averages over the same findings (a finding seen in one test patient only is
    then in every resample: such a split is too small for a precise interval anyway). The draws
    depend only on ``seed``, the patients and the labels: every run on the same test split gets the
    same resamples (paired).
    """
    codes, patient_of = np.unique(np.asarray(patients).astype(str), return_inverse=True)
    y_true = np.asarray(y_true)
    defined = defined_findings(y_true)
    n_patients, n_images = codes.size, len(patient_of)
    rng = np.random.default_rng(seed)
    accepted, drawn = [], 0
    while sum(len(a) for a in accepted) < n_resamples:
        if drawn >= max_draws:
            raise ValueError(f"only {sum(len(a) for a in accepted)} of {drawn} patient resamples keep both classes of "
                             "every finding: the test split is too small for a bootstrap")
        picks = rng.integers(0, n_patients, size=(chunk, n_patients))
        per_patient = np.bincount((picks + n_patients * np.arange(chunk)[:, None]).ravel(),
                                  minlength=chunk * n_patients).reshape(chunk, n_patients)
        counts = per_patient[:, patient_of]
        pos = counts @ y_true
        keep = ((pos > 0) & (pos < n_images))[:, defined].all(axis=1)
        accepted.append(counts[keep])
        drawn += chunk
    return np.concatenate(accepted)[:n_resamples].astype(np.int64)


def bootstrap_mean_auc(y_true: np.ndarray, y_score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean AUC over the split's defined findings under each resample of ``counts``."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    defined = np.flatnonzero(defined_findings(y_true))
    if defined.size == 0:
        return np.full(len(counts), np.nan)
    return np.mean([weighted_auc(y_true[:, j], y_score[:, j], counts) for j in defined], axis=0)
