"""Train one lung segmenter (one init) on the patient-disjoint split and score it on the test split.

Images are resized to ``image_size`` squares (grey as 3 equal channels, ImageNet normalisation),
masks with nearest neighbour. Loss: binary cross-entropy + soft Dice. AdamW. The epoch with the
best validation Dice is kept. Test predictions are upsampled to each image's original size and
thresholded at ``threshold``; Dice and IoU are computed per image at that size, and their means get
percentile bootstrap intervals over test images.

Outputs in ``out_dir``: ``metrics.json`` (init, arch, Dice and IoU with CIs, counts, settings),
``per_image.csv``, ``train_log.csv`` and ``examples.png`` (test images, ground truth in green,
prediction in red).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from cxrssl.io import atomic_savefig, atomic_write_csv, atomic_write_json
from cxrssl.segmentation.data import read_image, read_mask
from cxrssl.segmentation.model import build_segmenter
from cxrssl.utils import seed_everything

log = logging.getLogger(__name__)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice ``2|P∩T| / (|P|+|T|)`` and IoU ``|P∩T| / |P∪T|`` of two boolean masks (both 1 when both
    are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = float(np.logical_or(pred, truth).sum())
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / union


def bootstrap_mean(values, n_resamples: int, seed: int, level: float = 0.95) -> tuple[float, list[float | None]]:
    """Mean and percentile bootstrap interval over the items (``[None, None]`` for < 2 items)."""
    values = np.asarray(values, float)
    mean = float(values.mean()) if values.size else float("nan")
    if values.size < 2 or n_resamples <= 0:
        return mean, [None, None]
    draws = np.random.default_rng(seed).integers(0, values.size, size=(n_resamples, values.size))
    means = values[draws].mean(axis=1)
    alpha = (1 - level) / 2
    return mean, [float(v) for v in np.percentile(means, [100 * alpha, 100 * (1 - alpha)])]


def load_split(frame: pd.DataFrame, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (N, 3, size, size) images and (N, size, size) float masks of ``frame``'s rows."""
    images, masks = [], []
    for row in frame.itertuples():
        img = Image.fromarray(read_image(row.image)).resize((size, size), Image.Resampling.BILINEAR)
        t = torch.from_numpy(np.asarray(img, np.float32) / 255.0).expand(3, -1, -1)
        images.append((t - MEAN) / STD)
        mask = Image.fromarray(read_mask(row.masks).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        masks.append(torch.from_numpy(np.asarray(mask, np.float32)))
    return torch.stack(images), torch.stack(masks)


def loss_fn(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * masks).sum(dim=(1, 2))
    soft_dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2)) + masks.sum(dim=(1, 2)) + 1)
    return F.binary_cross_entropy_with_logits(logits, masks) + soft_dice.mean()


@torch.no_grad()
def _predict(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])


def _val_dice(logits: torch.Tensor, masks: torch.Tensor, threshold: float) -> float:
    pred = (torch.sigmoid(logits) >= threshold).numpy()
    return float(np.mean([dice_iou(p, m)[0] for p, m in zip(pred, masks.numpy() > 0.5)]))


def score_test(model, frame: pd.DataFrame, size: int, threshold: float, batch_size: int):
    """Per-image Dice / IoU at the original size, and the probability maps (for the figure)."""
    images, _ = load_split(frame, size)
    logits = _predict(model, images, batch_size)
    rows, maps = [], []
    for row, logit in zip(frame.itertuples(), logits):
        truth = read_mask(row.masks)
        prob = torch.sigmoid(F.interpolate(logit[None, None], size=truth.shape, mode="bilinear",
                                           align_corners=False))[0, 0].numpy()
        dice, iou = dice_iou(prob >= threshold, truth)
        rows.append({"source": row.source, "name": row.name, "patient": row.patient, "dice": dice, "iou": iou})
        maps.append(prob)
    return pd.DataFrame(rows), maps


def plot_examples(frame: pd.DataFrame, maps: list[np.ndarray], threshold: float, path: Path, title: str,
                  n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(frame))
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3 * max(n, 1), 3.2), squeeze=False)
    for ax, row, prob in zip(axes[0], frame.head(n).itertuples(), maps):
        ax.imshow(read_image(row.image), cmap="gray")
        ax.contour(read_mask(row.masks), levels=[0.5], colors="lime", linewidths=1)
        ax.contour(prob >= threshold, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(row.name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def train_segmentation(frame: pd.DataFrame, out_dir: str | Path, *, init: str, init_name: str | None,
                       settings: dict, seed: int, imagenet_weights: str | Path | None = None) -> dict:
    """One run (see the module docstring); ``frame`` has a ``split`` column."""
    s = settings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_everything(seed)
    parts = {k: frame[frame["split"] == k].reset_index(drop=True) for k in ("train", "val", "test")}
    for name, part in parts.items():
        if part.empty:
            raise ValueError(f"segmentation: the {name} split is empty")
    size = int(s["image_size"])
    if size % 32 or int(s["width"]) % 8:
        raise ValueError(f"segmentation.image_size ({size}) must be a multiple of 32 and segmentation.width "
                         f"({s['width']}) a multiple of 8")
    model, arch = build_segmenter(s["arch"], init, size, int(s["width"]), imagenet_weights)
    train_x, train_y = load_split(parts["train"], size)
    val_x, val_y = load_split(parts["val"], size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    history, best, best_state = [], -1.0, None
    for epoch in range(1, int(s["epochs"]) + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        losses = []
        for i in range(0, len(order), int(s["batch_size"])):
            idx = order[i: i + int(s["batch_size"])]
            x, y = train_x[idx], train_y[idx]
            if s["hflip"]:  # lungs mirror into lungs
                flip = torch.rand(len(idx), generator=generator) < 0.5
                x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip[:, None, None], y.flip(-1), y)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        val = _val_dice(_predict(model, val_x, int(s["batch_size"])), val_y, s["threshold"])
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_dice": val})
        if val > best:
            best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
        log.info("segmentation %s epoch %d: loss %.4f, val Dice %.4f", init_name or init, epoch, history[-1]["loss"], val)
    model.load_state_dict(best_state)
    per_image, maps = score_test(model, parts["test"], size, s["threshold"], int(s["batch_size"]))
    dice, dice_ci = bootstrap_mean(per_image["dice"], int(s["n_bootstrap"]), seed)
    iou, iou_ci = bootstrap_mean(per_image["iou"], int(s["n_bootstrap"]), seed)
    best_epoch = int(max(history, key=lambda r: r["val_dice"])["epoch"])
    metrics = {"init": str(init_name or init), "arch": arch, "dice": dice, "dice_ci": dice_ci, "iou": iou,
               "iou_ci": iou_ci, "n_train": len(parts["train"]), "n_val": len(parts["val"]),
               "n_test": len(parts["test"]), "best_epoch": best_epoch, "best_val_dice": best,
               "seconds": time.perf_counter() - start, "seed": int(seed), "settings": dict(s)}
    atomic_write_csv(per_image, out_dir / "per_image.csv")
    atomic_write_csv(pd.DataFrame(history), out_dir / "train_log.csv")
    plot_examples(parts["test"], maps, s["threshold"], out_dir / "examples.png",
                  f"{metrics['init']} ({arch}): test Dice {dice:.3f}")
    atomic_write_json(metrics, out_dir / "metrics.json")
    log.info("segmentation %s (%s): test Dice %.4f [%s], IoU %.4f, %.1f s", metrics["init"], arch, dice,
             dice_ci, iou, metrics["seconds"])
    return metrics
