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
