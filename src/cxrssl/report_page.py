"""The report's first page: the headline comparison tables, as reStructuredText.

:func:`headline_rst` turns the linear-evaluation summary (``linear_eval/summary.csv``: mean test
ROC AUC per init and label fraction, epoch selected on validation) and the detection summary
(``evaluation/summary.csv`` and ``differences.csv``: mAP50 per engine x init x resolution with its
95 % BCa and percentile intervals over test-image resamples, and the paired differences against
the baselines) into ``list-table`` blocks. The Snakemake report's workflow description
(``report/workflow.rst``) includes the file, so the tables are what a reader sees first.
Numbers are only formatted here; they are computed once, by the summaries.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_write_text


def _read(path: str | Path, required: list[str]) -> pd.DataFrame:
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadInputError(str(path), f"cannot read the summary table: {exc}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BadInputError(str(path), f"lacks the columns {missing}")
    return frame


def _num(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.3f}" if math.isfinite(v) else "n/a"


def _ci(low, high) -> str:
    return f"[{_num(low)}, {_num(high)}]"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("*", "\\*")


def list_table(title: str, header: list[str], rows: list[list[str]], widths: str = "auto") -> list[str]:
    lines = [f".. list-table:: {title}", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        lines.append(f"   * - {_cell(row[0])}")
        lines += [f"     - {_cell(c)}" for c in row[1:]]
    return lines + [""]


def _fraction(f: float) -> str:
    return f"{100 * f:g} % labels"


def linear_table(linear_csv: str | Path) -> list[str]:
    table = _read(linear_csv, ["init", "fraction", "test_mean_auc"])
    fractions = sorted(table["fraction"].unique())
    rows = []
    for init, group in table.groupby("init", sort=False):
        by_fraction = dict(zip(group["fraction"], group["test_mean_auc"]))
        arch = group["arch"].iloc[0] if "arch" in group and pd.notna(group["arch"].iloc[0]) else ""
        rows.append([init, arch, *[_num(by_fraction.get(f)) for f in fractions]])
    return list_table("Linear evaluation: mean test ROC AUC over the NIH findings",
                      ["init", "arch", *[_fraction(f) for f in fractions]], rows)


def detection_table(detection_csv: str | Path) -> list[str]:
    cols = ["engine", "init", "res", "n_seeds", "mAP50", "mAP50_bca_low", "mAP50_bca_high", "mAP50_ci_low",
            "mAP50_ci_high"]
    table = _read(detection_csv, cols)
    rows = [[r["engine"], r["init"], f"{int(r['res'])} px", str(int(r["n_seeds"])), _num(r["mAP50"]),
             _ci(r["mAP50_bca_low"], r["mAP50_bca_high"]), _ci(r["mAP50_ci_low"], r["mAP50_ci_high"]),
             _num(r.get("voc_mAP"))] for _, r in table.iterrows()]
    return list_table("Detection: VinDr-CXR test mAP50 with 95 % intervals over test-image resamples",
                      ["engine", "init", "res", "seeds", "mAP50", "95 % CI (BCa)", "95 % CI (percentile)",
                       "VinBigData mAP"], rows)


def differences_table(differences_csv: str | Path) -> list[str]:
    cols = ["engine", "res", "init", "baseline", "delta_mAP50", "delta_bca_low", "delta_bca_high", "p_value"]
    table = _read(differences_csv, cols)
    if table.empty:
        return []
    rows = [[r["engine"], f"{int(r['res'])} px", f"{r['init']} − {r['baseline']}",
             f"{float(r['delta_mAP50']):+.3f}" if math.isfinite(float(r["delta_mAP50"])) else "n/a",
             _ci(r["delta_bca_low"], r["delta_bca_high"]), _num(r["p_value"])] for _, r in table.iterrows()]
    return list_table("Paired mAP50 differences (same test-image resamples)",
                      ["engine", "res", "init − baseline", "Δ mAP50", "95 % CI (BCa)", "p"], rows)


def headline_rst(linear_csv: str | Path, detection_csv: str | Path, differences_csv: str | Path | None = None) -> str:
    lines = ["Headline results", "================", "",
             "Every initialisation compared, as the summaries compute them (the categories below hold the "
             "figures, per-class numbers and the CSV files).", ""]
    lines += linear_table(linear_csv)
    lines += ["Test AUC at the epoch selected on the patient-disjoint validation split.", ""]
    lines += detection_table(detection_csv)
    if differences_csv is not None:
        lines += differences_table(differences_csv)
    return "\n".join(lines) + "\n"


def write_headline(linear_csv, detection_csv, differences_csv, out: str | Path) -> str:
    text = headline_rst(linear_csv, detection_csv, differences_csv)
    atomic_write_text(text, out)
    return text
