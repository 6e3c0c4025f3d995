"""Faster R-CNN + FPN on a cxrssl ResNet, configured like the paper's mmdetection R50-FPN.

* Backbone from :func:`cxrssl.models.backbone.build_resnet` only (random, ImageNet or a checkpoint).
* ``frozen_stages`` follows mmdet: -1 nothing frozen, 0 the stem, 1 stem + ``layer1`` (paper), ...
  Frozen stages get no gradient and FrozenBatchNorm2d, so their statistics never move either.
* ``norm_eval`` (pretrained inits): every BatchNorm of the backbone is a FrozenBatchNorm2d.
* The random-init arm has no statistics worth freezing: its normalisation stays trainable
  (BatchNorm2d in train mode, or GroupNorm(32) with ``random_init_norm: groupnorm``) and nothing is
  frozen. The paper's scratch arm was mmdet's GroupNorm config (GN in neck and heads as well); we
  keep the neck and heads of the other arms so the comparison is between initialisations only.
* Labels 1..14 are the COCO category ids of :func:`cxrssl.classes.coco_categories` (0 = background).
* Images are resized so that the longest side is ``res`` (aspect kept, padded to 32), and
  normalised with ImageNet mean/std inside the model (grey images are fed as 3 equal channels).

Checkpoints carry the build arguments (``meta``) so :func:`load_trained_detector` rebuilds the
network without the config and without touching the initial weights again.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrssl.classes import VINDR_CLASSES
from cxrssl.models.backbone import build_resnet

log = logging.getLogger(__name__)

NUM_CLASSES = len(VINDR_CLASSES) + 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NORMS = ("frozen_bn", "batchnorm", "groupnorm")
#: ResNet modules of each mmdet stage: stage 0 is the stem, stage k is layer k.
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
GROUPNORM_GROUPS = 32


def trainable_layers_for(frozen_stages: int) -> int:
    """mmdet ``frozen_stages`` -> torchvision ``trainable_layers`` (1 -> 3: layer2..layer4)."""
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
    return 5 if frozen_stages < 0 else 4 - frozen_stages


def norm_kind(init: str, norm_eval: bool, random_init_norm: str) -> str:
    """Which normalisation the backbone gets for an init (see the module docstring)."""
    if init == "random":
        if random_init_norm not in ("batchnorm", "groupnorm"):
            raise ValueError(f"random_init_norm must be batchnorm or groupnorm, got {random_init_norm!r}")
        return random_init_norm
    return "frozen_bn" if norm_eval else "batchnorm"


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "batchnorm":
        return nn.BatchNorm2d
    if norm == "groupnorm":
        return partial(nn.GroupNorm, GROUPNORM_GROUPS)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _freeze_batchnorm(parent: nn.Module, names: set[str] | None = None) -> None:
    """Replace BatchNorm2d below ``parent`` (only its children ``names`` when given) by
    FrozenBatchNorm2d modules holding the same affine parameters and statistics."""
    for name, child in list(parent.named_children()):
        if names is not None and name not in names:
            continue
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
            setattr(parent, name, frozen)
        else:
            _freeze_batchnorm(child)


def _build(arch: str, norm: str, frozen_stages: int, res: int, num_classes: int, score_thr: float,
           rpn_proposals: int = 1000, rois_per_image: int = 512, backbone_init: str = "random",
           imagenet_weights: str | Path | None = None) -> FasterRCNN:
    resnet = build_resnet(arch, backbone_init, imagenet_weights=imagenet_weights, norm_layer=_norm_layer(norm))
    # mmdet puts frozen stages in eval mode; FrozenBatchNorm2d does the same once and for all.
    _freeze_batchnorm(resnet, {name for stage in _STAGES[: frozen_stages + 1] for name in stage})
    backbone = _resnet_fpn_extractor(resnet, trainable_layers_for(frozen_stages))
    return FasterRCNN(
        backbone,
        num_classes=num_classes,
        min_size=res,
        max_size=res,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        box_score_thresh=score_thr,
        box_detections_per_img=100,
        rpn_pre_nms_top_n_train=2000,  # mmdet: nms_pre 2000 / max_per_img 1000 (train), 1000 / 1000 (test)
        rpn_post_nms_top_n_train=rpn_proposals,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=rpn_proposals,
        box_batch_size_per_image=rois_per_image,
        box_positive_fraction=0.25,
    )


def build_detector(arch: str, init: str, num_classes: int = NUM_CLASSES, res: int = 640, frozen_stages: int = 1,
                   norm_eval: bool = True, random_init_norm: str = "batchnorm",
                   imagenet_weights: str | Path | None = None, score_thr: float = 0.001,
                   rpn_proposals: int = 1000, rois_per_image: int = 512) -> FasterRCNN:
    """Faster R-CNN + FPN whose ResNet starts from ``init`` (random, imagenet or a checkpoint path).

    The random-init arm ignores ``frozen_stages`` and ``norm_eval`` (nothing to preserve).
    ``score_thr`` is the lowest score the model returns; ``rpn_proposals`` is the number of RPN
    proposals per image (train and test), ``rois_per_image`` only matters in training.
    """
    meta = build_meta(arch, init, num_classes, res, frozen_stages, norm_eval, random_init_norm, score_thr,
                      rpn_proposals, rois_per_image)
    model = _build(arch, meta["norm"], meta["frozen_stages"], res, num_classes, score_thr,
                   rpn_proposals, rois_per_image, backbone_init=init, imagenet_weights=imagenet_weights)
    log.info("built Faster R-CNN %s init=%s norm=%s frozen_stages=%d res=%d", arch, init, meta["norm"],
             meta["frozen_stages"], res)
    return model


def build_meta(arch: str, init: str, num_classes: int, res: int, frozen_stages: int, norm_eval: bool,
               random_init_norm: str, score_thr: float, rpn_proposals: int = 1000,
               rois_per_image: int = 512) -> dict[str, Any]:
    """The build arguments stored in every checkpoint (enough to rebuild the architecture)."""
    norm = norm_kind(init, norm_eval, random_init_norm)
    return {
        "arch": arch,
        "init": str(init),
        "norm": norm,
        "frozen_stages": -1 if init == "random" else int(frozen_stages),
        "res": int(res),
        "num_classes": int(num_classes),
        "score_thr": float(score_thr),
        "rpn_proposals": int(rpn_proposals),
        "rois_per_image": int(rois_per_image),
        "classes": list(VINDR_CLASSES),
    }


def detector_from_meta(meta: dict[str, Any]) -> FasterRCNN:
    """The architecture described by ``meta`` with untouched (random) weights."""
    if meta.get("classes") != list(VINDR_CLASSES):
        raise ValueError(f"checkpoint class table {meta.get('classes')} differs from cxrssl.classes.VINDR_CLASSES")
    return _build(meta["arch"], meta["norm"], meta["frozen_stages"], meta["res"], meta["num_classes"],
                  meta["score_thr"], meta.get("rpn_proposals", 1000), meta.get("rois_per_image", 512))


def load_trained_detector(checkpoint_path: str | Path, device: str | torch.device = "cpu"
                          ) -> tuple[FasterRCNN, dict[str, Any]]:
    """A trained detector (``best.pth`` or ``last.pth``) in eval mode on ``device``, and its meta."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"detector checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise ValueError(f"{path}: not a cxrssl detector checkpoint (needs 'model' and 'meta')")
    try:
        model = detector_from_meta(ckpt["meta"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    meta = dict(ckpt["meta"])
    meta.update({k: ckpt[k] for k in ("epoch", "val_mAP50") if k in ckpt})
    return model, meta
