"""The pretraining loop shared by every method: schedule per step, DDP, AMP, resumable, exported.

The method (:mod:`cxrssl.ssl.registry`) brings the per-sample function, the model with its loss,
the optimizer and its schedule; everything else is here and the same for all of them.

Checkpoints (``checkpoint_every`` steps and at the end, written atomically by rank 0 through
:func:`cxrssl.runtime.save_checkpoint`) hold the model, the optimizer, the step, the RNG states of
torch/NumPy/Python (tensors and plain values only) and a fingerprint of the settings, the data
and the initial weights. The sampler position follows from the step (``epoch = step //
batches_per_epoch``) and every sample is seeded per (seed, epoch, image), so on CPU a run killed
and resumed ends with the same weights, bit for bit, as an uninterrupted one. A checkpoint from
other settings/data, or from a finished run (a deliberate rerun), is not resumed.

Outputs of :func:`pretrain` in ``out_dir``: ``backbone.pth`` (the library's state dict without
the classifier, see :mod:`cxrssl.models.backbones`), ``backbone.json`` (its sidecar: method,
arch, library, image and patch size, fingerprint), ``metrics.csv`` (step, epoch, loss, the
method's learning-rate columns, images_per_s = source images per second over all ranks),
``monitor.csv`` (the kNN monitor, :mod:`cxrssl.ssl.monitor`: epoch, step, knn_mean_auc,
n_findings; only the header when ``monitor_every_epochs`` is 0) and ``loss.png`` (loss, schedule,
monitor). The same per-step values and monitor AUCs are logged live through
:mod:`cxrssl.tracking` (rank 0 only).
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
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
from cxrssl.models.backbones import build_backbone, export_state_dict, write_sidecar
from cxrssl.runtime import (DistInfo, cleanup_distributed, compile_failure, compile_module, configure_threads,
                            fingerprint, init_distributed, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                            sync_batchnorm)
from cxrssl.ssl.data import NIHImages, PairSampler, open_cache
from cxrssl.ssl.monitor import MONITOR_COLUMNS, KNNMonitor
from cxrssl.ssl.registry import PretrainMethod, get_method
from cxrssl.utils import progress_disabled, seed_everything

log = logging.getLogger(__name__)

BACKBONE_NAME, METRICS_NAME, PLOT_NAME, CHECKPOINT_NAME = "backbone.pth", "metrics.csv", "loss.png", "checkpoint.pth"
MONITOR_NAME = "monitor.csv"
#: Shared settings that change the trained weights (workers and checkpoint_every do not).
COMMON_RESULT_KEYS = ("batch_size", "epochs", "warmup_epochs", "image_size", "amp")


def metric_columns(method: type[PretrainMethod] | PretrainMethod) -> list[str]:
    return ["step", "epoch", "loss", *method.lr_columns, "images_per_s"]


#: metrics.csv columns of Barlow Twins (the other methods log their own learning-rate columns).
METRIC_COLUMNS = ["step", "epoch", "loss", "lr_weights", "lr_biases", "images_per_s"]


def data_fingerprint(index_path: str | Path, cache_path: str | Path) -> str:
    """SHA-256 of the index CSV, the cache shape and 64 evenly spaced cache rows (cheap, catches rebuilds)."""
    h = hashlib.sha256(Path(index_path).read_bytes())
    cache = open_cache(cache_path)
    h.update(repr(cache.shape).encode())
    for row in np.linspace(0, len(cache) - 1, num=min(64, len(cache))).astype(int):
        h.update(np.ascontiguousarray(cache[row]).tobytes())
    return h.hexdigest()


def run_fingerprint(method: str, settings: dict, seed: int, data: str, imagenet_weights) -> str:
    """What decides a run's weights: method block, shared settings, seed, data, initial weights (content)."""
    block = settings[method]
    init = block["init"]
    parts = {"method": method, "settings": block, "common": {k: settings[k] for k in COMMON_RESULT_KEYS},
             "seed": seed, "data": data}
    return fingerprint(parts, {"init": init, "imagenet_weights": imagenet_weights if init == "imagenet" else None})


def build_encoder(block: dict, image_size: int, imagenet_weights=None):
    """The backbone a method block asks for (``arch``, ``init``), classifier removed.

    A random ResNet gets ``zero_init_residual=True``, as the authors' pretraining code built it
    (the last BatchNorm of each residual block starts at 0, so each block starts as the identity).
    """
    return build_backbone(block["arch"], block["init"], imagenet_weights, image_size=image_size,
                          zero_init_residual=block["init"] == "random")


