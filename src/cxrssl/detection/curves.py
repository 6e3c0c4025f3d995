"""The training-curve figure both detection engines write (train_curve.png)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from cxrssl.io import atomic_savefig


def plot_train_curve(frame: pd.DataFrame, path: str | Path, loss_keys: Sequence[str], title: str | None = None) -> None:
    """Training losses per iteration (moving mean) and val mAP50 per epoch, side by side.

    ``frame`` is a train_log.csv table: ``iter``, ``epoch``, the loss columns named in
    ``loss_keys`` (those absent are skipped; ``loss``, the total, is drawn thicker) and
    ``val_mAP50`` (filled on the last iteration of each epoch).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    if len(frame):
        window = max(1, len(frame) // 50)  # smooth over ~2 % of the run; raw losses are noisy
        for key in (k for k in loss_keys if k in frame):
            ax_loss.plot(frame["iter"], frame[key].rolling(window, min_periods=1).mean(), label=key,
                         lw=2 if key == "loss" else 1)
        ax_loss.legend(fontsize=8)
    if "val_mAP50" in frame:
        per_epoch = frame.dropna(subset=["val_mAP50"])
        ax_map.plot(per_epoch["epoch"], per_epoch["val_mAP50"], marker="o")
        if len(per_epoch):
            best = per_epoch.loc[per_epoch["val_mAP50"].idxmax()]
            ax_map.axvline(best["epoch"], color="grey", ls="--", lw=1)
            ax_map.set_title(f"best val mAP50 {best['val_mAP50']:.3f} (epoch {int(best['epoch'])})", fontsize=10)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss (moving mean)")
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("val mAP50 (COCO)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
