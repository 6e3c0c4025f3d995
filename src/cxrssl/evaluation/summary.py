"""The detection comparison: one row per engine x init x resolution over the fine-tuning seeds.

Each row gives the mean (and the sample standard deviation when there are several seeds) of the
COCO mAP50, mAP@[.5:.95], mAP75, the VOC-style mAP and every class's AP50. The mAP50 bootstrap CI
of a row is the mean of its seeds' CI bounds (the CI of one seed when there is one).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

KEYS = ["engine", "init", "res"]
HEADLINE = ["mAP50", "mAP", "mAP75", "voc_mAP"]


@dataclass(frozen=True)
class Run:
    engine: str
    init: str
    res: int
    seed: int
    metrics: Path


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def load_runs(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its keys, headline metrics, CI bounds and per-class AP50."""
    rows = []
    for run in runs:
        path = Path(run.metrics)
        if not path.is_file():
            raise BadInputError(str(path), "metrics file does not exist")
        try:
            metrics = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise BadInputError(str(path), f"not valid JSON: {exc}") from exc
        missing = [k for k in ("mAP50", "mAP", "mAP75", "mAP50_ci", "voc_mAP", "per_class_AP50") if k not in metrics]
        if missing:
            raise BadInputError(str(path), f"not an evaluation metrics file: missing {missing}")
        row = {"engine": run.engine, "init": run.init, "res": int(run.res), "seed": int(run.seed)}
        row.update({k: _value(metrics[k]) for k in HEADLINE})
        row["mAP50_ci_low"], row["mAP50_ci_high"] = (_value(v) for v in metrics["mAP50_ci"])
        row["voc_iou"] = float(metrics.get("voc_iou", float("nan")))
        row.update({f"AP50 {name}": _value(v) for name, v in metrics["per_class_AP50"].items()})
        rows.append(row)
    if not rows:
        raise ValueError("no evaluation runs to summarise")
    return pd.DataFrame(rows)


def summarize(per_run: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over seeds per engine x init x res, in the order the runs came."""
    value_cols = [c for c in per_run.columns if c not in KEYS + ["seed"]]
    rows = []
    for keys, group in per_run.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, keys))
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in sorted(group["seed"]))
        for col in value_cols:
            values = group[col].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[col] = float(finite.mean()) if finite.size else float("nan")
            if col in HEADLINE:
                row[f"{col}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        rows.append(row)
    ordered = KEYS + ["n_seeds", "seeds"]
    for col in HEADLINE:
        ordered += [col, f"{col}_sd"]
        if col == "mAP50":
            ordered += ["mAP50_ci_low", "mAP50_ci_high"]
    ordered += ["voc_iou"] + [c for c in value_cols if c.startswith("AP50 ")]
    return pd.DataFrame(rows)[ordered]


def _fmt(v: float, sd: float | None = None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    text = f"{v:.3f}"
    if sd is not None and math.isfinite(sd):
        text += f" ± {sd:.3f}"
    return text


def to_markdown(summary: pd.DataFrame) -> str:
    """A Markdown table of the headline metrics (per-class AP50 stays in the CSV)."""
    voc_iou = summary["voc_iou"].dropna()
    voc_label = f"VOC mAP@{voc_iou.iloc[0]:g}" if len(voc_iou) else "VOC mAP"
    header = ["engine", "init", "res", "seeds", "mAP50 [95% CI]", "mAP@[.5:.95]", "mAP75", voc_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in summary.iterrows():
        ci = f"[{_fmt(r['mAP50_ci_low'])}, {_fmt(r['mAP50_ci_high'])}]"
        cells = [r["engine"], r["init"], f"{r['res']} px", str(r["n_seeds"]),
                 f"{_fmt(r['mAP50'], r['mAP50_sd'])} {ci}", _fmt(r["mAP"], r["mAP_sd"]),
                 _fmt(r["mAP75"], r["mAP75_sd"]), _fmt(r["voc_mAP"], r["voc_mAP_sd"])]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nMean ± SD over fine-tuning seeds where there are several; the CI is the image-bootstrap "
            "95% interval of mAP50 (mean of the seeds' bounds). Per-class AP50 is in the CSV.\n")
    return "\n".join(lines) + "\n" + note


def plot_map50(summary: pd.DataFrame, per_run: pd.DataFrame):
    """Bars of mAP50 grouped by resolution, one bar per init, CI error bars; one panel per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(dict.fromkeys(summary["engine"]))
    inits = list(dict.fromkeys(summary["init"]))
    resolutions = sorted(set(summary["res"]))
    fig, axes = plt.subplots(1, len(engines), figsize=(max(4.0, 1.6 * len(resolutions) * len(inits)) * len(engines), 4),
                             squeeze=False, sharey=True)
    width = 0.8 / len(inits)
    colors = plt.get_cmap("tab10")
    for ax, engine in zip(axes[0], engines):
        for j, init in enumerate(inits):
            sub = summary[(summary["engine"] == engine) & (summary["init"] == init)].set_index("res")
            x = np.arange(len(resolutions)) + (j - (len(inits) - 1) / 2) * width
            heights = np.array([sub["mAP50"].get(r, np.nan) for r in resolutions], dtype=float)
            low = np.array([sub["mAP50_ci_low"].get(r, np.nan) for r in resolutions], dtype=float)
            high = np.array([sub["mAP50_ci_high"].get(r, np.nan) for r in resolutions], dtype=float)
            err = np.vstack([np.clip(heights - low, 0, None), np.clip(high - heights, 0, None)])
            err = np.nan_to_num(err)
            ax.bar(x, np.nan_to_num(heights), width, label=init, color=colors(j), yerr=err, capsize=3)
            seeds = per_run[(per_run["engine"] == engine) & (per_run["init"] == init)]
            if seeds.groupby("res").size().max() > 1:  # show the seeds themselves when there are several
                for r_index, r in enumerate(resolutions):
                    vals = seeds.loc[seeds["res"] == r, "mAP50"].to_numpy(dtype=float)
                    ax.scatter(np.full(len(vals), x[r_index]), vals, color="black", s=10, zorder=3)
        ax.set_xticks(np.arange(len(resolutions)), [f"{r} px" for r in resolutions])
        ax.set_title(f"{engine}")
        ax.set_xlabel("input resolution")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mAP50 (95% bootstrap CI)")
    axes[0][-1].legend(title="init", fontsize="small")
    fig.tight_layout()
    return fig


def write_summary(runs: list[Run], out_csv: str | Path, out_md: str | Path, out_plot: str | Path) -> pd.DataFrame:
    """Summarise ``runs`` into the CSV, the Markdown table and the bar plot (all atomic)."""
    import matplotlib.pyplot as plt

    per_run = load_runs(runs)
    summary = summarize(per_run)
    atomic_write_csv(summary, out_csv)
    atomic_write_text(to_markdown(summary), out_md)
    fig = plot_map50(summary, per_run)
    atomic_savefig(fig, out_plot, dpi=150)
    plt.close(fig)
    log.info("summarised %d runs into %d rows: %s", len(per_run), len(summary), out_csv)
    return summary
