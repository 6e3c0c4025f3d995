"""Training loop of the multimodal method: AdamW, warm-up + cosine per step, DDP, bf16 on GPU, resumable.

:func:`pretrain_multimodal` reads a pairs table (:mod:`cxrssl.multimodal.reports`, with a
``split`` column) and the images under ``image_root``, trains on the ``train`` split, reports the
``val`` loss per epoch and exports (:meth:`MultimodalMethod.export`). Like the Barlow Twins loop:
checkpoints (rank 0, atomic, every ``checkpoint_every`` steps and at the end) hold the model, the
optimizer, the step, the RNG states and a fingerprint of settings and data; the sampler position
follows from the step and views are seeded per (seed, epoch, pair), so on CPU a run killed and
resumed ends with the same weights, bit for bit, as an uninterrupted one. A checkpoint of other
settings/data, or of a finished run, is not resumed.

Outputs in ``out_dir``: the exports, ``metrics.csv`` (step, epoch, loss, its four parts, lr
factor, pairs_per_s), ``val.csv`` (epoch, val loss) and ``loss.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxrssl import tracking
from cxrssl.errors import BadInputError
from cxrssl.io import atomic_savefig, atomic_write_csv
from cxrssl.multimodal.data import ReportImageDataset, collate_pairs
from cxrssl.multimodal.method import IMAGE_ENCODER, RESULT_KEYS, MultimodalMethod, MultimodalSettings, total_steps
from cxrssl.multimodal.reports import read_pairs
from cxrssl.runtime import (DistInfo, cleanup_distributed, configure_threads, init_distributed, load_checkpoint,
                             rng_state, save_checkpoint, set_rng_state, sha256_file, sync_batchnorm)
from cxrssl.ssl.data import PairSampler
from cxrssl.utils import progress_disabled, seed_everything

log = logging.getLogger(__name__)

CHECKPOINT_NAME, METRICS_NAME, VAL_NAME, PLOT_NAME = "checkpoint.pth", "metrics.csv", "val.csv", "loss.png"
PARTS = ("global_image_to_text", "global_text_to_image", "local_image_to_text", "local_text_to_image")
METRIC_COLUMNS = ["step", "epoch", "loss", *PARTS, "lr_factor", "pairs_per_s"]


def data_fingerprint(pairs_path: Path, image_root: Path, image_paths: list[str]) -> str:
    """SHA-256 of the pairs table and of up to 64 evenly spaced training images (cheap, catches rebuilds)."""
    h = hashlib.sha256(pairs_path.read_bytes())
    for k in np.linspace(0, len(image_paths) - 1, num=min(64, len(image_paths))).astype(int):
        h.update((image_root / image_paths[k]).read_bytes())
    return h.hexdigest()


def save_loss_plot(metrics: pd.DataFrame, val: pd.DataFrame, per_epoch: int, path: Path) -> None:
    """Total and part losses per step, val loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(metrics["step"], metrics["loss"], lw=1.2, label="train total")
    for part in PARTS:
        ax.plot(metrics["step"], metrics[part], lw=0.7, alpha=0.7, label=part.replace("_", " "))
    if len(val):
        ax.plot((val["epoch"] + 1) * per_epoch, val["loss"], "k--o", ms=3, lw=1, label="val total")
    ax.set_xlabel("step")
    ax.set_ylabel("InfoNCE loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def pretrain_multimodal(pairs: str | Path, image_root: str | Path, out_dir: str | Path,
                        settings: MultimodalSettings | dict, seed: int = 0, imagenet_weights=None,
                        device: str | None = None, checkpoint: str | Path | None = None, resume: bool = True,
                        stop_after_steps: int | None = None, threads: int | None = None,
                        local_files_only: bool | None = None) -> Path | None:
    """Train on the pairs' ``train`` split; returns ``image_encoder.pth`` (None on ranks > 0 / test stop).

    ``stop_after_steps`` (a test hook) returns None after that many steps of this call, writing
    nothing more, as a kill would. Run under torchrun for DDP.
    """
    info = init_distributed(device)
    try:
        method = MultimodalMethod(settings)
        return _train(info, method, Path(pairs), Path(image_root), Path(out_dir), seed, imagenet_weights,
                      Path(checkpoint) if checkpoint else Path(out_dir) / CHECKPOINT_NAME, resume,
                      stop_after_steps, threads, local_files_only)
    finally:
        cleanup_distributed()


