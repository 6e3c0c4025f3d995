"""The detection comparison: engine x init x resolution over the fine-tuning seeds, the paired
differences between inits, and the heatmaps' localisation scores.

Per engine x init x resolution (``summary.csv``):

* the mean over seeds of COCO mAP50, mAP@[.5:.95], mAP75, the VinBigData metric (``voc_mAP``) and
  its 101-point variant (``coco101_mAP``), each with its sample SD when there are several seeds;
* ``mAP50_ci_low/high`` (percentile) and ``mAP50_bca_low/high`` (BCa): the image-bootstrap interval
  of that seed-mean mAP50, the seeds' replicates averaged resample by resample (every run of a test
  set shares the resamples: :func:`cxrssl.evaluation.metrics.resample_counts`); it measures how
  much the test images decide the number;
* ``mAP50_seed_t_low/high``: with two or more seeds, the t-interval of the mean over seeds,
  ``mean +- t(0.975, n-1) SD / sqrt(n)``: how much the fine-tuning seed decides it;
* the heatmap localisation scores (:mod:`cxrssl.evaluation.localization`) when given:
  ``loc_<score>`` mean over the scored test images and seeds, with its interval (one seed: the
  image bootstrap of that run; several: the t-interval over seeds);
* per-class AP50 (means over seeds).

Paired differences (``differences.csv``): every init minus each baseline (``baselines``, e.g.
ImageNet, random) of the same engine and resolution, over the seeds both have: the mean over seeds
of ``mAP50(init) - mAP50(baseline)``, its percentile and BCa intervals and two-sided bootstrap
p-value over the same test-image resamples, and with several seeds the t-interval over seeds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrssl.errors import BadInputError
from cxrssl.evaluation.localization import METRICS as LOC_METRICS
from cxrssl.evaluation.metrics import bca_interval, bootstrap_p_value, load_json, percentile_interval
from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

KEYS = ["engine", "init", "res"]
HEADLINE = ["mAP50", "mAP", "mAP75", "voc_mAP", "coco101_mAP"]
LEVEL = 0.95


@dataclass(frozen=True)
class Run:
    engine: str
    init: str
    res: int
    seed: int
    metrics: Path


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def load_runs(runs: list[Run]) -> tuple[pd.DataFrame, dict]:
    """One row per run (keys, headline metrics, per-class AP50) and each run's bootstrap arrays."""
    rows, boots = [], {}
    for run in runs:
        path = Path(run.metrics)
        metrics = load_json(path)
        missing = [k for k in ("mAP50", "mAP", "mAP75", "mAP50_ci", "voc_mAP", "per_class_AP50") if k not in metrics]
        if missing:
            raise BadInputError(str(path), f"not an evaluation metrics file: missing {missing}")
        row = {"engine": run.engine, "init": run.init, "res": int(run.res), "seed": int(run.seed)}
        row.update({k: _value(metrics.get(k)) for k in HEADLINE})
        row["voc_iou"] = float(metrics.get("voc_iou", float("nan")))
        row.update({f"AP50 {name}": _value(v) for name, v in metrics["per_class_AP50"].items()})
        rows.append(row)
        boots[(run.engine, run.init, int(run.res), int(run.seed))] = {
            "point": _value(metrics["mAP50"]), "id": metrics.get("bootstrap_resamples_id"),
            "replicates": np.array([_value(v) for v in metrics.get("mAP50_bootstrap", [])], dtype=float),
            "jackknife": np.array([_value(v) for v in metrics.get("mAP50_jackknife", [])], dtype=float),
            "where": str(path)}
    if not rows:
        raise ValueError("no evaluation runs to summarise")
    return pd.DataFrame(rows), boots


def load_localization(runs: list[Run]) -> dict:
    """(engine, init, res, seed) -> the ``summary`` of each run's ``localization.json``."""
    out = {}
    for run in runs:
        data = load_json(run.metrics)
        if "summary" not in data:
            raise BadInputError(str(run.metrics), "not a heatmap localization file: no 'summary'")
        out[(run.engine, run.init, int(run.res), int(run.seed))] = data
    return out