def save_loss_plot(metrics: pd.DataFrame, path: str | Path, title: str = "Barlow Twins",
                   monitor: pd.DataFrame | None = None) -> None:
    """Loss (log scale) and the schedule (learning rates; weight decay on a second axis) per step;
    with ``monitor`` rows, a third panel: the kNN monitor's mean AUC at its steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if monitor is not None and len(monitor) else 2
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3 * panels), sharex=True)
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(metrics["step"], metrics["loss"], lw=0.8)
    if len(metrics) >= 20:
        window = max(5, len(metrics) // 50)
        ax1.plot(metrics["step"], metrics["loss"].rolling(window, min_periods=1).mean(), lw=1.5,
                 label=f"mean over {window} steps")
        ax1.legend()
    if (metrics["loss"] > 0).all():
        ax1.set_yscale("log")
    ax1.set_ylabel(f"{title} loss")
    labels = {"lr_weights": "weights", "lr_biases": "biases / BN", "lr": "learning rate"}
    schedule = [c for c in metrics.columns if c not in ("step", "epoch", "loss", "images_per_s")]
    for col in (c for c in schedule if c.startswith("lr")):
        ax2.plot(metrics["step"], metrics[col], label=labels.get(col, col))
    ax2.set_ylabel("learning rate")
    axes[-1].set_xlabel("step")
    if panels == 3:
        axes[2].plot(monitor["step"], monitor["knn_mean_auc"], marker="o")
        axes[2].axhline(0.5, ls=":", color="grey", lw=1)
        axes[2].set_ylabel("kNN monitor mean AUC")
    others = [c for c in schedule if not c.startswith("lr")]
    if others:
        twin = ax2.twinx()
        for col in others:
            twin.plot(metrics["step"], metrics[col], ls="--", color="grey", label=col.replace("_", " "))
        twin.set_ylabel(", ".join(c.replace("_", " ") for c in others))
        twin.legend(loc="upper right")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def pretrain(index: str | Path, cache: str | Path, out_dir: str | Path, settings: dict, method: str = "barlowtwins",
             seed: int = 0, imagenet_weights: str | Path | None = None, device: str | None = None,
             checkpoint: str | Path | None = None, resume: bool = True, stop_after_steps: int | None = None,
             threads: int | None = None) -> Path | None:
    """Pretrain ``method`` on the ``train_val`` images of the NIH cache; returns backbone.pth.

    ``settings``: the ``pretrain`` config section (shared keys plus the ``settings[method]``
    block). ``checkpoint`` defaults to ``out_dir/checkpoint.pth``. ``stop_after_steps`` (a test
    hook) returns None after that many steps in this call's run, writing nothing more, as a kill
    would. Run under torchrun for DDP.
    """
    info = init_distributed(device)
    try:
        return _pretrain(info, Path(index), Path(cache), Path(out_dir), settings, method, seed, imagenet_weights,
                         Path(checkpoint) if checkpoint else Path(out_dir) / CHECKPOINT_NAME, resume,
                         stop_after_steps, threads)
    finally:
        cleanup_distributed()


def _pretrain(info: DistInfo, index: Path, cache: Path, out_dir: Path, s: dict, name: str, seed: int,
              imagenet_weights, ckpt_path: Path, resume: bool, stop_after_steps: int | None,
              threads: int | None) -> Path | None:
    configure_threads(threads)
    seed_everything(seed)
    method = get_method(name)(s[name], s)
    block = s[name]
    dev = info.device
    cuda = dev.type == "cuda"
    amp = bool(s["amp"]) and cuda
    channels_last = amp and method.spec.family == "resnet"
    if cuda:
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()

    global_batch = int(s["batch_size"])
    dataset = NIHImages(index, cache, method.sample(), seed)
    sampler = PairSampler(len(dataset), global_batch, info.world_size, info.rank, seed)
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=s["workers"],
                        pin_memory=cuda, drop_last=True, persistent_workers=s["workers"] > 0)
    per_epoch = sampler.batches_per_epoch
    total_steps = int(s["epochs"]) * per_epoch
    warmup_steps = int(round(float(s["warmup_epochs"]) * per_epoch))

    encoder = build_encoder(block, s["image_size"], imagenet_weights)
    model = method.build_model(encoder, global_batch)
    if info.distributed:
        model = sync_batchnorm(model, dev)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = method.optimizer(model)

    run_id = run_fingerprint(name, s, seed, data_fingerprint(index, cache), imagenet_weights)
    step, rows, monitor_rows = 0, [], []
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, "pretraining resume checkpoint")
        if not isinstance(state, dict) or not {"model", "optimizer", "step", "rng", "metrics"} <= set(state):
            raise BadInputError(str(ckpt_path), "not a cxrssl pretraining checkpoint (needs model, optimizer, "
                                "step, rng and metrics); delete it or pass --no-resume")
        if state.get("fingerprint") != run_id:
            log.warning("%s is from other settings or data; training from scratch", ckpt_path)
        elif state["step"] >= total_steps:
            log.info("%s is a finished run; training again from scratch (a deliberate rerun)", ckpt_path)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step, rows = int(state["step"]), list(state["metrics"])
            monitor_rows = list(state.get("monitor", []))
            set_rng_state(state["rng"])
            log.info("resumed from %s at step %d/%d (epoch %d)", ckpt_path, step, total_steps, step // per_epoch)
    log.info("%s on %s: %d train_val images, global batch %d on %d process(es) (%s), %d steps/epoch, %d steps",
             method.title, block["arch"], len(dataset), global_batch, info.world_size, dev, per_epoch, total_steps)

    def checkpoint() -> None:
        if info.is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                             "epoch": step // per_epoch, "batch_in_epoch": step % per_epoch,
                             "scaler": None,  # bf16 autocast needs no gradient scaler
                             "rng": rng_state(), "fingerprint": run_id, "metrics": rows,
                             "monitor": monitor_rows}, ckpt_path)

    every = int(s.get("monitor_every_epochs", 0))
    monitor = KNNMonitor(index, cache, n_images=s["monitor_images"], image_size=s["image_size"],
                         k=s["monitor_k"], temperature=s["monitor_temperature"], seed=seed) \
        if every > 0 and info.is_main else None
    tracker = tracking.start(out_dir, f"pretrain/{name}", {"method": name, "seed": seed, "pretrain": s},
                             enabled=info.is_main, resume=step > 0)

    def run_monitor() -> None:
        """After each ``every``-th epoch and the last one: kNN AUC of the backbone (rank 0)."""
        if monitor is None or step % per_epoch or not (step // per_epoch % every == 0 or step == total_steps):
            return
        tick = time.perf_counter()
        result = monitor(model.backbone, dev, channels_last, amp)
        monitor_rows.append(dict(epoch=step // per_epoch, step=step, **result))
        tracker.log_epoch({"knn_mean_auc": result["knn_mean_auc"]}, step, prefix="monitor/")
        log.info("epoch %d: kNN monitor mean AUC %.4f over %d findings (%.1f s)", step // per_epoch,
                 result["knn_mean_auc"], result["n_findings"], time.perf_counter() - tick)

    net = DistributedDataParallel(model, device_ids=[dev.index] if cuda else None) if info.distributed else model
    net.train()
    compiled = bool(s.get("compile", False))
    if compiled:  # in place: model.state_dict() (checkpoints, export) keeps its keys
        compile_module(net, "pretrain.compile", dev)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {name}", unit="step", dynamic_ncols=True,
               disable=progress_disabled() or not info.is_main)
    steps_this_run = 0
    while step < total_steps:
        epoch = step // per_epoch
        sampler.set_epoch(epoch, step % per_epoch)
        tick = time.perf_counter()
        for batch in loader:
            lrs = method.schedule(optimizer, step, total_steps, warmup_steps, global_batch)
            inputs = method.inputs(batch, dev, channels_last)
            try:
                with autocast():
                    loss = net(*inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            except Exception as error:
                failure = compile_failure("pretrain.compile", error) if compiled else None
                if failure is not None:
                    raise failure from error
                raise
            method.clip_gradients(model)
            optimizer.step()
            value = loss.detach()
            if info.distributed:  # the mean over ranks is the loss of the global batch for every method
                value = value.clone()
                dist.all_reduce(value)
                value = value / info.world_size
            value = float(value)
            if not np.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step} (epoch {epoch}); lower the "
                                         f"learning rate(s) of pretrain.{name} or check the input images")
            step += 1
            steps_this_run += 1
            now = time.perf_counter()
            rows.append(dict(step=step, epoch=epoch, loss=value, **lrs, images_per_s=global_batch / (now - tick)))
            tick = now
            tracker.log_step({k: v for k, v in rows[-1].items() if k not in ("step", "epoch")}, step)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", epoch=epoch)
            run_monitor()
            if step % 50 == 0 or step == 1:
                log.info("step %d/%d epoch %d loss %.5g %s img/s %.1f", step, total_steps, epoch, value,
                         " ".join(f"{k} {v:.4g}" for k, v in lrs.items()), rows[-1]["images_per_s"])
            if step % s["checkpoint_every"] == 0 or step == total_steps:
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
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone_path = out_dir / BACKBONE_NAME
    save_checkpoint(export_state_dict(model.backbone), backbone_path)
    write_sidecar(backbone_path, method.spec, method=name, image_size=s["image_size"], fingerprint=run_id)
    metrics = pd.DataFrame(rows, columns=metric_columns(method))
    atomic_write_csv(metrics, out_dir / METRICS_NAME)
    monitored = pd.DataFrame(monitor_rows, columns=MONITOR_COLUMNS)
    atomic_write_csv(monitored, out_dir / MONITOR_NAME)
    save_loss_plot(metrics, out_dir / PLOT_NAME, method.title, monitored)
    log.info("wrote %s (final loss %.5g)", backbone_path, metrics["loss"].iloc[-1])
    return backbone_path
