"""The mmdet detection engine: Faster R-CNN + FPN trained by mmengine's Runner (mmdet 3.3).

It runs the paper's own framework beside the torchvision engine and writes the same run folder
contract (CONTRIBUTING.md): ``best.pth`` (best val bbox mAP50), ``last.pth``, ``train_log.csv``,
``train_curve.png`` and ``predictions_test.json`` (COCO results in converted pixels of
``coco_test.json``, category ids 1..14), so evaluation, report and heatmaps are shared.

* The config is :func:`cxrssl.detection.mmdet_config.build_config` (the paper's R50-FPN setup).
* The backbone checkpoint (a torchvision ResNet state dict without ``fc``, e.g. Barlow Twins'
  ``backbone.pth``) reaches mmdet's ResNet through ``init_cfg`` (type Pretrained) unchanged: both use
  torchvision's parameter names. It is checked first: no missing or unexpected keys, same shapes.
  Wrapped checkpoints (prefixes, ``fc``) and ImageNet weights are written as such a plain state dict
  into the run's work folder first.
* ``best.pth`` is ``{"engine": "mmdet", "meta": {...}, "state_dict": ...}``: the config text is in
  ``meta["cfg"]``, so :func:`load_cam_model` rebuilds the network from the checkpoint alone.

mmcv's compiled ops are not on PyPI; importing this module without them raises
:class:`MmdetUnavailableError` saying how to install them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrssl.classes import VINDR_CLASSES, check_class_names, coco_categories
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
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.logging import MMLogger
    from mmengine.model import is_model_wrapper
    from mmengine.registry import MODELS
    from mmengine.runner import Runner
    from mmdet.structures import DetDataSample
except (ImportError, AssertionError) as _exc:  # mmdet asserts a compatible mmcv version
    raise MmdetUnavailableError(f"cannot import the mmdet engine ({type(_exc).__name__}: {_exc}). {INSTALL_HINT}") from _exc

from cxrssl.detection.mmdet_config import BEST_METRIC, RESNET_DEPTH, build_config  # noqa: E402
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


def prepare_backbone_checkpoint(init: str, arch: str, work_dir: str | Path,
                                imagenet_weights: str | Path | None = None) -> str | None:
    """The checkpoint path for mmdet's ``init_cfg`` (None for ``random``), checked key by key.

    A plain torchvision-format state dict without ``fc`` (Barlow Twins' export) is used unchanged;
    anything else (ImageNet weights, wrapped checkpoints) is written as one under ``work_dir``.
    """
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
        raw = torch.load(path, map_location="cpu", weights_only=True)
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
    val metrics on each epoch's last row; tqdm bars over training and test iterations."""

    priority = "LOW"  # before CheckpointHook (VERY_LOW) reads the metrics

    def __init__(self, csv_path: str | Path, curve_path: str | Path, title: str):
        self.csv_path, self.curve_path, self.title = Path(csv_path), Path(curve_path), title
        self.rows: list[dict[str, Any]] = []
        self._bar = None

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
        if not self.rows:
            return
        last = self.rows[-1]
        last.update(val_mAP50=float(metrics[BEST_METRIC]), val_mAP=float(metrics.get("coco/bbox_mAP", 0.0)),
                    val_mAP75=float(metrics.get("coco/bbox_mAP_75", 0.0)))
        self.write()
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
          init: str, res: int, seed: int, params: Mapping[str, Any],
          imagenet_weights: str | Path | None = None) -> dict[str, Any]:
    """Train, keep the best val mAP50 checkpoint and predict the test set; returns a summary.

    ``init``: ``random``, ``imagenet`` or a backbone checkpoint path. ``params``: the ``detection``
    config section. Outputs (in ``out_dir``): see the module docstring.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir / WORK_SUBDIR
    if work_dir.exists():  # a rerun starts over; mmengine would otherwise find old checkpoints
        shutil.rmtree(work_dir)
    work_dir.mkdir()
    seed_everything(seed)
    jsons = {"train": Path(train_json), "val": Path(val_json), "test": Path(test_json)}
    coco = {split: check_coco_json(p) for split, p in jsons.items()}
    log.info("COCO JSONs: %s", ", ".join(f"{s} {len(c['images'])} images / {len(c['annotations'])} boxes"
                                         for s, c in coco.items()))

    check_cuda_ops()
    arch = params["arch"]
    checkpoint = prepare_backbone_checkpoint(init, arch, work_dir, imagenet_weights)
    use_amp = bool(params["amp"]) and torch.cuda.is_available()
    prefix = work_dir / "test_predictions"
    cfg = Config(build_config(params, train_json=jsons["train"], val_json=jsons["val"], test_json=jsons["test"],
                              work_dir=work_dir, res=res, backbone_checkpoint=checkpoint, seed=seed,
                              use_amp=use_amp, predictions_prefix=prefix))
    with atomic_path(out_dir / "mmdet_config.py") as tmp:
        cfg.dump(str(tmp))
    log.info("mmdet %s, init %s (backbone checkpoint %s), arch %s, %d px, seed %d, amp %s",
             mmdet.__version__, init, checkpoint, arch, res, seed, use_amp)

    runner = Runner.from_cfg(cfg)
    _attach_rule_log(runner.logger)
    label = init if init in ("random", "imagenet") else f"{Path(init).parent.name}/{Path(init).name}"
    hook = TrainLogHook(out_dir / "train_log.csv", out_dir / "train_curve.png",
                        f"mmdet {arch}, init {label}, {res} px, seed {seed}")
    runner.register_hook(hook)
    runner.train()

    hub = runner.message_hub
    best_ckpt, last_ckpt = hub.get_info("best_ckpt"), hub.get_info("last_ckpt")
    if not best_ckpt or not Path(best_ckpt).is_file():
        raise RuntimeError(f"mmengine saved no best checkpoint in {work_dir} (expected by {BEST_METRIC})")
    # Our own checkpoint file: written by this process, so loading it in full is safe.
    best = torch.load(best_ckpt, map_location="cpu", weights_only=False)
    meta = {
        "engine": "mmdet",
        "cfg": cfg.pretty_text,
        "classes": list(VINDR_CLASSES),
        "arch": arch,
        "init": str(init),
        "res": int(res),
        "epoch": int(best["meta"]["epoch"]),
        "val_mAP50": float(hub.get_info("best_score")),
    }
    atomic_torch_save({"engine": "mmdet", "meta": meta, "state_dict": best["state_dict"]}, out_dir / "best.pth")
    # The full mmengine checkpoint of the last epoch (optimizer included); reruns start over.
    os.replace(last_ckpt, out_dir / "last.pth")

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    model.load_state_dict(best["state_dict"])
    del best
    Path(best_ckpt).unlink()
    (work_dir / "last_checkpoint").unlink(missing_ok=True)
    runner.test()
    predictions = _read_predictions(Path(f"{prefix}.bbox.json"), coco["test"])
    atomic_write_json(predictions, out_dir / "predictions_test.json", indent=None)
    hook.write()
    summary = {"best_epoch": meta["epoch"], "best_val_mAP50": meta["val_mAP50"], "iterations": len(hook.rows),
               "n_predictions": len(predictions)}
    log.info("done: %s", summary)
    return summary


# --- heatmaps --------------------------------------------------------------------------------------

class FeaturePyramid(nn.Module):
    """ResNet + FPN returning an OrderedDict like torchvision's ``BackboneWithFPN``.

    Submodules are named ``body`` and ``fpn`` as in torchvision, so target layers such as
    ``backbone.body.layer4`` mean the same in both engines.
    """

    def __init__(self, body: nn.Module, fpn: nn.Module):
        super().__init__()
        self.body = body
        self.fpn = fpn

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.fpn(self.body(x))
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
        self.backbone = FeaturePyramid(detector.backbone, detector.neck)
        self.res = int(res)
        pre = detector.data_preprocessor
        self.register_buffer("mean", pre.mean.detach().clone().view(-1, 1, 1), persistent=False)
        self.register_buffer("std", pre.std.detach().clone().view(-1, 1, 1), persistent=False)
        self.divisor = int(getattr(pre, "pad_size_divisor", 32))

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
            # mmcv's Resize with keep_ratio: longest side to res, sizes rounded to nearest.
            scale = self.res / max(h, w)
            nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
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


def load_cam_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> MMDetCamModel:
    """The ``best.pth`` of an mmdet run as a torchvision-like detector in eval mode on ``device``."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"detector checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("engine") != "mmdet" or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not an mmdet-engine checkpoint of cxrssl (best.pth of a detection/mmdet run)")
    meta = ckpt["meta"]
    if meta.get("classes") != list(VINDR_CLASSES):
        raise ValueError(f"{path}: class table {meta.get('classes')} differs from cxrssl.classes.VINDR_CLASSES")
    cfg = Config.fromstring(meta["cfg"], file_format=".py")
    cfg.model.backbone.init_cfg = None  # the trained weights follow; never reload the init checkpoint
    detector = MODELS.build(cfg.model)
    detector.load_state_dict(ckpt["state_dict"])
    model = MMDetCamModel(detector, meta["res"])
    return model.to(device).eval()


def current_logger() -> logging.Logger:
    """mmengine's current logger (where init_cfg loading reports mismatched keys)."""
    return MMLogger.get_current_instance()
