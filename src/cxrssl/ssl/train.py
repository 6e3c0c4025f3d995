"""The Barlow Twins training loop: LARS, warm-up + cosine LR per step, DDP, AMP, resumable.

Checkpoints (``checkpoint_every`` steps and at the end, written atomically by rank 0) hold the
model, the optimizer, the step, the RNG states of torch/NumPy/Python and a fingerprint of the
settings and data. The sampler position follows from the step (``epoch = step // batches_per_epoch``)
and the views are seeded per (seed, epoch, image), so on CPU a run killed and resumed ends with
the same weights, bit for bit, as an uninterrupted one. A checkpoint from other settings/data,
or from a finished run (a deliberate rerun), is not resumed.

Outputs of :func:`pretrain` in ``out_dir``: ``backbone.pth`` (torchvision ResNet state dict without
``fc``), ``metrics.csv`` (step, epoch, loss, lr_weights, lr_biases, images_per_s; images_per_s =
source images, i.e. view pairs, per second over all ranks) and ``loss.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_savefig, atomic_torch_save, atomic_write_csv
from cxrssl.models.backbone import FEATURE_DIMS, backbone_state_dict, build_resnet
from cxrssl.ssl.augment import TwoViews, normalize_views
from cxrssl.ssl.barlow import BarlowTwins
from cxrssl.ssl.data import NIHPairDataset, PairSampler, open_cache
from cxrssl.runtime import (DistInfo, cleanup_distributed, configure_threads, init_distributed, load_checkpoint,
                             rng_state, set_rng_state, sync_batchnorm)
from cxrssl.ssl.lars import LARS, lars_param_groups, set_learning_rates
from cxrssl.utils import progress_disabled, seed_everything

log = logging.getLogger(__name__)

BACKBONE_NAME, METRICS_NAME, PLOT_NAME, CHECKPOINT_NAME = "backbone.pth", "metrics.csv", "loss.png", "checkpoint.pth"
METRIC_COLUMNS = ["step", "epoch", "loss", "lr_weights", "lr_biases", "images_per_s"]
# Settings that change the trained weights; workers and checkpoint_every do not.
_RESULT_KEYS = ("arch", "init", "projector", "lambd", "batch_size", "epochs", "warmup_epochs", "lr_weights",
                "lr_biases", "weight_decay", "image_size", "augment", "amp")


def data_fingerprint(index_path: str | Path, cache_path: str | Path) -> str:
    """SHA-256 of the index CSV, the cache shape and 64 evenly spaced cache rows (cheap, catches rebuilds)."""
    h = hashlib.sha256(Path(index_path).read_bytes())
    cache = open_cache(cache_path)
    h.update(repr(cache.shape).encode())
    for row in np.linspace(0, len(cache) - 1, num=min(64, len(cache))).astype(int):
        h.update(np.ascontiguousarray(cache[row]).tobytes())
    return h.hexdigest()


def _fingerprint(settings: dict, seed: int, data: str, imagenet_weights) -> str:
    keyed = {k: settings[k] for k in _RESULT_KEYS}
    keyed.update(seed=seed, data=data, imagenet_weights=str(imagenet_weights) if settings["init"] == "imagenet" else None)
    return json.dumps(keyed, sort_keys=True)


def save_loss_plot(metrics: pd.DataFrame, path: str | Path) -> None:
    """Loss (log scale) and learning rates per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(metrics["step"], metrics["loss"], lw=0.8)
    if len(metrics) >= 20:
        window = max(5, len(metrics) // 50)
        ax1.plot(metrics["step"], metrics["loss"].rolling(window, min_periods=1).mean(), lw=1.5,
                 label=f"mean over {window} steps")
        ax1.legend()
    if (metrics["loss"] > 0).all():
        ax1.set_yscale("log")
    ax1.set_ylabel("Barlow Twins loss")
    ax2.plot(metrics["step"], metrics["lr_weights"], label="weights")
    ax2.plot(metrics["step"], metrics["lr_biases"], label="biases / BN")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def pretrain(index: str | Path, cache: str | Path, out_dir: str | Path, settings: dict, seed: int = 0,
             imagenet_weights: str | Path | None = None, device: str | None = None,
             checkpoint: str | Path | None = None, resume: bool = True, stop_after_steps: int | None = None,
             threads: int | None = None) -> Path | None:
    """Barlow Twins pretraining on the ``train_val`` images of the NIH cache; returns backbone.pth.

    ``settings``: the ``pretrain`` config section. ``checkpoint`` defaults to
    ``out_dir/checkpoint.pth``. ``stop_after_steps`` (a test hook) returns None after that many
    steps in this call's run, writing nothing more, as a kill would. Run under torchrun for DDP.
    """
    info = init_distributed(device)
    try:
        return _pretrain(info, Path(index), Path(cache), Path(out_dir), settings, seed, imagenet_weights,
                         Path(checkpoint) if checkpoint else Path(out_dir) / CHECKPOINT_NAME, resume,
                         stop_after_steps, threads)
    finally:
        cleanup_distributed()


def _pretrain(info: DistInfo, index: Path, cache: Path, out_dir: Path, s: dict, seed: int, imagenet_weights,
              ckpt_path: Path, resume: bool, stop_after_steps: int | None, threads: int | None) -> Path | None:
    configure_threads(threads)
    seed_everything(seed)
    dev = info.device
    cuda = dev.type == "cuda"
    amp = bool(s["amp"]) and cuda
    if cuda:
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()

    global_batch = int(s["batch_size"])
    dataset = NIHPairDataset(index, cache, TwoViews(s["augment"], s["image_size"]), seed)
    sampler = PairSampler(len(dataset), global_batch, info.world_size, info.rank, seed)
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=s["workers"],
                        pin_memory=cuda, drop_last=True, persistent_workers=s["workers"] > 0)
    per_epoch = sampler.batches_per_epoch
    total_steps = int(s["epochs"]) * per_epoch
    warmup_steps = int(round(float(s["warmup_epochs"]) * per_epoch))

    backbone = build_resnet(s["arch"], s["init"], imagenet_weights)
    model = BarlowTwins(backbone, FEATURE_DIMS[s["arch"]], s["projector"], s["lambd"], global_batch)
    if info.distributed:
        model = sync_batchnorm(model, dev)
    model = model.to(dev)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(lars_param_groups(model), lr=0.0, weight_decay=s["weight_decay"], momentum=0.9, eta=0.001)

    fingerprint = _fingerprint(s, seed, data_fingerprint(index, cache), imagenet_weights)
    step, rows = 0, []
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, "pretraining resume checkpoint")
        if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng", "metrics"} <= set(state):
            raise BadInputError(str(ckpt_path), "not a cxrssl pretraining checkpoint (needs model, optimizer, "
                                "step, rng and metrics); delete it or pass --no-resume")
        if state.get("fingerprint") != fingerprint:
            log.warning("%s is from other settings or data; training from scratch", ckpt_path)
        elif state["step"] >= total_steps:
            log.info("%s is a finished run; training again from scratch (a deliberate rerun)", ckpt_path)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, rows = int(state["step"]), list(state["metrics"])
            set_rng_state(state["rng"])
            log.info("resumed from %s at step %d/%d (epoch %d)", ckpt_path, step, total_steps, step // per_epoch)
    log.info("%d train_val images, global batch %d on %d process(es) (%s), %d steps/epoch, %d steps",
             len(dataset), global_batch, info.world_size, dev, per_epoch, total_steps)

    def save_checkpoint() -> None:
        if info.is_main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                               "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch,
                               "scaler": None,  # bf16 autocast needs no gradient scaler
                               "rng": rng_state(), "fingerprint": fingerprint, "metrics": rows}, ckpt_path)

    net = DistributedDataParallel(model, device_ids=[dev.index] if cuda else None) if info.distributed else model
    net.train()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=progress_disabled() or not info.is_main)
    steps_this_run = 0
    while step < total_steps:
        epoch = step // per_epoch
        sampler.set_epoch(epoch, step % per_epoch)
        tick = time.perf_counter()
        for y1, y2 in loader:
            lr_w, lr_b = set_learning_rates(optimizer, step, total_steps, warmup_steps, s["lr_weights"],
                                            s["lr_biases"], global_batch)
            x1, x2 = normalize_views(y1, dev, amp), normalize_views(y2, dev, amp)
            with autocast():
                loss = net(x1, x2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step} (epoch {epoch}); "
                                         f"lower lr_weights/lr_biases or check the input images")
            step += 1
            steps_this_run += 1
            now = time.perf_counter()
            rows.append(dict(step=step, epoch=epoch, loss=value, lr_weights=lr_w, lr_biases=lr_b,
                             images_per_s=global_batch / (now - tick)))
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", epoch=epoch)
            if step % 50 == 0 or step == 1:
                log.info("step %d/%d epoch %d loss %.5g lr %.4g img/s %.1f", step, total_steps, epoch, value,
                         lr_w, rows[-1]["images_per_s"])
            if step % s["checkpoint_every"] == 0 or step == total_steps:
                save_checkpoint()
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                bar.close()
                log.warning("stopping after %d steps (test hook) at step %d", steps_this_run, step)
                return None
    bar.close()

    if not info.is_main:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_path = out_dir / BACKBONE_NAME
    atomic_torch_save(backbone_state_dict(model.backbone), backbone_path)
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    atomic_write_csv(metrics, out_dir / METRICS_NAME)
    save_loss_plot(metrics, out_dir / PLOT_NAME)
    log.info("wrote %s (final loss %.5g)", backbone_path, metrics["loss"].iloc[-1])
    return backbone_path
