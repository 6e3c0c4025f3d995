"""The mmdet detection engine: Faster R-CNN + FPN trained by mmengine's Runner (mmdet 3.3).

It runs the paper's own framework beside the torchvision engine and writes the same run folder
contract (CONTRIBUTING.md): ``best.pth`` (best val bbox mAP50), ``last.pth``, ``train_log.csv``,
``train_curve.png`` and ``predictions_test.json`` (COCO results in converted pixels of
``coco_test.json``, category ids 1..14), so evaluation, report and heatmaps are shared.

This module is the ``mmdet`` engine of :mod:`cxrssl.detection.engines` (``ENGINE``).

* The config is :func:`cxrssl.detection.mmdet_config.build_config` (the paper's R50-FPN setup); the
  engine registers the two types it names: ``CxrsslFasterRCNN`` (bf16 backbone + neck, fp32 heads)
  and ``CxrsslWarmupCosineLR`` (the learning rates of :class:`cxrssl.detection.schedule.WarmupCosine`).
* The backbone checkpoint (a torchvision ResNet state dict without ``fc``, e.g. Barlow Twins'
  ``backbone.pth``) reaches mmdet's ResNet through ``init_cfg`` (type Pretrained) unchanged: both use
  torchvision's parameter names. It is checked first: no missing or unexpected keys, same shapes.
  Wrapped checkpoints (prefixes, ``fc``) and ImageNet weights are written as such a plain state dict
  into the run's work folder first.
* ``best.pth`` (the best val epoch) and ``last.pth`` (the last epoch) are ``{"meta", "model"}`` like
  the torchvision engine's: the meta is plain JSON data (the settings), from which
  :func:`load_cam_model` rebuilds the mmdet config with :func:`~cxrssl.detection.mmdet_config.model_cfg`.
  No config text is ever handed to mmengine (``Config.fromstring`` would execute it), and no
  mmengine checkpoint (pickled objects) is written or read: the best weights are kept in memory.
  A rerun starts over.

mmcv's compiled ops are not on PyPI; importing this module without them raises
:class:`MmdetUnavailableError` saying how to install them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrssl import tracking
from cxrssl.classes import check_class_names, coco_categories
from cxrssl.detection.curves import plot_train_curve
from cxrssl.errors import BadInputError
from cxrssl.io import atomic_path, atomic_torch_save, atomic_write_csv, atomic_write_json
from cxrssl.utils import progress_disabled, seed_everything

INSTALL_HINT = (
    "The mmdet engine needs mmcv 2.1.0 with compiled ops, mmengine 0.10.7 and mmdet 3.3.0. PyPI has "
    "no mmcv wheel and its source does not compile against torch 2.14 as published. From the "
    "project folder run `make mmcv` (builds mmcv with the C++20 fix, with CUDA when nvcc and a CUDA "
    "torch are present, then installs the engine), or, with a wheel built before, "
    "`make install-mmdet MMCV_WHEEL=/path/to/mmcv-2.1.0-<tags>.whl`. Or set detection.engine: "
    "torchvision in config.yaml."
)


class MmdetUnavailableError(ImportError):
    """mmcv (with compiled ops), mmengine or mmdet cannot be imported."""


try:
    import mmcv.ops  # noqa: F401  (the compiled RoIAlign/NMS the detector needs)
    import mmdet
    from mmdet.utils import register_all_modules
    from mmengine.config import Config, ConfigDict
    from mmengine.hooks import Hook
    from mmengine.logging import MMLogger
    from mmengine.model import is_model_wrapper
    from mmdet.models.detectors import FasterRCNN as MMDetFasterRCNN
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.structures import DetDataSample
    from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
    from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
    from mmengine.registry import MODELS, PARAM_SCHEDULERS
    from mmengine.runner import Runner
except (ImportError, AssertionError) as _exc:  # mmdet asserts a compatible mmcv version
    raise MmdetUnavailableError(f"cannot import the mmdet engine ({type(_exc).__name__}: {_exc}). {INSTALL_HINT}") from _exc

from cxrssl.detection.dataset import input_format  # noqa: E402
from cxrssl.detection.engines import make_meta  # noqa: E402
from cxrssl.detection.mmdet_config import (  # noqa: E402
    BEST_METRIC,
    DETECTOR_TYPE,
    RESNET_DEPTH,
    SCHEDULER_TYPE,
    build_config,
    model_cfg,
)
from cxrssl.detection.schedule import WarmupCosine  # noqa: E402
from cxrssl.runtime import load_checkpoint  # noqa: E402
from cxrssl.models.backbone import (  # noqa: E402
    backbone_state_dict,
    build_resnet,
    extract_state_dict,
)

log = logging.getLogger(__name__)

#: torchvision's FPN output names, which pytorch-grad-cam's Faster R-CNN helpers expect.
FPN_KEYS = ("0", "1", "2", "3", "pool")
WORK_SUBDIR = "mmdet_work"
LOSS_KEYS = ("loss", "loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox")
LOG_COLUMNS = ["epoch", "iter", *LOSS_KEYS, "acc", "lr", "val_mAP50", "val_mAP", "val_mAP75"]

register_all_modules(init_default_scope=True)


@MMDET_MODELS.register_module(name=DETECTOR_TYPE, force=True)
class CxrsslFasterRCNN(MMDetFasterRCNN):
    """mmdet's Faster R-CNN with the engines' precision policy: with ``autocast_device`` set, the
    backbone and neck run under bf16 autocast and hand fp32 features to the RPN and RoI heads."""

    def __init__(self, *args, autocast_device: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_device = autocast_device

    def extract_feat(self, batch_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.autocast_device is None:
            return super().extract_feat(batch_inputs)
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
            features = super().extract_feat(batch_inputs)
        return tuple(f.float() for f in features)


@PARAM_SCHEDULERS.register_module(name=SCHEDULER_TYPE, force=True)
class CxrsslWarmupCosineLR(LRSchedulerMixin, _ParamScheduler):
    """mmengine scheduler stepping :class:`cxrssl.detection.schedule.WarmupCosine` every iteration
    (configured by epoch with ``convert_to_iter_based``, so that mmengine passes the epoch length)."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_iters: int, epochs: int, iters_per_epoch: int,
                 begin: int = 0, end: int = INF, last_step: int = -1, by_epoch: bool = False, verbose: bool = False):
        self.schedule = WarmupCosine(lr, min_lr, warmup_iters, epochs, iters_per_epoch)
        super().__init__(optimizer, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch, verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None, **kwargs):
        if not by_epoch or not epoch_length:
            raise ValueError(f"{SCHEDULER_TYPE} is configured by epoch and needs the epoch length")
        return cls(*args, iters_per_epoch=epoch_length, begin=int(begin * epoch_length),
                   end=INF if end == INF else int(end * epoch_length), by_epoch=False, **kwargs)

    def _get_value(self):
        factor = self.schedule(self.last_step)
        return [base * factor for base in self.base_values]


