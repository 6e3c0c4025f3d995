"""The segmentation summary: one row per init (Dice and IoU with their bootstrap intervals) as CSV
and Markdown, and a figure of test Dice per init with its interval."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_text

COLUMNS = ["init", "arch", "dice", "dice_lo", "dice_hi", "iou", "iou_lo", "iou_hi", "n_test", "best_epoch", "seconds"]


def _fmt(v) -> str:
    return "" if v is None or pd.isna(v) else f"{v:.3f}"


def collect(paths: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        try:
            m = json.loads(Path(path).read_text())
            rows.append({"init": m["init"], "arch": m["arch"], "dice": m["dice"], "dice_lo": m["dice_ci"][0],
                         "dice_hi": m["dice_ci"][1], "iou": m["iou"], "iou_lo": m["iou_ci"][0],
                         "iou_hi": m["iou_ci"][1], "n_test": m["n_test"], "best_epoch": m["best_epoch"],
                         "seconds": m["seconds"]})
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise BadInputError(str(path), f"not a segmentation metrics.json ({type(exc).__name__}: {exc})") from None
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| init | arch | Dice [95% CI] | IoU [95% CI] | test images |", "|---|---|---|---|---|"]
    for r in frame.itertuples():
        lines.append(f"| {r.init} | {r.arch} | {_fmt(r.dice)} [{_fmt(r.dice_lo)}, {_fmt(r.dice_hi)}] | "
                     f"{_fmt(r.iou)} [{_fmt(r.iou_lo)}, {_fmt(r.iou_hi)}] | {r.n_test} |")
    return "\n".join(lines) + "\n"


def plot(frame: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(frame), 1), 3.2))
    lo = (frame["dice"] - frame["dice_lo"].astype(float)).fillna(0).clip(lower=0)
    hi = (frame["dice_hi"].astype(float) - frame["dice"]).fillna(0).clip(lower=0)
    ax.bar(frame["init"], frame["dice"], yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test Dice (95% bootstrap CI)")
    ax.set_title("Lung segmentation")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def summarize(paths: list[str | Path], csv_path: str | Path, md_path: str | Path, png_path: str | Path) -> pd.DataFrame:
    frame = collect(paths)
    atomic_write_csv(frame, csv_path)
    atomic_write_text(markdown(frame), md_path)
    plot(frame, png_path)
    return frame
