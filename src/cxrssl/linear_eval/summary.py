"""Summary table (init x fraction) with patient-bootstrap intervals, the paired differences between
inits, and the plot of mean test AUC against the label fraction.

Every run of one config scores the same test split (the split depends on the seed only), so the
test patients are resampled once (:func:`cxrssl.linear_eval.metrics.patient_resamples`) and every
run's mean AUC is computed under the same resamples: the difference between two inits at one
fraction is then a paired statistic, with its percentile interval and bootstrap p-value
(:func:`cxrssl.evaluation.metrics.bootstrap_p_value`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrssl.classes import NIH_FINDINGS
from cxrssl.errors import BadInputError
from cxrssl.evaluation.metrics import bootstrap_p_value, percentile_interval
from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_text
from cxrssl.linear_eval.metrics import bootstrap_mean_auc, patient_resamples

log = logging.getLogger(__name__)

REQUIRED = ("init", "fraction", "n_train_patients", "n_train_images", "selected_epoch",
            "val_mean_auc", "test_mean_auc", "test_auc")
COLUMNS = ["init", "arch", "fraction", "n_train_patients", "n_train_images", "selected_epoch",
           "val_mean_auc", "test_mean_auc", *NIH_FINDINGS]
CI_COLUMNS = ["test_mean_auc_ci_low", "test_mean_auc_ci_high"]
DIFFERENCE_COLUMNS = ["fraction", "init", "baseline", "difference", "ci_low", "ci_high", "p_value", "resamples"]


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


def read_predictions(metrics_path: str | Path) -> pd.DataFrame:
    """The run's ``predictions_test.csv`` (beside its metrics.json)."""
    path = Path(metrics_path).parent / "predictions_test.csv"
    try:
        frame = pd.read_csv(path, dtype={"image_index": str, "patient_id": str})
    except (OSError, ValueError) as exc:
        raise BadInputError(str(path), f"cannot read test predictions: {exc}") from exc
    missing = [c for n in NIH_FINDINGS for c in (f"true_{n}", f"score_{n}") if c not in frame]
    if missing or "patient_id" not in frame:
        raise BadInputError(str(path), f"missing columns {missing or ['patient_id']}")
    return frame


def bootstrap_runs(table: pd.DataFrame, metrics_paths: Sequence[str | Path], n_resamples: int,
                   seed: int) -> dict[tuple[str, float], np.ndarray]:
    """Mean test AUC of every run under the same patient resamples: ``{(init, fraction): (B,)}``."""
    frames = {}
    for path in metrics_paths:
        data = json.loads(Path(path).read_text())
        frames[(data["init"], float(data["fraction"]))] = (Path(path), read_predictions(path))
    (first_path, first), *_ = frames.values()
    for path, frame in frames.values():
        if not frame["image_index"].equals(first["image_index"]):
            raise BadInputError(str(path.parent / "predictions_test.csv"),
                                f"scores other test images than {first_path.parent / 'predictions_test.csv'}: "
                                "runs of one summary must share the test split (same seed and NIH index)")
    y_true = first[[f"true_{n}" for n in NIH_FINDINGS]].to_numpy()
    counts = patient_resamples(first["patient_id"], y_true, n_resamples, seed)
    return {key: bootstrap_mean_auc(y_true, frame[[f"score_{n}" for n in NIH_FINDINGS]].to_numpy(), counts)
            for key, (_, frame) in frames.items()}


