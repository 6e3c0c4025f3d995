"""Faster R-CNN + FPN on a cxrssl ResNet, configured like the paper's mmdetection R50-FPN.

* Backbone from :func:`cxrssl.models.backbone.build_resnet` (random, ImageNet or a checkpoint), or a
  registered ViT under ViTDet's simple feature pyramid (:mod:`cxrssl.detection.vitdet`) feeding
  the same heads; an init's ``backbone.json`` sidecar decides which (:func:`resolve_arch`).
* ``frozen_stages`` follows mmdet: -1 nothing frozen, 0 the stem, 1 stem + ``layer1`` (paper), ...
  Frozen stages get no gradient and FrozenBatchNorm2d, so their statistics never move either.
* ``norm_eval`` (pretrained inits) is mmdet's: the BatchNorms of the stages that train stay in eval
  mode (running statistics frozen) while their affine weight and bias keep training
  (:class:`EvalBatchNorm2d`), not torchvision's FrozenBatchNorm2d, which freezes those too.
* The random-init arm has no statistics worth freezing: its normalisation stays trainable
  (BatchNorm2d in train mode, or GroupNorm(32) with ``random_init_norm: groupnorm``) and nothing is
  frozen. The paper's scratch arm was mmdet's GroupNorm config (GN in neck and heads as well); we
  keep the neck and heads of the other arms so the comparison is between initialisations only.
* Heads as mmdet's R50-FPN: L1 box losses in the RPN and the RoI head (torchvision: smooth-L1 with
  beta 1/9), the RPN's low-quality matches only from IoU 0.3 (``min_pos_iou``), RoIAlign with an
  adaptive sampling ratio (``sampling_ratio=0``). What still differs is listed in docs/engines.md.
* Precision (:func:`set_precision`): bf16 autocast, when asked, covers the backbone and the FPN only;
  their outputs become fp32 and the RPN and RoI heads run in fp32, so proposals and boxes are fp32
  (torchvision's BoxCoder decodes in the dtype of the regression output: bf16 would round boxes to
  2-4 px at 256-1024 px).
* Labels 1..14 are the COCO category ids of :func:`cxrssl.classes.coco_categories` (0 = background).
* Images are resized so that the longest side is ``res`` (aspect kept, padded to 32), and
  normalised with ImageNet mean/std inside the model (grey images are fed as 3 equal channels).

Checkpoints carry the build arguments (``meta``) so :func:`load_trained_detector` rebuilds the
network without the config and without touching the initial weights again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrssl.classes import VINDR_CLASSES
from cxrssl.detection.vitdet import FPN_CHANNELS  # the width of both pyramids (mmdet: 256)
from cxrssl.models.backbone import build_resnet

log = logging.getLogger(__name__)

NUM_CLASSES = len(VINDR_CLASSES) + 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
#: ``frozen_bn`` is what format-1 checkpoints of norm_eval runs hold (torchvision's FrozenBatchNorm2d);
#: ``layernorm`` marks a ViT backbone (its own LayerNorms and the pyramid's, nothing frozen).
NORMS = ("eval_bn", "batchnorm", "groupnorm", "frozen_bn", "layernorm")
#: ViT detectors: the image size the ViT is built at when its init says none (random).
VIT_DEFAULT_IMAGE_SIZE = 224
#: ResNet modules of each mmdet stage: stage 0 is the stem, stage k is layer k.
_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
GROUPNORM_GROUPS = 32
#: mmdet R50-FPN head settings (faster-rcnn_r50_fpn.py) that are not cxrssl settings.
RPN_POS_IOU, RPN_NEG_IOU, RPN_MIN_POS_IOU = 0.7, 0.3, 0.3
RPN_SAMPLES, RPN_POS_FRACTION, RPN_NMS = 256, 0.5, 0.7
RPN_PRE_NMS_TRAIN, RPN_PRE_NMS_TEST = 2000, 1000
ROI_IOU, ROI_POS_FRACTION, ROI_NMS, MAX_DETECTIONS = 0.5, 0.25, 0.5, 100
ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO = 7, 0


def trainable_layers_for(frozen_stages: int) -> int:
    """mmdet ``frozen_stages`` -> torchvision ``trainable_layers`` (1 -> 3: layer2..layer4)."""
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
    return 5 if frozen_stages < 0 else 4 - frozen_stages


def is_vit(arch: str) -> bool:
    """Whether ``arch`` is a registered ViT (a ViTDet detector) rather than a ResNet."""
    from cxrssl.models.backbones import get_spec

    return get_spec(arch).family == "vit"


def resolve_arch(arch: str, init: str) -> str:
    """The backbone a detector with ``init`` builds: the arch of the init's ``backbone.json``
    sidecar when it has one (a pretraining export), else ``arch`` (``detection.arch``)."""
    from cxrssl.models.backbones import checkpoint_arch

    built = checkpoint_arch(str(init), arch)
    if built != arch:
        log.info("init %s is a %s backbone (its backbone.json): building that, not detection.arch %s",
                 init, built, arch)
    return built


def vit_image_size(arch: str, init: str) -> int:
    """The image size a ViT detector's encoder is built at: its pretraining's (the sidecar's
    ``image_size``, so the stored position embedding loads as is), else the default."""
    from cxrssl.models.backbones import read_sidecar

    if init not in ("random", "imagenet"):
        meta = read_sidecar(init)
        if meta is not None:
            return int(meta["image_size"])
    return VIT_DEFAULT_IMAGE_SIZE


def norm_kind(init: str, norm_eval: bool, random_init_norm: str, arch: str | None = None) -> str:
    """Which normalisation the backbone gets for an init (see the module docstring)."""
    if arch is not None and is_vit(arch):
        return "layernorm"
    if init == "random":
        if random_init_norm not in ("batchnorm", "groupnorm"):
            raise ValueError(f"random_init_norm must be batchnorm or groupnorm, got {random_init_norm!r}")
        return random_init_norm
    return "eval_bn" if norm_eval else "batchnorm"


class EvalBatchNorm2d(nn.BatchNorm2d):
    """mmdet's ``norm_eval=True``: always in eval mode (normalises with the running statistics and
    never updates them) while ``weight`` and ``bias`` stay trainable parameters."""

    def train(self, mode: bool = True):
        return super().train(False)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "eval_bn":
        return EvalBatchNorm2d
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


# --- precision --------------------------------------------------------------------------------------

class MixedPrecisionFPN(BackboneWithFPN):
    """torchvision's ResNet + FPN; with ``autocast_device`` set it runs under bf16 autocast on that
    device type and hands fp32 feature maps on, so everything after it (RPN, RoI heads) is fp32."""

    autocast_device: str | None = None

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.autocast_device is None:
            return super().forward(x)
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
            features = super().forward(x)
        return OrderedDict((k, v.float()) for k, v in features.items())


def autocast_device_for(device_type: str, amp: bool) -> str | None:
    """The engines' policy: bf16 autocast of the backbone and FPN on CUDA when ``amp``, else none
    (bf16 on a CPU is slow and not the paper's)."""
    return "cuda" if amp and device_type == "cuda" else None


def compile_backbone(model: nn.Module, device: torch.device | None = None, mode: str | None = None,
                     backend: str = "inductor") -> nn.Module:
    """``detection.compile``: the backbone + FPN of ``model`` through torch.compile, in place.

    Only the backbone: its input is the padded batch (a fixed size at one ``res``), while the RPN
    and RoI heads work on data-dependent numbers of boxes (graph breaks, recompiles). State dict
    keys do not change, so checkpoints of compiled and eager runs are interchangeable.
    """
    from cxrssl.runtime import compile_module

    if not isinstance(model.backbone, MixedPrecisionFPN):
        raise TypeError(f"the detector's backbone is a {type(model.backbone).__name__}, not a MixedPrecisionFPN")
    device = device if device is not None else next(model.parameters()).device
    compile_module(model.backbone, "detection.compile", torch.device(device), mode, backend)
    return model


def set_precision(model: nn.Module, autocast_device: str | None) -> None:
    """Run the backbone + FPN of ``model`` under bf16 autocast on ``autocast_device`` (None: fp32).

    Any device type autocast supports works (the tests use ``"cpu"``); the heads stay fp32.
    """
    from cxrssl.detection.vitdet import ViTDetBackbone

    backbone = model.backbone
    if not isinstance(backbone, (MixedPrecisionFPN, ViTDetBackbone)):
        raise TypeError(f"the detector's backbone is a {type(backbone).__name__}, not a MixedPrecisionFPN "
                        "or ViTDetBackbone")
    backbone.autocast_device = autocast_device


# --- heads as mmdet's R50-FPN -------------------------------------------------------------------------

class MinIoUMatcher(Matcher):
    """torchvision's Matcher with mmdet's ``min_pos_iou``: a ground-truth box's best anchors become
    positive (low-quality matches) only when that best IoU is at least ``min_pos_iou``."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = float(min_pos_iou)

    def set_low_quality_matches_(self, matches, all_matches, match_quality_matrix):
        best_per_gt, _ = match_quality_matrix.max(dim=1)
        good = best_per_gt >= self.min_pos_iou
        pairs = torch.where((match_quality_matrix == best_per_gt[:, None]) & good[:, None])
        matches[pairs[1]] = all_matches[pairs[1]]


class L1RegionProposalNetwork(RegionProposalNetwork):
    """The RPN with mmdet's L1 box loss (averaged over the sampled anchors, as torchvision's)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        neg = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled],
                                                             torch.cat(labels, dim=0)[sampled])
        return objectness_loss, box_loss