def t_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """Student-t interval of the mean of ``values`` (NaN with fewer than two)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return [float("nan"), float("nan")]
    half = float(t.ppf(0.5 + level / 2, values.size - 1)) * values.std(ddof=1) / math.sqrt(values.size)
    return [float(values.mean() - half), float(values.mean() + half)]


def _seed_mean_bootstrap(boots: list[dict]) -> tuple[np.ndarray, np.ndarray, float]:
    """Replicates and jackknife of the seed-mean mAP50 (runs must share their resamples)."""
    ids = {b["id"] for b in boots}
    sizes = {b["replicates"].size for b in boots}
    if len(ids) != 1 or None in ids or len(sizes) != 1 or 0 in sizes:
        if len(ids) > 1:
            raise BadInputError(", ".join(b["where"] for b in boots),
                                "these runs were bootstrapped over different resamples (test set or seed)")
        return np.zeros(0), np.zeros(0), float(np.mean([b["point"] for b in boots]))
    replicates = np.mean([b["replicates"] for b in boots], axis=0)
    jackknife = np.mean([b["jackknife"] for b in boots], axis=0) if all(b["jackknife"].size for b in boots) else np.zeros(0)
    return replicates, jackknife, float(np.mean([b["point"] for b in boots]))


def summarize(per_run: pd.DataFrame, boots: dict | None = None, localization: dict | None = None) -> pd.DataFrame:
    """One row per engine x init x res in the order the runs came (see the module docstring)."""
    boots, localization = boots or {}, localization or {}
    value_cols = [c for c in per_run.columns if c not in KEYS + ["seed"]]
    rows = []
    for keys, group in per_run.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, keys))
        seeds = sorted(int(s) for s in group["seed"])
        row["n_seeds"] = len(group)
        row["seeds"] = " ".join(str(s) for s in seeds)
        for col in value_cols:
            values = group[col].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            row[col] = float(finite.mean()) if finite.size else float("nan")
            if col in HEADLINE:
                row[f"{col}_sd"] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
        run_boots = [boots[(*keys, s)] for s in seeds if (*keys, s) in boots]
        replicates, jackknife, point = _seed_mean_bootstrap(run_boots) if run_boots else (np.zeros(0),) * 2 + (
            float("nan"),)
        row["mAP50_ci_low"], row["mAP50_ci_high"] = percentile_interval(replicates, LEVEL)
        row["mAP50_bca_low"], row["mAP50_bca_high"] = bca_interval(replicates, jackknife, point, LEVEL)
        row["mAP50_seed_t_low"], row["mAP50_seed_t_high"] = t_interval(group["mAP50"].to_numpy(dtype=float))
        locs = [localization[(*keys, s)] for s in seeds if (*keys, s) in localization]
        if locs:
            row["loc_n_images"] = int(np.mean([loc["n_images"] for loc in locs]))
            for metric in LOC_METRICS:
                means = np.array([_value(loc["summary"][metric]["mean"]) for loc in locs])
                row[f"loc_{metric}"] = float(np.nanmean(means)) if np.isfinite(means).any() else float("nan")
                ci = ([_value(v) for v in locs[0]["summary"][metric]["ci"]] if len(locs) == 1 else t_interval(means))
                row[f"loc_{metric}_low"], row[f"loc_{metric}_high"] = ci
        rows.append(row)
    ordered = KEYS + ["n_seeds", "seeds"]
    for col in HEADLINE:
        ordered += [col, f"{col}_sd"]
        if col == "mAP50":
            ordered += ["mAP50_ci_low", "mAP50_ci_high", "mAP50_bca_low", "mAP50_bca_high",
                        "mAP50_seed_t_low", "mAP50_seed_t_high"]
    ordered += ["voc_iou"]
    if any("loc_n_images" in r for r in rows):
        ordered += ["loc_n_images"] + [f"loc_{m}{s}" for m in LOC_METRICS for s in ("", "_low", "_high")]
    ordered += [c for c in value_cols if c.startswith("AP50 ")]
    return pd.DataFrame(rows).reindex(columns=ordered)


DIFF_COLUMNS = ["engine", "res", "init", "baseline", "n_seeds", "delta_mAP50", "delta_ci_low", "delta_ci_high",
                "delta_bca_low", "delta_bca_high", "p_value", "n_resamples", "delta_seed_sd", "delta_seed_t_low",
                "delta_seed_t_high"]


def differences(per_run: pd.DataFrame, boots: dict, baselines: list[str]) -> pd.DataFrame:
    """Paired mAP50 differences of every init against each baseline (see the module docstring)."""
    rows = []
    inits = list(dict.fromkeys(per_run["init"]))
    for (engine, res), group in per_run.groupby(["engine", "res"], sort=False):
        present = set(group["init"])
        for baseline in [b for b in baselines if b in present]:
            for init in [i for i in inits if i in present and i not in baselines]:
                seeds = sorted(set(group.loc[group["init"] == init, "seed"]) & set(group.loc[group["init"] == baseline,
                                                                                            "seed"]))
                if not seeds:
                    continue
                pairs = [(boots[(engine, init, res, s)], boots[(engine, baseline, res, s)]) for s in seeds]
                deltas = np.array([a["point"] - b["point"] for a, b in pairs])
                row = {"engine": engine, "res": int(res), "init": init, "baseline": baseline, "n_seeds": len(seeds),
                       "delta_mAP50": float(deltas.mean())}
                if all(a["id"] and a["id"] == b["id"] and a["replicates"].size for a, b in pairs):
                    diff = np.mean([a["replicates"] - b["replicates"] for a, b in pairs], axis=0)
                    jack = (np.mean([a["jackknife"] - b["jackknife"] for a, b in pairs], axis=0)
                            if all(a["jackknife"].size and b["jackknife"].size for a, b in pairs) else np.zeros(0))
                    row["delta_ci_low"], row["delta_ci_high"] = percentile_interval(diff, LEVEL)
                    row["delta_bca_low"], row["delta_bca_high"] = bca_interval(diff, jack, row["delta_mAP50"], LEVEL)
                    row["p_value"], row["n_resamples"] = bootstrap_p_value(diff), int(diff.size)
                elif any(a["id"] != b["id"] for a, b in pairs):
                    raise BadInputError(f"{pairs[0][0]['where']}, {pairs[0][1]['where']}",
                                        "bootstrapped over different resamples: the difference cannot be paired")
                row["delta_seed_sd"] = float(deltas.std(ddof=1)) if deltas.size > 1 else float("nan")
                row["delta_seed_t_low"], row["delta_seed_t_high"] = t_interval(deltas)
                rows.append(row)
    return pd.DataFrame(rows).reindex(columns=DIFF_COLUMNS)


def _fmt(v: float, sd: float | None = None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    text = f"{v:.3f}"
    if sd is not None and math.isfinite(sd):
        text += f" ± {sd:.3f}"
    return text


def _ci(low: float, high: float) -> str:
    return f"[{_fmt(low)}, {_fmt(high)}]"


def _p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def to_markdown(summary: pd.DataFrame, diffs: pd.DataFrame | None = None) -> str:
    """Markdown tables: the headline metrics, the paired differences and the heatmap localisation."""
    voc_iou = summary["voc_iou"].dropna()
    voc_label = f"VinBigData mAP@{voc_iou.iloc[0]:g}" if len(voc_iou) else "VinBigData mAP"
    header = ["engine", "init", "res", "seeds", "mAP50", "95% CI (BCa)", "95% CI (percentile)",
              "seeds: mean ± SD [95% t]", "mAP@[.5:.95]", "mAP75", voc_label]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for _, r in summary.iterrows():
        seed_cell = (f"{_fmt(r['mAP50'], r['mAP50_sd'])} {_ci(r['mAP50_seed_t_low'], r['mAP50_seed_t_high'])}"
                     if r["n_seeds"] > 1 else "1 seed")
        cells = [r["engine"], r["init"], f"{r['res']} px", str(r["n_seeds"]), _fmt(r["mAP50"]),
                 _ci(r["mAP50_bca_low"], r["mAP50_bca_high"]), _ci(r["mAP50_ci_low"], r["mAP50_ci_high"]), seed_cell,
                 _fmt(r["mAP"], r["mAP_sd"]), _fmt(r["mAP75"], r["mAP75_sd"]), _fmt(r["voc_mAP"], r["voc_mAP_sd"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("mAP50 (COCO) is the mean over fine-tuning seeds; its intervals resample the test images "
                 "(every resample averages over the same classes, those with a GT box in the test set). "
                 f"{voc_label} is the competition's metric (PASCAL VOC 2010 all-point mAP, IoU > "
                 f"{voc_iou.iloc[0] if len(voc_iou) else 0.4:g}, \"No finding\" as a class). Per-class AP50 "
                 "and COCO's 101-point variant of the competition metric (coco101_mAP) are in the CSV.")
    if diffs is not None and len(diffs):
        lines += ["", "**Paired mAP50 differences** (init minus baseline, same test-image resamples)", "",
                  "| engine | res | init − baseline | seeds | Δ mAP50 | 95% CI (BCa) | 95% CI (percentile) | p | "
                  "seeds: SD [95% t] |", "|---|---|---|---|---|---|---|---|---|"]
        for _, d in diffs.iterrows():
            seed_cell = (f"{_fmt(d['delta_seed_sd'])} {_ci(d['delta_seed_t_low'], d['delta_seed_t_high'])}"
                         if d["n_seeds"] > 1 else "1 seed")
            lines.append(f"| {d['engine']} | {d['res']} px | {d['init']} − {d['baseline']} | {d['n_seeds']} | "
                         f"{d['delta_mAP50']:+.3f} | {_ci(d['delta_bca_low'], d['delta_bca_high'])} | "
                         f"{_ci(d['delta_ci_low'], d['delta_ci_high'])} | {_p(d['p_value'])} | {seed_cell} |")
        lines += ["", "p: two-sided bootstrap p-value of no difference (twice the smaller share of resampled "
                      "differences on either side of 0, (1 + k) / (1 + B))."]
    if "loc_n_images" in summary:
        lines += ["", "**Heatmap localisation** (against the GT boxes of the scored test images)", "",
                  "| engine | init | res | images | heat inside boxes [95% CI] | pointing game [95% CI] | "
                  "IoU [95% CI] | Dice | CNR |", "|---|---|---|---|---|---|---|---|---|"]
        for _, r in summary.iterrows():
            if not math.isfinite(_value(r.get("loc_n_images"))):
                continue
            lines.append(
                f"| {r['engine']} | {r['init']} | {r['res']} px | {int(r['loc_n_images'])} | "
                f"{_fmt(r['loc_energy_in_box'])} {_ci(r['loc_energy_in_box_low'], r['loc_energy_in_box_high'])} | "
                f"{_fmt(r['loc_pointing_game'])} {_ci(r['loc_pointing_game_low'], r['loc_pointing_game_high'])} | "
                f"{_fmt(r['loc_iou'])} {_ci(r['loc_iou_low'], r['loc_iou_high'])} | {_fmt(r['loc_dice'])} | "
                f"{_fmt(r['loc_cnr'])} |")
        lines += ["", "Share of the heatmap's mass inside the GT boxes, share of images whose heatmap maximum "
                      "lies in a box, IoU/Dice of the map thresholded at half its maximum, contrast-to-noise "
                      "ratio; intervals: image bootstrap (one seed) or t over seeds."]
    return "\n".join(lines) + "\n"


def plot_map50(summary: pd.DataFrame, per_run: pd.DataFrame):
    """Bars of mAP50 grouped by resolution, one bar per init, BCa error bars; one panel per engine."""
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
            low = np.array([sub["mAP50_bca_low"].get(r, np.nan) for r in resolutions], dtype=float)
            high = np.array([sub["mAP50_bca_high"].get(r, np.nan) for r in resolutions], dtype=float)
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
    axes[0][0].set_ylabel("mAP50 (95% BCa bootstrap CI)")
    axes[0][-1].legend(title="init", fontsize="small")
    fig.tight_layout()
    return fig


def write_summary(runs: list[Run], out_csv: str | Path, out_md: str | Path, out_plot: str | Path,
                  localization: list[Run] = (), baselines: list[str] = (), out_differences: str | Path | None = None
                  ) -> pd.DataFrame:
    """Summarise ``runs`` (and their heatmap ``localization`` files) into the CSV, the differences
    CSV, the Markdown tables and the bar plot (all atomic)."""
    import matplotlib.pyplot as plt

    per_run, boots = load_runs(runs)
    loc = load_localization(list(localization))
    summary = summarize(per_run, boots, loc)
    diffs = differences(per_run, boots, list(baselines))
    atomic_write_csv(summary, out_csv)
    if out_differences is not None:
        atomic_write_csv(diffs, out_differences)
    atomic_write_text(to_markdown(summary, diffs), out_md)
    fig = plot_map50(summary, per_run)
    atomic_savefig(fig, out_plot, dpi=150)
    plt.close(fig)
    log.info("summarised %d runs into %d rows and %d paired differences: %s", len(per_run), len(summary), len(diffs),
             out_csv)
    return summary
