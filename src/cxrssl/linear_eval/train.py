"""Training a linear head (or fine-tuning) on a label fraction, choosing the epoch on validation.

Test images are scored exactly once, with the weights of the epoch that had the best validation
mean AUC; nothing about the test split reaches the training loop or the selection.

Backbones come from the registry (:mod:`cxrssl.models.backbones`): a pretrained checkpoint's
``backbone.json`` says which arch to build, others use ``arch``. A ViT's features are the mean of
its patch tokens (``vit_pool: mean``, the default: GMML trains the patch tokens only, its CLS
output never meets the loss) or its CLS token. Fine-tuning (``mode: finetune``) trains everything:
with SGD as the paper's protocol, or AdamW (no weight decay on biases, norms, position embedding
and CLS token) with, for ViTs, timm's layer-wise learning-rate decay (``layer_decay`` < 1, the
BEiT/MAE recipe). Threads, checkpoint loading and the run fingerprint are :mod:`cxrssl.runtime`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cxrssl import tracking
from cxrssl.classes import NIH_FINDINGS
from cxrssl.io import atomic_write_csv, atomic_write_json
from cxrssl.linear_eval.data import CacheImages, image_transform, load_nih_index, open_cache
from cxrssl.linear_eval.metrics import defined_findings, mean_auc, per_finding_auc
from cxrssl.linear_eval.splits import assign_splits, label_subset
from cxrssl.models.backbones import (PooledFeatures, build_backbone, checkpoint_arch, feature_extractor, get_spec)
from cxrssl.runtime import configure_threads, fingerprint
from cxrssl.utils import pick_device, progress_disabled, seed_everything

log = logging.getLogger(__name__)

MODES = ("linear", "finetune")
#: Settings read from the ``linear_eval`` config section (inits and fractions pick the runs).
SETTINGS = ("mode", "epochs", "batch_size", "lr", "momentum", "weight_decay", "val_fraction",
            "image_size", "workers", "augment", "vit_pool", "optimizer", "layer_decay", "recalibrate_bn")
OPTIMIZERS = ("sgd", "adamw")
#: Called after every epoch with ``(epoch, predict)``; ``predict(split)`` returns
#: ``(labels, scores)`` of the current weights. For monitoring only: it cannot affect selection.
EpochCallback = Callable[[int, Callable[[str], tuple[np.ndarray, np.ndarray]]], None]


def select_epoch(val_mean_aucs) -> int:
    """1-based epoch with the highest validation mean AUC; the earliest on ties, NaN ignored."""
    values = np.asarray(list(val_mean_aucs), dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        raise ValueError("no epoch has a defined validation mean AUC")
    return int(np.nanargmax(values)) + 1


class Classifier(nn.Module):
    """Backbone features -> Linear(feature_dim, 14). ``frozen``: backbone fixed, BN in eval mode."""

    def __init__(self, backbone: nn.Module, feature_dim: int, n_outputs: int, frozen: bool):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, n_outputs)
        self.frozen = frozen
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # running BN statistics must not drift in linear evaluation
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)


@torch.no_grad()
@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``loader``'s images (no labels,
    no weight changes: the average of the batch statistics of one pass in training mode). Returns how many
    BatchNorm layers were recalibrated (0 for a ViT, whose LayerNorms keep no statistics)."""
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training = backbone.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every image counts the same
    backbone.train()
    for x, _ in loader:
        backbone(x.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    backbone.train(was_training)
    return len(norms)


def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> torch.Tensor:
    """Backbone features (eval mode) of every image of ``loader``, in order, on ``device``."""
    backbone.eval()
    chunks = [backbone(x.to(device, non_blocking=True))
              for x, _ in tqdm(loader, desc="features", unit="batch", disable=progress_disabled())]
    return torch.cat(chunks).float()


def _loader(dataset, batch_size: int, workers: int, shuffle: bool = False, generator=None,
            drop_last: bool = False, device: torch.device | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=workers, drop_last=drop_last, persistent_workers=False,
                      pin_memory=device is not None and device.type == "cuda")


def _no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in skip


def param_groups(model: Classifier, net: nn.Module, settings: dict) -> list[dict]:
    """Parameter groups of the trainable ``net`` (the head, or the whole ``model`` when fine-tuning).

    SGD without layer decay: one group (the paper's protocol). AdamW: weights decayed, 1-D
    parameters and a ViT's position embedding / CLS token not. A fine-tuned ViT with
    ``layer_decay`` < 1: timm's ``param_groups_layer_decay`` for the encoder plus the head at the
    full rate. Each group's ``lr`` is the base rate times its scale.
    """
    lr, wd = settings["lr"], settings["weight_decay"]
    encoder = model.backbone.encoder if isinstance(model.backbone, PooledFeatures) else None
    skip = set(encoder.no_weight_decay()) if encoder is not None else set()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if net is model and encoder is not None and settings["layer_decay"] < 1:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(encoder, wd, no_weight_decay_list=sorted(skip),
                                          layer_decay=settings["layer_decay"])
        head = [(n, p) for n, p in model.head.named_parameters()]
        groups += [dict(params=[p for n, p in head if p.ndim > 1], weight_decay=wd),
                   dict(params=[p for n, p in head if p.ndim <= 1], weight_decay=0.0)]
    elif settings["optimizer"] == "adamw":
        groups = [dict(params=[p for n, p in named if not _no_decay(n, p, skip)], weight_decay=wd),
                  dict(params=[p for n, p in named if _no_decay(n, p, skip)], weight_decay=0.0)]
    else:
        groups = [dict(params=[p for _, p in named], weight_decay=wd)]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    return groups


def make_optimizer(model: Classifier, net: nn.Module, settings: dict) -> torch.optim.Optimizer:
    if settings["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {settings['optimizer']!r}")
    groups = param_groups(model, net, settings)
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=settings["lr"])
    return torch.optim.SGD(groups, lr=settings["lr"], momentum=settings["momentum"])