class L1RoIHeads(RoIHeads):
    """Box-only RoI heads with mmdet's L1 box loss (sum over the positives' class-specific deltas
    divided by the number of sampled RoIs, as torchvision's smooth-L1 and mmdet's L1)."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            labels = torch.cat(labels, dim=0)
            regression_targets = torch.cat(regression_targets, dim=0)
            loss_classifier = F.cross_entropy(class_logits, labels)
            pos = torch.where(labels > 0)[0]
            deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]
            loss_box_reg = F.l1_loss(deltas, regression_targets[pos], reduction="sum") / labels.numel()
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)], {}


class Detector(FasterRCNN):
    """torchvision's FasterRCNN (same modules and state dict) that tells the CAM where an input lands."""

    @torch.no_grad()
    def input_geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(resized height, width, padded height, width) of a ``height`` x ``width`` input inside the
        model: exactly what its own transform does (aspect-kept resize, padding to 32)."""
        batch, _ = self.transform([torch.zeros(3, int(height), int(width))])
        (rh, rw), (ph, pw) = batch.image_sizes[0], batch.tensors.shape[-2:]
        return int(rh), int(rw), int(ph), int(pw)


def _fpn_backbone(resnet: nn.Module, trainable_layers: int, channels: int = FPN_CHANNELS) -> MixedPrecisionFPN:
    """torchvision's ResNet-FPN extractor (same modules and freezing; ``channels`` wide) as a MixedPrecisionFPN."""
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers.append("bn1")
    for name, parameter in resnet.named_parameters():
        if not any(name.startswith(layer) for layer in layers):
            parameter.requires_grad_(False)
    width = resnet.inplanes // 8
    return MixedPrecisionFPN(resnet, {f"layer{k}": str(k - 1) for k in range(1, 5)},
                             [width * 2 ** i for i in range(4)], channels, extra_blocks=LastLevelMaxPool())


