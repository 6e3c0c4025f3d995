"""Linear evaluation of a backbone on NIH ChestX-ray14 in low-label regimes.

A linear head (or the whole network, ``mode: finetune``) is trained on a seeded, nested subset of
the training patients (1 % within 10 % within 100 %), the epoch is chosen on a patient-disjoint
validation split, and the official NIH test list is scored once with the selected weights. The
original study chose its epoch on the test split and drew its subsets with unseeded stratifiers;
both defects are avoided here.

Names are imported lazily so that light users (the summary script) do not pay for torch.
"""

from importlib import import_module

_EXPORTS = {
    "assign_splits": "splits",
    "label_subset": "splits",
    "load_nih_index": "data",
    "open_cache": "data",
    "mean_auc": "metrics",
    "per_finding_auc": "metrics",
    "run_linear_eval": "train",
    "select_epoch": "train",
    "collect_metrics": "summary",
    "plot_auc_vs_fraction": "summary",
    "summarize": "summary",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