# --- inputs ----------------------------------------------------------------------------------------

def check_coco_json(path: str | Path, check_images: bool = True) -> dict:
    """Load a pipeline COCO JSON and check what mmdet silently gets wrong otherwise.

    mmdet maps categories to labels by *name*: the categories must be the canonical table, in order,
    with ids 1..14 (a different spelling would drop a class and shift the labels after it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO JSON {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(str(path), f"not valid JSON: {exc}") from exc
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise BadInputError(str(path), f"no {key!r} list (not a COCO detection JSON)")
    cats = data["categories"]
    check_class_names([c["name"] for c in cats], where=f"{path} categories")
    ids = [c["id"] for c in cats]
    expected = [c["id"] for c in coco_categories()]
    if ids != expected:
        raise BadInputError(str(path), f"category ids {ids} differ from {expected} (cxrssl.classes.coco_categories)")
    if check_images:
        for image in data["images"]:
            file = path.parent / image["file_name"]
            if not file.is_file():
                raise BadInputError(f"{path}: image id {image['id']}", f"image file {file} does not exist")
    for n, ann in enumerate(data["annotations"]):
        if "area" not in ann or "bbox" not in ann:
            raise BadInputError(f"{path}: annotation {n}", "needs 'bbox' and 'area' (mmdet reads both)")
    return data


def _mmdet_resnet(arch: str, init_cfg: dict | None = None) -> nn.Module:
    return MODELS.build(dict(type="ResNet", depth=RESNET_DEPTH[arch], num_stages=4, out_indices=(0, 1, 2, 3),
                             style="pytorch", norm_cfg=dict(type="BN", requires_grad=True), init_cfg=init_cfg))


def backbone_key_mismatch(state: Mapping[str, torch.Tensor], arch: str) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of a state dict against mmdet's ResNet ``arch``."""
    target = _mmdet_resnet(arch).state_dict()
    # BatchNorm's step counter is not a weight; older exports lack it.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in target.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def refuse_vit(init: str, arch: str) -> None:
    """The mmdet engine is ResNet-only: a ViT ``detection.arch`` or a ViT init (its backbone.json)
    is refused before anything is built, saying where ViTs are detected instead."""
    from cxrssl.detection.model import is_vit, resolve_arch

    built = resolve_arch(arch, init)
    if is_vit(built):
        source = f"init {init} is a {built} backbone (its backbone.json)" if built != arch else f"detection.arch is {arch}"
        raise ValueError(f"the mmdet engine builds ResNets only, but {source}: ViT backbones are detected "
                         "by the torchvision engine (ViTDet's simple feature pyramid): set detection.engine "
                         "torchvision or leave ViT inits out of the mmdet runs")