def _train(info: DistInfo, method: MultimodalMethod, pairs_path: Path, image_root: Path, out_dir: Path, seed: int,
           imagenet_weights, ckpt_path: Path, resume: bool, stop_after_steps: int | None, threads: int | None,
           local_files_only: bool | None) -> Path | None:
    configure_threads(threads)
    seed_everything(seed)
    s, dev = method.s, info.device
    cuda = dev.type == "cuda"
    amp = bool(s.amp) and cuda
    pairs = read_pairs(pairs_path)
    if "split" not in pairs.columns:
        raise BadInputError(str(pairs_path), "no split column: run cxrssl.multimodal.reports.patient_split first")
    train, val = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "val"]
    if len(train) < s.batch_size:
        raise BadInputError(str(pairs_path), f"{len(train)} training pairs are fewer than one batch of {s.batch_size}")

    # The scratch vocabulary sees the training reports only (never val/test).
    model = method.build_model([" ".join(x) for x in train["sentences"]], imagenet_weights, local_files_only)
    tokenize = model.text.tokenize
    collate = functools.partial(collate_pairs, pad_id=model.text.tokenizer.pad_token_id)
    dataset = ReportImageDataset(train, image_root, tokenize, s.image_size, seed, train=True)
    val_set = ReportImageDataset(val, image_root, tokenize, s.image_size, seed, train=False) if len(val) else None
    sampler = PairSampler(len(dataset), s.batch_size, info.world_size, info.rank, seed)
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=s.workers,
                        collate_fn=collate, pin_memory=cuda, drop_last=True, persistent_workers=s.workers > 0)
    per_epoch, n_steps, warmup = total_steps(len(dataset), s)

    if info.distributed:
        model = sync_batchnorm(model, dev)
    model = model.to(dev)
    optimizer = method.optimizer(model)
    loss_fn = method.build_loss()

    keyed = {k: getattr(s, k) for k in RESULT_KEYS}
    fingerprint = json.dumps({**keyed, "seed": seed, "data": data_fingerprint(pairs_path, image_root,
                              train["image_path"].tolist()),
                              "imagenet_weights": str(imagenet_weights) if s.init == "imagenet" else None,
                              # a checkpoint init (e.g. another method's backbone): its bytes, so a retrained
                              # init is never resumed over
                              "init_weights": sha256_file(s.init) if s.init not in ("random", "imagenet") else None},
                             sort_keys=True)
    step, rows, val_rows = 0, [], []
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, "multimodal resume checkpoint")
        if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng", "metrics", "val"} <= set(state):
            raise BadInputError(str(ckpt_path), "not a cxrssl multimodal checkpoint (needs model, optimizer, step, "
                                "rng, metrics and val); delete it or pass resume=False")
        if state.get("fingerprint") != fingerprint:
            log.warning("%s is from other settings or data; training from scratch", ckpt_path)
        elif state["step"] >= n_steps:
            log.info("%s is a finished run; training again from scratch (a deliberate rerun)", ckpt_path)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, rows, val_rows = int(state["step"]), list(state["metrics"]), list(state["val"])
            set_rng_state(state["rng"])
            log.info("resumed from %s at step %d/%d", ckpt_path, step, n_steps)
    log.info("%d train / %d val pairs, global batch %d on %d process(es) (%s), %d steps/epoch, %d steps",
             len(dataset), len(val), s.batch_size, info.world_size, dev, per_epoch, n_steps)

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "rng": rng_state(), "fingerprint": fingerprint, "metrics": rows, "val": val_rows,
                             "settings": json.dumps(asdict(s))}, ckpt_path)

    tracker = tracking.start(out_dir, f"multimodal/{method.name}", {"seed": seed, "multimodal": asdict(s)},
                             enabled=info.is_main, resume=step > 0)
    net = DistributedDataParallel(model, device_ids=[dev.index] if cuda else None) if info.distributed else model
    bar = tqdm(total=n_steps, initial=step, desc="multimodal", unit="step", dynamic_ncols=True,
               disable=progress_disabled() or not info.is_main)
    steps_this_run = 0
    while step < n_steps:
        epoch = step // per_epoch
        sampler.set_epoch(epoch, step % per_epoch)
        net.train()
        tick = time.perf_counter()
        for batch in loader:
            factor = method.set_lr(optimizer, step, n_steps, warmup)
            loss, parts = method.batch_loss(net, loss_fn, batch, dev, amp)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            logged = _rank_mean(torch.stack([loss.detach(), *(parts[k].detach() for k in PARTS)]), info)
            value, part_values = float(logged[0]), dict(zip(PARTS, logged[1:].tolist()))
            if not np.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step} (epoch {epoch}); lower lr / lr_text")
            step += 1
            steps_this_run += 1
            now = time.perf_counter()
            rows.append(dict(step=step, epoch=epoch, loss=value, **part_values,
                             lr_factor=factor, pairs_per_s=s.batch_size / (now - tick)))
            tick = now
            tracker.log_step({k: v for k, v in rows[-1].items() if k not in ("step", "epoch")}, step)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", epoch=epoch)
            if step % per_epoch == 0 and val_set is not None:
                val_rows.append(dict(epoch=epoch, loss=_val_loss(method, model, loss_fn, val_set, collate, dev, amp)))
                tracker.log_epoch({"loss": val_rows[-1]["loss"]}, step, prefix="val/")
                log.info("epoch %d: train loss %.4f, val loss %.4f", epoch, value, val_rows[-1]["loss"])
                net.train()
            if step % s.checkpoint_every == 0 or step == n_steps:
                checkpoint()
            if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                bar.close()
                tracker.close()
                log.warning("stopping after %d steps (test hook) at step %d", steps_this_run, step)
                return None
    bar.close()
    tracker.close()
    if not info.is_main:
        return None
    path = method.export(model, out_dir, {"seed": seed, "steps": n_steps, "train_pairs": len(dataset)})
    metrics = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    val_frame = pd.DataFrame(val_rows, columns=["epoch", "loss"])
    atomic_write_csv(metrics, out_dir / METRICS_NAME)
    atomic_write_csv(val_frame, out_dir / VAL_NAME)
    save_loss_plot(metrics, val_frame, per_epoch, out_dir / PLOT_NAME)
    log.info("wrote %s (final loss %.4f)", out_dir / IMAGE_ENCODER, metrics["loss"].iloc[-1])
    return path


def _rank_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks (each rank's loss averages its own rows: the mean is the global batch's loss)."""
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values.cpu()


@torch.no_grad()
def _val_loss(method, model, loss_fn, val_set, collate, dev, amp) -> float:
    """Loss over all val pairs as one batch, in eval mode; every rank scores the whole set itself."""
    model.eval()
    batch = collate([val_set[(0, i)] for i in range(len(val_set))])
    loss, _ = method.batch_loss(model, loss_fn, batch, dev, amp, gather=False)
    return float(loss)
