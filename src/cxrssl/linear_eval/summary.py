"""Summary table (init x fraction) and the plot of mean test AUC against the label fraction."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cxrssl.classes import NIH_FINDINGS
from cxrssl.errors import BadInputError
from cxrssl.io import atomic_savefig, atomic_write_csv

log = logging.getLogger(__name__)

REQUIRED = ("init", "fraction", "n_train_patients", "n_train_images", "selected_epoch",
            "val_mean_auc", "test_mean_auc", "test_auc")
COLUMNS = ["init", "arch", "fraction", "n_train_patients", "n_train_images", "selected_epoch",
           "val_mean_auc", "test_mean_auc", *NIH_FINDINGS]


def collect_metrics(paths: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run's ``metrics.json``: counts, selected epoch, mean AUCs and test AUC per finding.

    Rows keep the order in which inits first appear, then increasing fraction.
    """
    rows = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BadInputError(str(path), f"cannot read metrics: {exc}") from exc
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise BadInputError(str(path), f"missing keys {missing}")
        row = {k: data[k] for k in REQUIRED if k != "test_auc"}
        row["arch"] = data.get("arch")
        row.update({name: data["test_auc"].get(name) for name in NIH_FINDINGS})
        rows.append(row)
    if not rows:
        raise ValueError("no linear evaluation metrics to summarise")
    table = pd.DataFrame(rows, columns=COLUMNS)
    duplicated = table.duplicated(["init", "fraction"])
    if duplicated.any():
        raise ValueError(f"several runs for {table.loc[duplicated, ['init', 'fraction']].values.tolist()}")
    order = {init: i for i, init in enumerate(dict.fromkeys(table["init"]))}
    table = table.sort_values(["init", "fraction"], key=lambda c: c.map(order) if c.name == "init" else c)
    return table.reset_index(drop=True)


def plot_auc_vs_fraction(table: pd.DataFrame, path: str | Path) -> None:
    """Mean test AUC against the labelled fraction (log x axis), one line per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for init, runs in table.groupby("init", sort=False):
        runs = runs.sort_values("fraction")
        ax.plot(runs["fraction"] * 100, runs["test_mean_auc"], marker="o", label=init)
    fractions = sorted(table["fraction"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([f * 100 for f in fractions]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{f * 100:g} %" for f in fractions])
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xlabel("labelled training patients")
    ax.set_ylabel(f"mean test ROC AUC ({len(NIH_FINDINGS)} findings)")
    ax.set_title("NIH ChestX-ray14 linear evaluation")
    ax.grid(True, alpha=0.3)
    ax.legend(title="backbone init")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=150)
    plt.close(fig)


def summarize(metrics_paths: Sequence[str | Path], summary_path: str | Path, plot_path: str | Path) -> pd.DataFrame:
    """Write the summary CSV and the plot; returns the table."""
    table = collect_metrics(metrics_paths)
    atomic_write_csv(table, summary_path)
    plot_auc_vs_fraction(table, plot_path)
    log.info("summarised %d runs into %s and %s", len(table), summary_path, plot_path)
    return table
