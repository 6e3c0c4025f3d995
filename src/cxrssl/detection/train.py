"""Fine-tune Faster R-CNN on the VinDr COCO splits, select by val mAP50, predict the test split.

This module is the ``torchvision`` engine of :mod:`cxrssl.detection.engines` (``ENGINE``).

Outputs in ``out_dir``:

* ``best.pth`` — ``{"meta", "model"}``: the weights of the epoch with the best val mAP50; the meta
  (plain JSON data, :func:`cxrssl.detection.engines.make_meta`) holds ``epoch`` and ``val_mAP50``;
  :func:`cxrssl.detection.engines.load_detector` reads it.
* ``last.pth`` — the resume state, written atomically after every epoch: model, optimizer,
  scheduler, ``epoch`` (epochs completed), best metric and the best weights, RNG states of every rank, the log history,
  build meta and a fingerprint of the settings and inputs. It is deliberately *not* a Snakemake
  output: Snakemake deletes a failed job's outputs, and this file must survive for the rerun to
  resume. A run whose fingerprint differs (changed setting, split or initial weights) starts over.
  A finished run with the same fingerprint rebuilds its outputs from it without training.
* ``train_log.csv`` (one row per iteration; ``val_mAP50`` on each epoch's last row; epochs and
  iterations counted from 1 as in the mmdet engine's log),
  ``train_curve.png``, ``predictions_test.json`` (COCO results in the converted pixels of
  ``coco_test.json``, score >= ``score_thr``, at most 100 per image).

With ``amp`` on CUDA the backbone and FPN run under bf16 autocast, the RPN and RoI heads in fp32
(:func:`cxrssl.detection.model.set_precision`), in training and prediction alike; bf16 needs no
loss scaling, so there is no GradScaler state to keep. Single process or
torchrun (DistributedSampler + DDP, ``batch_size`` is the global batch split across ranks).
Resuming reproduces the uninterrupted run exactly on CPU (same weights); on GPU up to the
nondeterminism of CUDA kernels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from cxrssl import tracking
from cxrssl.detection.curves import plot_train_curve
from cxrssl.detection.dataset import CocoDetection, collate, input_format
from cxrssl.detection.engine import LOSS_KEYS, coco_map50, predict_coco, train_one_epoch
from cxrssl.detection.engines import make_meta
from cxrssl.detection.model import (NUM_CLASSES, Detector, autocast_device_for, build_detector, build_meta,
                                    compile_backbone, detector_from_meta, is_vit, resolve_arch, set_precision)
from cxrssl.detection.schedule import WarmupCosine
from cxrssl.io import atomic_torch_save, atomic_write_csv, atomic_write_json
from cxrssl.runtime import (cleanup_distributed, gather_objects, init_distributed, load_checkpoint, rng_state,
                             set_rng_state, sha256_file, sync_batchnorm)
from cxrssl.utils import seed_everything

log = logging.getLogger(__name__)

LOG_COLUMNS = ["epoch", "iter", "loss", *LOSS_KEYS, "lr", "val_mAP50"]
#: Settings that cannot change the result (excluded from the resume fingerprint).
_NOT_FINGERPRINTED = ("workers",)


def fingerprint(settings: dict, init: str, res: int, seed: int, world_size: int, jsons: list[Path],
                imagenet_weights: str | Path | None) -> str:
    """Hash of everything that determines the trained weights (settings, data, initial weights)."""
    parts: dict[str, Any] = {
        "settings": {k: v for k, v in sorted(settings.items()) if k not in _NOT_FINGERPRINTED},
        "init": str(init), "res": int(res), "seed": int(seed), "world_size": int(world_size),
        "data": [sha256_file(p) for p in jsons],
    }
    for name, value in (("init_file", init), ("imagenet_file", imagenet_weights if init == "imagenet" else None)):
        if value and Path(value).is_file():
            parts[name] = sha256_file(value)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _shard(dataset, rank: int, world_size: int):
    return dataset if world_size == 1 else Subset(dataset, list(range(rank, len(dataset), world_size)))


def _predict_all(model, dataset, batch_size, workers, device, score_thr, rank, world_size, desc):
    """Predict ``dataset`` sharded over ranks; every rank gets all results, sorted."""
    loader = DataLoader(_shard(dataset, rank, world_size), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
    mine = predict_coco(model, loader, device, score_thr=score_thr, desc=desc, show_progress=rank == 0)
    parts = gather_objects(mine, world_size)
    results = [r for part in parts for r in part]
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


def write_log_and_curve(history: list[dict], out_dir: Path) -> None:
    frame = pd.DataFrame(history, columns=LOG_COLUMNS)
    atomic_write_csv(frame, out_dir / "train_log.csv")
    plot_train_curve(frame, out_dir / "train_curve.png", ("loss", *LOSS_KEYS))


@dataclass
class TrainingPlan:
    """Everything one torchvision training run is made of, built from the settings (and read back by
    the engine-parity test, so each setting is seen where it acts)."""

    model: Detector
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: CocoDetection
    sampler: DistributedSampler
    loader: DataLoader
    epochs: int
    grad_clip: float


def make_optimizer(params, s: dict, vit: bool) -> tuple[torch.optim.Optimizer, float, float]:
    """(optimizer, peak lr, final lr) of a run: SGD with ``lr``/``momentum``/``weight_decay`` (the
    paper's mmdet recipe); a ViT backbone's detector with ``vit_optimizer: adamw`` takes AdamW at
    ``vit_lr`` and ``vit_weight_decay`` instead (ViTDet's recipe; SGD barely moves a ViT in a short
    run), its cosine ending at the same fraction ``min_lr / lr`` of its peak."""
    if vit and s["vit_optimizer"] == "adamw":
        lr = float(s["vit_lr"])
        return (torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=s["vit_weight_decay"]),
                lr, float(s["min_lr"]) * lr / float(s["lr"]))
    return torch.optim.SGD(params, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"]), s["lr"], s["min_lr"]


def build_plan(settings: dict, train_json: str | Path, init: str, res: int, seed: int,
               device: torch.device | None = None, world: int = 1, rank: int = 0,
               imagenet_weights: str | Path | None = None, device_type: str | None = None) -> TrainingPlan:
    """Model (on ``device``), optimizer, per-iteration schedule and training loader of one run.

    ``device_type`` is what the precision policy sees (default ``device.type``): bf16 autocast of the
    backbone on CUDA when ``amp`` (:func:`cxrssl.detection.model.autocast_device_for`).
    """
    s = settings
    device = device if device is not None else torch.device("cpu")
    if s["batch_size"] % world:
        raise ValueError(f"detection.batch_size {s['batch_size']} is not divisible by {world} processes")
    train_set = CocoDetection(train_json, hflip_prob=s["hflip"], seed=seed, train_on_empty=s["train_on_empty"])
    if len(train_set) == 0:
        raise ValueError(f"{train_json}: no training images (train_on_empty={s['train_on_empty']})")
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(train_set, batch_size=s["batch_size"] // world, sampler=sampler, num_workers=s["workers"],
                        collate_fn=collate, pin_memory=device.type == "cuda", persistent_workers=False)
    model = build_detector(s["arch"], init, num_classes=NUM_CLASSES, res=res, frozen_stages=s["frozen_stages"],
                           norm_eval=s["norm_eval"], random_init_norm=s["random_init_norm"],
                           imagenet_weights=imagenet_weights, score_thr=s["score_thr"],
                           rpn_proposals=s["rpn_proposals"], rois_per_image=s["rois_per_image"],
                           fpn_channels=s["fpn_channels"])
    autocast = autocast_device_for(device_type or device.type, bool(s["amp"]))
    set_precision(model, autocast)
    model.to(device)
    if autocast:
        model.to(memory_format=torch.channels_last)
    if s.get("compile", False):
        compile_backbone(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, lr, min_lr = make_optimizer(params, s, is_vit(resolve_arch(s["arch"], init)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(lr, min_lr, s["warmup_iters"], s["epochs"], len(loader)))
    return TrainingPlan(model, optimizer, scheduler, train_set, sampler, loader, int(s["epochs"]),
                        float(s.get("grad_clip", 0.0) or 0.0))


def train_detector(train_json: str | Path, val_json: str | Path, test_json: str | Path, out_dir: str | Path,
                   init: str, res: int, seed: int, settings: dict, imagenet_weights: str | Path | None = None,
                   device: str | None = None, init_name: str | None = None) -> dict:
    """Train one detection run (see the module docstring); returns a small summary dict.

    ``settings`` holds the ``detection`` config section (the training settings; run-selecting ones
    are ignored); ``init`` is random, imagenet or a backbone checkpoint path; ``init_name``
    (default ``init``) is recorded in the checkpoints' meta.
    """
    out_dir = Path(out_dir)
    info = init_distributed(device)
    try:
        return _train(Path(train_json), Path(val_json), Path(test_json), out_dir, init, int(res), int(seed),
                      dict(settings), imagenet_weights, init_name or str(init), info)
    finally:
        cleanup_distributed()


def _train(train_json, val_json, test_json, out_dir, init, res, seed, s, imagenet_weights, init_name, info) -> dict:
    dev, rank, world = info.device, info.rank, info.world_size
    if not info.is_main:  # one voice per run in the log; other ranks only warn
        logging.getLogger("cxrssl").setLevel(logging.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = out_dir / "last.pth", out_dir / "best.pth"
    seed_everything(seed)

    plan = build_plan(s, train_json, init, res, seed, dev, world, rank, imagenet_weights)
    model, optimizer, scheduler = plan.model, plan.optimizer, plan.scheduler
    train_set, sampler, train_loader = plan.train_set, plan.sampler, plan.loader
    per_rank = s["batch_size"] // world
    val_set = CocoDetection(val_json)
    test_set = CocoDetection(test_json)
    if len(val_set) == 0:
        raise ValueError(f"{val_json}: empty validation split")
    input_size, bit_depth = input_format(train_json)
    arch = resolve_arch(s["arch"], init)  # the init's own arch (backbone.json), else detection.arch
    arch_meta = build_meta(arch, init, NUM_CLASSES, res, s["frozen_stages"], s["norm_eval"],
                           s["random_init_norm"], s["score_thr"], s["rpn_proposals"], s["rois_per_image"],
                           s["fpn_channels"])
    meta = make_meta("torchvision", arch=arch, init=init, init_name=init_name, res=res, seed=seed,
                     settings=s, input_size=input_size, input_bit_depth=bit_depth,
                     **{k: v for k, v in arch_meta.items() if k not in ("arch", "init", "res", "num_classes", "classes")})

    fp = fingerprint(s, init, res, seed, world, [train_json, val_json], imagenet_weights)
    start_epoch, best_map, best_epoch, best_state, history = 0, -math.inf, 0, None, []
    state = None
    if last_path.is_file():
        state = load_checkpoint(last_path, "detection resume checkpoint (last.pth)")
        if not isinstance(state, dict):
            state = {}
        if state.get("fingerprint") != fp:
            log.warning("%s was made with other settings, data or initial weights: starting over", last_path)
            state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])  # epochs completed
        best_map, best_epoch, best_state = float(state["best_mAP50"]), int(state["best_epoch"]), state["best_model"]
        history = list(state["history"])
        rng = state["rng"]
        if len(rng) != world:
            raise RuntimeError(f"{last_path} holds {len(rng)} ranks' RNG states, this run has {world}")
        set_rng_state(rng[rank])
        log.info("resuming from %s after epoch %d (best val mAP50 %.4f at epoch %d)", last_path, start_epoch,
                 best_map, best_epoch)
        del state

    tracker = tracking.start(out_dir, f"detection/torchvision_{init_name}_{res}px_seed{seed}",
                             {"engine": "torchvision", "init": init_name, "res": res, "seed": seed, "detection": s},
                             enabled=info.is_main, resume=start_epoch > 0)
    net = model
    if world > 1:
        if meta["norm"] == "batchnorm":
            net = sync_batchnorm(net, dev)
        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    log.info("training %s init=%s res=%d: %d train / %d val / %d test images (train_on_empty %s), "
             "%d iterations/epoch, %d epochs, batch %d (%d ranks), device %s, bf16 backbone %s", arch, init,
             res, len(train_set), len(val_set), len(test_set), s["train_on_empty"], len(train_loader), s["epochs"],
             s["batch_size"], world, dev, model.backbone.autocast_device is not None)
    for index in range(start_epoch, s["epochs"]):
        epoch = index + 1  # 1-based in logs and checkpoints, as mmdet's
        t0 = time.time()
        sampler.set_epoch(index)
        train_set.set_epoch(index)
        rows = train_one_epoch(net, train_loader, optimizer, scheduler, dev, epoch,
                               show_progress=info.is_main, grad_clip=plan.grad_clip)
        results = _predict_all(model, val_set, per_rank, s["workers"], dev, 0.0, rank, world, "val")
        val_map = coco_map50(val_set.coco, results)
        for row in rows:
            row["val_mAP50"] = float("nan")
        rows[-1]["val_mAP50"] = val_map
        history.extend(rows)
        tracker.log_rows(rows, "iter", epoch_keys=("val_mAP50",))
        if val_map > best_map:
            best_map, best_epoch = val_map, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        rng = gather_objects(rng_state(), world)
        if info.is_main:
            if best_epoch == epoch:
                atomic_torch_save({"model": best_state, "meta": dict(meta, epoch=epoch, val_mAP50=val_map)},
                                  best_path)
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_mAP50": best_map,
                "best_epoch": best_epoch, "best_model": best_state, "history": history, "rng": rng,
                "meta": dict(meta, epoch=epoch, val_mAP50=val_map), "fingerprint": fp, "val_mAP50": val_map,
            }, last_path)
            write_log_and_curve(history, out_dir)
        seconds = time.time() - t0
        log.info("epoch %d/%d: loss %.4f, val mAP50 %.4f (best %.4f at epoch %d), %.0f s, %.1f train images/s",
                 epoch, s["epochs"], float(np.mean([r["loss"] for r in rows])), val_map, best_map,
                 best_epoch, seconds, len(train_set) / max(seconds, 1e-9))

    tracker.close()
    if best_state is None:
        raise RuntimeError(f"{last_path}: finished run holds no best weights")
    if start_epoch >= s["epochs"]:
        log.info("%s is a finished run with the same settings: rebuilding outputs without training", last_path)
    if info.is_main:
        atomic_torch_save({"model": best_state, "meta": dict(meta, epoch=best_epoch, val_mAP50=best_map)}, best_path)
        write_log_and_curve(history, out_dir)
    model.load_state_dict(best_state)
    results = _predict_all(model, test_set, per_rank, s["workers"], dev, s["score_thr"], rank, world, "test")
    if info.is_main:
        atomic_write_json(results, out_dir / "predictions_test.json", indent=None)
    log.info("best val mAP50 %.4f at epoch %d; %d test predictions on %d images", best_map, best_epoch,
             len(results), len(test_set))
    return {"best_epoch": best_epoch, "best_val_mAP50": best_map, "n_test_predictions": len(results)}


class TorchvisionEngine:
    """The torchvision engine behind :mod:`cxrssl.detection.engines`' interface."""

    name = "torchvision"

    @staticmethod
    def train(train_json, val_json, test_json, out_dir, *, init, res, seed, settings, imagenet_weights=None,
              device=None, init_name=None) -> dict:
        return train_detector(train_json, val_json, test_json, out_dir, init=init, res=res, seed=seed,
                              settings=settings, imagenet_weights=imagenet_weights, device=device,
                              init_name=init_name)

    @staticmethod
    def build_from_meta(meta: dict, state_dict: dict, score_thr: float | None = None) -> Detector:
        model = detector_from_meta(meta, score_thr)
        model.load_state_dict(state_dict)
        return model


ENGINE = TorchvisionEngine()