def prepare_backbone_checkpoint(init: str, arch: str, work_dir: str | Path,
                                imagenet_weights: str | Path | None = None) -> str | None:
    """The checkpoint path for mmdet's ``init_cfg`` (None for ``random``), checked key by key.

    A plain torchvision-format state dict without ``fc`` (Barlow Twins' export) is used unchanged;
    anything else (ImageNet weights, wrapped checkpoints) is written as one under ``work_dir``.
    """
    refuse_vit(init, arch)
    if init == "random":
        return None
    work_dir = Path(work_dir)
    if init == "imagenet":
        # cxrssl.models.backbone loads (or explains how to get) the weights; we export them plain.
        state = backbone_state_dict(build_resnet(arch, "imagenet", imagenet_weights=imagenet_weights))
        source, plain = f"ImageNet weights for {arch}", False
    else:
        path = Path(init)
        if not path.is_file():
            raise FileNotFoundError(f"backbone checkpoint {path} does not exist")
        raw = load_checkpoint(path, "backbone checkpoint")
        try:
            state = extract_state_dict(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        plain = isinstance(raw, dict) and list(raw) == list(state) and not any(k.startswith("fc.") for k in state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        source = str(path)
    missing, unexpected, shapes = backbone_key_mismatch(state, arch)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not fit mmdet's ResNet-{RESNET_DEPTH[arch]} (detection.arch {arch}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, wrong shape {shapes[:3]}"
        )
    if plain:
        return str(path)
    out = work_dir / "backbone_init.pth"
    atomic_torch_save(state, out)
    log.info("wrote %s as a plain ResNet state dict to %s", source, out)
    return str(out)


def load_backbone_via_init_cfg(checkpoint: str | Path, arch: str) -> nn.Module:
    """mmdet's ResNet initialised through ``init_cfg=dict(type="Pretrained", checkpoint=...)``."""
    model = _mmdet_resnet(arch, init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint)))
    model.init_weights()
    return model


# --- training --------------------------------------------------------------------------------------

class TrainLogHook(Hook):
    """``train_log.csv`` like the torchvision engine's: one row per iteration (losses, lr) with the
    val metrics on each epoch's last row; tqdm bars over training and test iterations. It also keeps
    the weights of the best val epoch in memory (the first epoch reaching the highest mAP50, as the
    torchvision engine's selection)."""

    priority = "LOW"

    def __init__(self, csv_path: str | Path, curve_path: str | Path, title: str, tracker=None):
        self.csv_path, self.curve_path, self.title = Path(csv_path), Path(curve_path), title
        self.tracker = tracker  # cxrssl.tracking: each epoch's rows once its val metrics are in
        self.rows: list[dict[str, Any]] = []
        self._bar = None
        self.best_value, self.best_epoch, self.best_state = -float("inf"), 0, None

    def _open_bar(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, disable=progress_disabled(), leave=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_train_epoch(self, runner) -> None:
        self._open_bar(len(runner.train_dataloader), f"epoch {runner.epoch + 1}/{runner.max_epochs}")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        row: dict[str, Any] = {"epoch": runner.epoch + 1, "iter": runner.iter + 1}
        for key, value in (outputs or {}).items():
            row[key] = float(value.detach()) if torch.is_tensor(value) else float(value)
        row["lr"] = float(runner.optim_wrapper.get_lr()["lr"][0])
        self.rows.append(row)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.3f}")

    def after_train_epoch(self, runner) -> None:
        self._close_bar()

    def after_val_epoch(self, runner, metrics=None) -> None:
        metrics = metrics if metrics is not None else {}
        if BEST_METRIC not in metrics:
            # CocoMetric reports nothing when no image got any box; for selection that is mAP 0.
            log.warning("epoch %d: no detections on the val set; counting val mAP50 as 0", runner.epoch)
            metrics[BEST_METRIC] = 0.0
        value = float(metrics[BEST_METRIC])
        if value > self.best_value:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            self.best_value, self.best_epoch = value, int(runner.epoch)
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if not self.rows:
            return
        last = self.rows[-1]
        last.update(val_mAP50=float(metrics[BEST_METRIC]), val_mAP=float(metrics.get("coco/bbox_mAP", 0.0)),
                    val_mAP75=float(metrics.get("coco/bbox_mAP_75", 0.0)))
        self.write()
        if self.tracker is not None:
            self.tracker.log_rows([r for r in self.rows if r["epoch"] == last["epoch"]], "iter",
                                  epoch_keys=("val_mAP50", "val_mAP", "val_mAP75"))
        log.info("epoch %d: loss %.4f val mAP50 %.4f", last["epoch"], last.get("loss", float("nan")),
                 last["val_mAP50"])

    def write(self) -> None:
        import pandas as pd

        frame = pd.DataFrame(self.rows)
        columns = [c for c in LOG_COLUMNS if c in frame] + [c for c in frame if c not in LOG_COLUMNS]
        atomic_write_csv(frame.reindex(columns=columns), self.csv_path)
        plot_train_curve(frame, self.curve_path, LOSS_KEYS, self.title)

    def before_test_epoch(self, runner) -> None:
        self._open_bar(len(runner.test_dataloader), "test predictions")

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._close_bar()