def _vitdet_backbone(arch: str, init: str, imagenet_weights: str | Path | None, image_size: int,
                     channels: int = FPN_CHANNELS) -> nn.Module:
    """A registered ViT from ``init`` (built at ``image_size``) under ViTDet's simple feature pyramid."""
    from cxrssl.detection.vitdet import ViTDetBackbone
    from cxrssl.models.backbones import build_backbone

    return ViTDetBackbone(build_backbone(arch, init, imagenet_weights=imagenet_weights, image_size=image_size),
                          channels)


def _build(arch: str, norm: str, frozen_stages: int, res: int, num_classes: int, score_thr: float,
           rpn_proposals: int = 1000, rois_per_image: int = 512, backbone_init: str = "random",
           imagenet_weights: str | Path | None = None, vit_image_size: int = VIT_DEFAULT_IMAGE_SIZE,
           fpn_channels: int = FPN_CHANNELS) -> Detector:
    if is_vit(arch):
        if norm != "layernorm":
            raise ValueError(f"a {arch} detector has norm layernorm, not {norm!r}")
        backbone = _vitdet_backbone(arch, backbone_init, imagenet_weights, vit_image_size, fpn_channels)
    else:
        resnet = build_resnet(arch, backbone_init, imagenet_weights=imagenet_weights, norm_layer=_norm_layer(norm))
        # mmdet puts frozen stages in eval mode; FrozenBatchNorm2d does the same once and for all.
        _freeze_batchnorm(resnet, {name for stage in _STAGES[: frozen_stages + 1] for name in stage})
        backbone = _fpn_backbone(resnet, trainable_layers_for(frozen_stages), fpn_channels)
    model = Detector(
        backbone,
        num_classes=num_classes,
        min_size=res,
        max_size=res,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=ROI_OUTPUT_SIZE,
                                        sampling_ratio=ROI_SAMPLING_RATIO),
        box_score_thresh=score_thr,
        box_detections_per_img=MAX_DETECTIONS,
    )
    # The heads of torchvision's constructor, rebuilt as mmdet's (same submodules and state dict).
    rpn = model.rpn
    model.rpn = L1RegionProposalNetwork(
        rpn.anchor_generator, rpn.head, RPN_POS_IOU, RPN_NEG_IOU, RPN_SAMPLES, RPN_POS_FRACTION,
        pre_nms_top_n={"training": RPN_PRE_NMS_TRAIN, "testing": RPN_PRE_NMS_TEST},  # mmdet's nms_pre
        post_nms_top_n={"training": rpn_proposals, "testing": rpn_proposals},  # mmdet's max_per_img
        nms_thresh=RPN_NMS)
    model.rpn.proposal_matcher = MinIoUMatcher(RPN_POS_IOU, RPN_NEG_IOU, RPN_MIN_POS_IOU)
    heads = model.roi_heads
    model.roi_heads = L1RoIHeads(heads.box_roi_pool, heads.box_head, heads.box_predictor, ROI_IOU, ROI_IOU,
                                 rois_per_image, ROI_POS_FRACTION, None, score_thr, ROI_NMS, MAX_DETECTIONS)
    return model