def paired_differences(table: pd.DataFrame, boots: dict[tuple[str, float], np.ndarray],
                       baselines: Sequence[str]) -> pd.DataFrame:
    """Mean test AUC of each init minus each baseline's at the same fraction, over the same resamples."""
    rows = []
    for base in baselines:
        for _, row in table.iterrows():
            key, ref = (row["init"], float(row["fraction"])), (base, float(row["fraction"]))
            if row["init"] == base or ref not in boots:
                continue
            base_row = table[(table["init"] == base) & (table["fraction"] == row["fraction"])].iloc[0]
            diff = boots[key] - boots[ref]
            low, high = percentile_interval(diff)
            rows.append({"fraction": row["fraction"], "init": row["init"], "baseline": base,
                         "difference": row["test_mean_auc"] - base_row["test_mean_auc"],
                         "ci_low": low, "ci_high": high, "p_value": bootstrap_p_value(diff), "resamples": diff.size})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def _f(value, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def markdown(table: pd.DataFrame, differences: pd.DataFrame) -> str:
    """The summary and the paired differences as Markdown tables (the README and the report)."""
    fractions = sorted(table["fraction"].unique())
    lines = ["| init | " + " | ".join(f"{f * 100:g} % labels" for f in fractions) + " |",
             "| --- |" + " --- |" * len(fractions)]
    for init, runs in table.groupby("init", sort=False):
        cells = []
        for f in fractions:
            run = runs[runs["fraction"] == f]
            if run.empty:
                cells.append("")
                continue
            r = run.iloc[0]
            ci = f" [{_f(r['test_mean_auc_ci_low'])}, {_f(r['test_mean_auc_ci_high'])}]" \
                if "test_mean_auc_ci_low" in r and not pd.isna(r["test_mean_auc_ci_low"]) else ""
            cells.append(f"{_f(r['test_mean_auc'])}{ci}")
        lines.append(f"| {init} | " + " | ".join(cells) + " |")
    if not differences.empty:
        lines += ["", "| init - baseline | labels | difference [95 % CI] | p |", "| --- | --- | --- | --- |"]
        for _, d in differences.iterrows():
            lines.append(f"| {d['init']} - {d['baseline']} | {d['fraction'] * 100:g} % | {d['difference']:+.3f} "
                         f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {_f(d['p_value'])} |")
    return "\n".join(lines) + "\n"


def plot_auc_vs_fraction(table: pd.DataFrame, path: str | Path) -> None:
    """Mean test AUC against the labelled fraction (log x axis), one line per init, with the
    bootstrap interval as error bars when the table has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for init, runs in table.groupby("init", sort=False):
        runs = runs.sort_values("fraction")
        x, y = runs["fraction"] * 100, runs["test_mean_auc"]
        if "test_mean_auc_ci_low" in runs and runs["test_mean_auc_ci_low"].notna().all():
            # a percentile interval need not contain the point (the resampled AUC is biased): clip at 0
            err = np.clip(np.vstack([y - runs["test_mean_auc_ci_low"], runs["test_mean_auc_ci_high"] - y]), 0, None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=init)
        else:
            ax.plot(x, y, marker="o", label=init)
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


def summarize(metrics_paths: Sequence[str | Path], summary_path: str | Path, plot_path: str | Path,
              differences_path: str | Path | None = None, markdown_path: str | Path | None = None,
              n_resamples: int = 0, seed: int = 0, baselines: Sequence[str] = ()) -> pd.DataFrame:
    """Write the summary CSV (with ``n_resamples`` patient-bootstrap intervals), the plot, and the
    paired differences against ``baselines`` (CSV, and with the table as Markdown); returns the table."""
    table = collect_metrics(metrics_paths)
    differences = pd.DataFrame(columns=DIFFERENCE_COLUMNS)
    if n_resamples > 0:
        boots = bootstrap_runs(table, metrics_paths, n_resamples, seed)
        intervals = [percentile_interval(boots[(r["init"], float(r["fraction"]))]) for _, r in table.iterrows()]
        table[CI_COLUMNS] = np.array(intervals, dtype=float).reshape(len(table), 2)
        differences = paired_differences(table, boots, baselines)
    atomic_write_csv(table, summary_path)
    plot_auc_vs_fraction(table, plot_path)
    if differences_path is not None:
        atomic_write_csv(differences, differences_path)
    if markdown_path is not None:
        atomic_write_text(markdown(table, differences), markdown_path)
    log.info("summarised %d runs into %s and %s (%d bootstrap resamples, %d paired differences)",
             len(table), summary_path, plot_path, n_resamples, len(differences))
    return table