def _attach_rule_log(logger: logging.Logger) -> None:
    """Send mmengine's messages (its logger does not propagate) to the rule's log file too."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler not in logger.handlers:
            logger.addHandler(handler)


def _read_predictions(path: Path, coco_test: dict) -> list[dict]:
    results = json.loads(path.read_text()) if path.is_file() else []
    image_ids = {im["id"] for im in coco_test["images"]}
    cat_ids = {c["id"] for c in coco_categories()}
    out = []
    for n, det in enumerate(results):
        if det["image_id"] not in image_ids or det["category_id"] not in cat_ids:
            raise RuntimeError(f"{path}: result {n} has image_id {det['image_id']} / category_id "
                               f"{det['category_id']} outside coco_test.json")
        out.append({"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
                    "bbox": [round(float(v), 3) for v in det["bbox"]], "score": round(float(det["score"]), 6)})
    return out


def check_cuda_ops() -> None:
    """mmengine trains on the GPU whenever torch sees one; a CPU-only mmcv build cannot run there."""
    from mmcv.ops import get_compiling_cuda_version

    if torch.cuda.is_available() and get_compiling_cuda_version() == "not available":
        raise MmdetUnavailableError(
            "a GPU is visible but the installed mmcv was built without CUDA ops (e.g. the prebuilt CPU "
            "wheel). Run `make mmcv` on a machine with nvcc and a CUDA torch to build CUDA ops, or hide "
            "the GPU (CUDA_VISIBLE_DEVICES=) to train on the CPU."
        )


def train(train_json: str | Path, val_json: str | Path, test_json: str | Path, out_dir: str | Path, *,
          init: str, res: int, seed: int, settings: Mapping[str, Any], imagenet_weights: str | Path | None = None,
          device: str | None = None, init_name: str | None = None) -> dict[str, Any]:
    """Train, keep the best val mAP50 weights and predict the test set; returns a summary.

    ``init``: ``random``, ``imagenet`` or a backbone checkpoint path. ``settings``: the ``detection``
    config section. ``device``: mmengine trains on CUDA when torch sees a GPU, else on the CPU; a
    ``device`` that differs from that choice is an error. Outputs (in ``out_dir``): see the module
    docstring.
    """
    out_dir = Path(out_dir)
    params = dict(settings)
    runs_on = "cuda" if torch.cuda.is_available() else "cpu"
    if device and torch.device(device).type != runs_on:
        raise ValueError(f"the mmdet engine trains on {runs_on} here (mmengine's choice), not on {device}: "
                         "hide the GPU with CUDA_VISIBLE_DEVICES= to train on the CPU")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / WORK_SUBDIR
    if work_dir.exists():  # a rerun starts over
        shutil.rmtree(work_dir)
    work_dir.mkdir()
    seed_everything(seed)
    jsons = {"train": Path(train_json), "val": Path(val_json), "test": Path(test_json)}
    coco = {split: check_coco_json(p) for split, p in jsons.items()}
    log.info("COCO JSONs: %s", ", ".join(f"{s} {len(c['images'])} images / {len(c['annotations'])} boxes"
                                         for s, c in coco.items()))

    arch = params["arch"]
    refuse_vit(init, arch)
    check_cuda_ops()
    checkpoint = prepare_backbone_checkpoint(init, arch, work_dir, imagenet_weights)
    prefix = work_dir / "test_predictions"
    cfg = Config(build_config(params, train_json=jsons["train"], val_json=jsons["val"], test_json=jsons["test"],
                              work_dir=work_dir, res=res, backbone_checkpoint=checkpoint, seed=seed,
                              device_type=runs_on, predictions_prefix=prefix))
    with atomic_path(out_dir / "mmdet_config.py") as tmp:  # for people to read; never read back
        cfg.dump(str(tmp))
    log.info("mmdet %s, init %s (backbone checkpoint %s), arch %s, %d px, seed %d, bf16 backbone %s",
             mmdet.__version__, init, checkpoint, arch, res, seed, cfg.model.autocast_device is not None)

    runner = Runner.from_cfg(cfg)
    _attach_rule_log(runner.logger)
    label = init if init in ("random", "imagenet") else f"{Path(init).parent.name}/{Path(init).name}"
    tracker = tracking.start(out_dir, f"detection/mmdet_{init_name or init}_{res}px_seed{seed}",
                             {"engine": "mmdet", "init": init_name or init, "res": res, "seed": seed,
                              "detection": params})
    hook = TrainLogHook(out_dir / "train_log.csv", out_dir / "train_curve.png",
                        f"mmdet {arch}, init {label}, {res} px, seed {seed}", tracker)
    runner.register_hook(hook)
    try:
        runner.train()
    finally:
        tracker.close()

    if hook.best_state is None:
        raise RuntimeError(f"mmdet run in {work_dir} reported no val {BEST_METRIC}")
    input_size, bit_depth = input_format(jsons["train"])
    meta = make_meta("mmdet", arch=arch, init=init, init_name=init_name, res=res, seed=seed, settings=params,
                     input_size=input_size, input_bit_depth=bit_depth, pretrained=init != "random")
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    last_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save({"meta": dict(meta, epoch=int(runner.epoch), val_mAP50=float(hook.rows[-1].get(
        "val_mAP50", float("nan")) if hook.rows else float("nan"))), "model": last_state}, out_dir / "last.pth")
    atomic_torch_save({"meta": dict(meta, epoch=hook.best_epoch, val_mAP50=hook.best_value),
                       "model": hook.best_state}, out_dir / "best.pth")
    model.load_state_dict(hook.best_state)
    runner.test()
    predictions = _read_predictions(Path(f"{prefix}.bbox.json"), coco["test"])
    atomic_write_json(predictions, out_dir / "predictions_test.json", indent=None)
    hook.write()
    summary = {"best_epoch": hook.best_epoch, "best_val_mAP50": hook.best_value, "iterations": len(hook.rows),
               "n_predictions": len(predictions)}
    log.info("done: %s", summary)
    return summary


# --- heatmaps --------------------------------------------------------------------------------------

class FeaturePyramid(nn.Module):
    """ResNet + FPN returning an OrderedDict like torchvision's ``BackboneWithFPN``.

    Submodules are named ``body`` and ``fpn`` as in torchvision, so target layers such as
    ``backbone.body.layer4`` mean the same in both engines. ``autocast_device`` follows the
    detector's precision policy (:class:`CxrsslFasterRCNN`): bf16 inside, fp32 features out.
    """

    def __init__(self, body: nn.Module, fpn: nn.Module, autocast_device: str | None = None):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.autocast_device = autocast_device

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.autocast_device is None:
            feats = self.fpn(self.body(x))
        else:
            with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
                feats = tuple(f.float() for f in self.fpn(self.body(x)))
        if len(feats) != len(FPN_KEYS):
            raise RuntimeError(f"expected {len(FPN_KEYS)} FPN levels, got {len(feats)}")
        return OrderedDict(zip(FPN_KEYS, feats))


class MMDetCamModel(nn.Module):
    """A trained mmdet Faster R-CNN that answers like a torchvision detector (for pytorch-grad-cam).

    ``forward(images)`` takes a list (or batch) of CHW float tensors in [0, 1] (1 or 3 channels) and
    returns ``[{"boxes", "labels", "scores"}]`` in input pixels, labels 1..14. Preprocessing is the
    test pipeline's: longest side to ``res``, ImageNet normalisation, zero padding to 32.
    ``.backbone`` is looked up at every call, so pytorch-grad-cam's ablation layer can replace it.
    """

    def __init__(self, detector: nn.Module, res: int):
        super().__init__()
        self.detector = detector
        self.backbone = FeaturePyramid(detector.backbone, detector.neck, getattr(detector, "autocast_device", None))
        self.res = int(res)
        pre = detector.data_preprocessor
        self.register_buffer("mean", pre.mean.detach().clone().view(-1, 1, 1), persistent=False)
        self.register_buffer("std", pre.std.detach().clone().view(-1, 1, 1), persistent=False)
        self.divisor = int(getattr(pre, "pad_size_divisor", 32))

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        """mmcv's Resize with keep_ratio: longest side to res, sizes rounded to nearest."""
        scale = self.res / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def input_geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, width, padded height, width) of a ``height`` x ``width`` input."""
        nh, nw = self._resized(int(height), int(width))
        return nh, nw, -(-nh // self.divisor) * self.divisor, -(-nw // self.divisor) * self.divisor

    def _prepare(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list]:
        device = self.mean.device
        resized, samples = [], []
        for img in images:
            if img.dim() != 3 or img.shape[0] not in (1, 3):
                raise ValueError(f"expected CHW images with 1 or 3 channels, got shape {tuple(img.shape)}")
            img = img.to(device=device, dtype=torch.float32)
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            h, w = img.shape[-2:]
            nh, nw = self._resized(h, w)
            img = F.interpolate(img[None] * 255.0, size=(nh, nw), mode="bilinear", align_corners=False)[0]
            resized.append((img - self.mean) / self.std)
            samples.append({"ori_shape": (h, w), "img_shape": (nh, nw), "scale_factor": (nw / w, nh / h)})
        ph = max(im.shape[-2] for im in resized)
        pw = max(im.shape[-1] for im in resized)
        ph, pw = -(-ph // self.divisor) * self.divisor, -(-pw // self.divisor) * self.divisor
        batch = torch.stack([F.pad(im, (0, pw - im.shape[-1], 0, ph - im.shape[-2])) for im in resized])
        data_samples = []
        for meta in samples:
            ds = DetDataSample()
            ds.set_metainfo({**meta, "batch_input_shape": (ph, pw), "pad_shape": (ph, pw)})
            data_samples.append(ds)
        return batch, data_samples

    def forward(self, images) -> list[dict[str, torch.Tensor]]:
        batch, data_samples = self._prepare(list(images))
        feats = self.backbone(batch)
        x = tuple(feats[k] for k in FPN_KEYS)
        proposals = self.detector.rpn_head.predict(x, data_samples, rescale=False)
        results = self.detector.roi_head.predict(x, proposals, data_samples, rescale=True)
        return [{"boxes": r.bboxes, "labels": r.labels + 1, "scores": r.scores} for r in results]


def build_from_meta(meta: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                    score_thr: float | None = None) -> MMDetCamModel:
    """A trained mmdet detector rebuilt from a checkpoint's JSON meta (never from stored config text)."""
    settings = dict(meta["settings"])
    if score_thr is not None:
        settings["score_thr"] = float(score_thr)
    cfg = model_cfg(meta["arch"], None, settings, pretrained=bool(meta["pretrained"]))
    detector = MODELS.build(ConfigDict(cfg))
    detector.load_state_dict(state_dict)
    return MMDetCamModel(detector, meta["res"])


def load_cam_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> MMDetCamModel:
    """The ``best.pth`` of an mmdet run as a torchvision-like detector in eval mode on ``device``."""
    from cxrssl.detection.engines import load_detector

    model, meta = load_detector(checkpoint, device)
    if meta["engine"] != "mmdet":
        raise ValueError(f"{checkpoint}: a {meta['engine']} checkpoint, not an mmdet-engine one")
    return model


class MmdetEngine:
    """The mmdet engine behind :mod:`cxrssl.detection.engines`' interface."""

    name = "mmdet"
    train = staticmethod(train)
    build_from_meta = staticmethod(build_from_meta)


ENGINE = MmdetEngine()


def current_logger() -> logging.Logger:
    """mmengine's current logger (where init_cfg loading reports mismatched keys)."""
    return MMLogger.get_current_instance()