def build_detector(arch: str, init: str, num_classes: int = NUM_CLASSES, res: int = 640, frozen_stages: int = 1,
                   norm_eval: bool = True, random_init_norm: str = "batchnorm",
                   imagenet_weights: str | Path | None = None, score_thr: float = 0.001,
                   rpn_proposals: int = 1000, rois_per_image: int = 512, fpn_channels: int = FPN_CHANNELS) -> Detector:
    """Faster R-CNN + FPN whose backbone starts from ``init`` (random, imagenet or a checkpoint path).

    The backbone is the init's (its ``backbone.json`` sidecar, :func:`resolve_arch`), else ``arch``.
    A ViT gets ViTDet's simple feature pyramid (:mod:`cxrssl.detection.vitdet`) under the same heads;
    ``frozen_stages`` and ``norm_eval`` are ResNet settings (a ViT trains whole, its LayerNorms too).
    The random-init arm ignores ``frozen_stages`` and ``norm_eval`` (nothing to preserve).
    ``score_thr`` is the lowest score the model returns; ``rpn_proposals`` is the number of RPN
    proposals per image (train and test), ``rois_per_image`` only matters in training;
    ``fpn_channels`` is the width of the pyramid, the RPN head and the RoI features (mmdet: 256).
    """
    arch = resolve_arch(arch, init)
    meta = build_meta(arch, init, num_classes, res, frozen_stages, norm_eval, random_init_norm, score_thr,
                      rpn_proposals, rois_per_image, fpn_channels)
    model = _build(arch, meta["norm"], meta["frozen_stages"], res, num_classes, score_thr,
                   rpn_proposals, rois_per_image, backbone_init=init, imagenet_weights=imagenet_weights,
                   vit_image_size=meta.get("vit_image_size", VIT_DEFAULT_IMAGE_SIZE), fpn_channels=fpn_channels)
    log.info("built Faster R-CNN %s init=%s norm=%s frozen_stages=%d res=%d", arch, init, meta["norm"],
             meta["frozen_stages"], res)
    return model