def _json_number(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def run_linear_eval(*, index_path: str | Path, cache_path: str | Path, init: str, fraction: float,
                    out_dir: str | Path, seed: int, settings: dict, arch: str | None = None,
                    imagenet_weights: str | Path | None = None, init_name: str | None = None,
                    device: str | torch.device | None = None, threads: int | None = None,
                    epoch_callback: EpochCallback | None = None) -> dict:
    """One run: writes ``split.csv``, ``history.csv`` and ``metrics.json`` into ``out_dir``.

    ``init`` is what :func:`cxrssl.models.backbones.build_backbone` takes (random, imagenet or a
    checkpoint path); ``init_name`` is the name recorded in the metrics (defaults to ``init``).
    ``arch`` (default ``settings["arch"]``) is built unless the checkpoint's sidecar names its
    own. ``settings`` holds the ``linear_eval`` section's keys listed in :data:`SETTINGS`.
    ``threads``: torch CPU threads (:func:`cxrssl.runtime.configure_threads`).
    """
    missing = [k for k in SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"linear_eval settings lack {missing}")
    mode = settings["mode"]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dir = Path(out_dir)
    configure_threads(threads)
    device = torch.device(device) if device is not None else pick_device()
    arch = checkpoint_arch(init, arch or settings["arch"])
    seed_everything(seed)
    names = list(NIH_FINDINGS)

    # --- data: splits by patient, nested label subset of the training patients ------------------
    cache = open_cache(cache_path)
    index = load_nih_index(index_path, n_cache_rows=len(cache))
    index["split"] = assign_splits(index, settings["val_fraction"], seed)
    train_patients = index.loc[index["split"] == "train", "patient_id"].unique()
    subset = label_subset(train_patients, fraction, seed)
    index["labelled"] = (index["split"] == "train") & index["patient_id"].isin(subset)
    atomic_write_csv(index[["image_index", "patient_id", "split", "labelled"]], out_dir / "split.csv")
    parts = {
        "train": index[index["labelled"]],
        "val": index[index["split"] == "val"],
        "test": index[index["split"] == "test"],
    }
    for split, frame in parts.items():
        if frame.empty:
            raise ValueError(f"{index_path}: the {split} split is empty")
        log.info("%s: %d images of %d patients", split, len(frame), frame["patient_id"].nunique())
    labels = {s: f[names].to_numpy(np.float32) for s, f in parts.items()}
    for split in ("val", "test"):
        undefined = [n for n, ok in zip(names, defined_findings(labels[split])) if not ok]
        if undefined:
            log.warning("%s split: %s have only one class; their AUC is undefined and left out of the "
                        "mean", split, ", ".join(undefined))
    if not defined_findings(labels["val"]).any():
        raise ValueError(
            f"{index_path}: no finding has both positive and negative images in the validation split "
            f"({len(parts['val'])} images), so no epoch can be selected; raise linear_eval.val_fraction"
        )

    # --- model ------------------------------------------------------------------------------------
    encoder = build_backbone(arch, init, imagenet_weights, image_size=settings["image_size"])
    backbone = feature_extractor(encoder, settings["vit_pool"])
    model = Classifier(backbone, get_spec(arch).feature_dim, len(names), frozen=mode == "linear").to(device)
    generator = torch.Generator().manual_seed(seed)
    batch_size, workers = settings["batch_size"], settings["workers"]
    eval_tf = image_transform(settings["image_size"], augment=False)
    datasets = {s: CacheImages(cache_path, parts[s]["cache_row"].to_numpy(), labels[s], eval_tf) for s in parts}
    precompute = mode == "linear" and not settings["augment"]
    if settings["recalibrate_bn"]:
        # Every training-split image (labelled or not; never val/test): the statistics a frozen
        # backbone normalises with become those of this data, for every init alike.
        unlabelled = index[index["split"] == "train"]
        calibration = CacheImages(cache_path, unlabelled["cache_row"].to_numpy(),
                                  np.zeros((len(unlabelled), len(names)), np.float32), eval_tf)
        single = len(calibration) % batch_size == 1 and len(calibration) > 1  # BatchNorm needs 2 images
        n_norms = recalibrate_batchnorm(model.backbone, _loader(calibration, batch_size, workers, drop_last=single,
                                                                device=device), device)
        log.info("recalibrated %d BatchNorm layers on %d training images", n_norms, len(unlabelled))

    if precompute:
        # Frozen backbone, no augmentation: every epoch would see the same features, so compute
        # them once and train only the head on them.
        features = {s: extract_features(model.backbone, _loader(d, batch_size, workers, device=device), device)
                    for s, d in datasets.items()}
        targets = {s: torch.as_tensor(labels[s], device=device) for s in parts}
        net: nn.Module = model.head

        def train_batches():
            order = torch.randperm(len(targets["train"]), generator=generator).to(device)
            for chunk in order.split(batch_size):
                yield features["train"][chunk], targets["train"][chunk]

        n_steps = math.ceil(len(targets["train"]) / batch_size)

        @torch.no_grad()
        def predict(split: str) -> tuple[np.ndarray, np.ndarray]:
            net.eval()
            scores = torch.cat([net(x) for x in features[split].split(batch_size)])
            return labels[split], scores.cpu().numpy()
    else:
        train_set = CacheImages(cache_path, parts["train"]["cache_row"].to_numpy(), labels["train"],
                                image_transform(settings["image_size"], augment=settings["augment"]))
        # A last batch of one image breaks BatchNorm in training mode (fine-tuning): drop it.
        drop_last = mode == "finetune" and len(train_set) % batch_size == 1 and len(train_set) > 1
        train_loader = _loader(train_set, batch_size, workers, shuffle=True, generator=generator,
                               drop_last=drop_last, device=device)
        eval_loaders = {s: _loader(datasets[s], batch_size, workers, device=device) for s in ("val", "test")}
        net = model
        n_steps = len(train_loader)

        def train_batches():
            for x, y in train_loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        @torch.no_grad()
        def predict(split: str) -> tuple[np.ndarray, np.ndarray]:
            net.eval()
            scores = torch.cat([net(x.to(device, non_blocking=True)) for x, _ in eval_loaders[split]])
            return labels[split], scores.cpu().numpy()

    optimizer = make_optimizer(model, net, settings)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings["epochs"] * n_steps)
    criterion = nn.BCEWithLogitsLoss()

    # --- training; the snapshot follows the validation mean AUC only -----------------------------
    history: list[dict] = []
    best_state: dict[str, torch.Tensor] | None = None
    tracker = tracking.start(out_dir, f"linear_eval/{init_name or init}_frac{fraction:g}",
                             {"init": init_name or init, "fraction": fraction, "arch": arch, "seed": seed,
                              "linear_eval": settings})
    log.info("training %s %s (init %s, fraction %g): %d epochs x %d steps on %s", arch, mode,
             init_name or init, fraction, settings["epochs"], n_steps, device)
    for epoch in range(1, settings["epochs"] + 1):
        net.train()
        losses = []
        for x, y in tqdm(train_batches(), total=n_steps, desc=f"epoch {epoch}", unit="batch",
                         disable=progress_disabled(), leave=False):
            loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            tracker.log_step({"loss": losses[-1]}, (epoch - 1) * n_steps + len(losses))
        train_loss = float(np.mean(losses))
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at epoch {epoch}; lower linear_eval.lr")
        val_true, val_scores = predict("val")
        val_loss = float(criterion(torch.from_numpy(val_scores), torch.from_numpy(val_true)))
        val_mean = mean_auc(per_finding_auc(val_true, val_scores, names, "val", warn=False))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_mean_auc": val_mean,
                        "lr": max(g["lr"] for g in optimizer.param_groups)})
        tracker.log_epoch({k: v for k, v in history[-1].items() if k != "epoch"}, epoch)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val mean AUC %.4f",
                 epoch, train_loss, val_loss, val_mean)
        if select_epoch(h["val_mean_auc"] for h in history) == epoch:
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if epoch_callback is not None:
            epoch_callback(epoch, predict)

    selected = select_epoch(h["val_mean_auc"] for h in history)
    net.load_state_dict(best_state)
    val_true, val_scores = predict("val")
    val_auc = per_finding_auc(val_true, val_scores, names, "val", warn=False)
    test_true, test_scores = predict("test")
    test_auc = per_finding_auc(test_true, test_scores, names, "test", warn=False)
    log.info("selected epoch %d (val mean AUC %.4f): test mean AUC %.4f",
             selected, mean_auc(val_auc), mean_auc(test_auc))

    metrics = {
        "init": init_name or init,
        "fraction": fraction,
        "arch": arch,
        "mode": mode,
        "fingerprint": fingerprint({"settings": {k: settings[k] for k in SETTINGS if k != "workers"}, "arch": arch,
                                    "fraction": fraction, "seed": seed},
                                   {"init": init, "imagenet_weights": imagenet_weights if init == "imagenet" else None,
                                    "index": index_path}),
        "seed": seed,
        "n_train_patients": int(parts["train"]["patient_id"].nunique()),
        "n_train_images": len(parts["train"]),
        "n_val_patients": int(parts["val"]["patient_id"].nunique()),
        "n_val_images": len(parts["val"]),
        "n_test_patients": int(parts["test"]["patient_id"].nunique()),
        "n_test_images": len(parts["test"]),
        "epochs": settings["epochs"],
        "selected_epoch": selected,
        "val_mean_auc": _json_number(mean_auc(val_auc)),
        "test_mean_auc": _json_number(mean_auc(test_auc)),
        "val_auc": {k: _json_number(v) for k, v in val_auc.items()},
        "test_auc": {k: _json_number(v) for k, v in test_auc.items()},
    }
    predictions = parts["test"][["image_index", "patient_id"]].reset_index(drop=True)
    predictions = pd.concat([predictions, pd.DataFrame(test_true.astype(np.int8), columns=[f"true_{n}" for n in names]),
                             pd.DataFrame(test_scores, columns=[f"score_{n}" for n in names])], axis=1)
    atomic_write_csv(predictions, out_dir / "predictions_test.csv")
    atomic_write_csv(pd.DataFrame(history), out_dir / "history.csv")
    atomic_write_json(metrics, out_dir / "metrics.json")
    tracker.log_epoch({k: metrics[k] for k in ("selected_epoch", "val_mean_auc", "test_mean_auc")},
                      settings["epochs"], prefix="final/")
    tracker.close()
    return metrics