def build_meta(arch: str, init: str, num_classes: int, res: int, frozen_stages: int, norm_eval: bool,
               random_init_norm: str, score_thr: float, rpn_proposals: int = 1000,
               rois_per_image: int = 512, fpn_channels: int = FPN_CHANNELS) -> dict[str, Any]:
    """The architecture arguments stored in every torchvision-engine checkpoint (``arch`` is the one
    built: pass it through :func:`resolve_arch`). A ViT's also say the image size its encoder was
    built at (the grid of its stored position embedding) and its patch size."""
    norm = norm_kind(init, norm_eval, random_init_norm, arch)
    vit = is_vit(arch)
    extra: dict[str, Any] = {}
    if vit:
        from cxrssl.models.backbones import get_spec

        extra = {"vit_image_size": vit_image_size(arch, str(init)), "patch_size": int(get_spec(arch).patch_size),
                 "neck": "simple_feature_pyramid"}
    return {
        "arch": arch,
        "init": str(init),
        "norm": norm,
        "frozen_stages": -1 if init == "random" or vit else int(frozen_stages),
        "res": int(res),
        "num_classes": int(num_classes),
        "score_thr": float(score_thr),
        "rpn_proposals": int(rpn_proposals),
        "rois_per_image": int(rois_per_image),
        "fpn_channels": int(fpn_channels),
        "classes": list(VINDR_CLASSES),
        **extra,
    }


def detector_from_meta(meta: dict[str, Any], score_thr: float | None = None) -> Detector:
    """The architecture described by ``meta`` with untouched (random) weights."""
    if meta.get("classes") != list(VINDR_CLASSES):
        raise ValueError(f"checkpoint class table {meta.get('classes')} differs from cxrssl.classes.VINDR_CLASSES")
    if meta["norm"] not in NORMS:
        raise ValueError(f"unknown norm {meta['norm']!r} in the checkpoint meta")
    return _build(meta["arch"], meta["norm"], meta["frozen_stages"], meta["res"], meta["num_classes"],
                  meta["score_thr"] if score_thr is None else float(score_thr),
                  meta.get("rpn_proposals", 1000), meta.get("rois_per_image", 512),
                  vit_image_size=int(meta.get("vit_image_size", VIT_DEFAULT_IMAGE_SIZE)),
                  fpn_channels=int(meta.get("fpn_channels", FPN_CHANNELS)))


def load_trained_detector(checkpoint_path: str | Path, device: str | torch.device = "cpu"
                          ) -> tuple[Detector, dict[str, Any]]:
    """A trained torchvision-engine detector (``best.pth`` or ``last.pth``) in eval mode, and its meta.

    Loads through :func:`cxrssl.detection.engines.load_detector` (tensors and plain data only; a
    file it refuses is a BadInputError naming it); the checkpoint must be the torchvision engine's.
    """
    from cxrssl.detection.engines import load_detector

    model, meta = load_detector(checkpoint_path, device)
    if meta["engine"] != "torchvision":
        raise ValueError(f"{checkpoint_path}: a {meta['engine']} checkpoint, not the torchvision engine's "
                         "(use cxrssl.detection.engines.load_detector for any engine)")
    return model, meta
