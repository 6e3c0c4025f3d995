"""A lung-segmentation network on any registered backbone: the backbone's multi-scale features and
a light FPN-style decoder (lateral 1x1 convs, top-down upsample-and-add, a 3x3 conv, one logit map
at stride 4, upsampled to the input).

* ResNets: the outputs of ``layer1``..``layer4`` (strides 4..32).
* ViTs: the token map of the last block (:class:`cxrssl.detection.vitdet.ViTFeatureMap`, CLS and
  register tokens dropped, position embedding resampled to the input grid) under ViTDet's simple
  feature pyramid (:class:`cxrssl.detection.vitdet.SimpleFeaturePyramid`) for strides 4..32.

The backbone is the init's (its ``backbone.json``), else ``arch``; a ViT is built at the image
size it was pretrained at (its stored position embedding loads as is).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

log = logging.getLogger(__name__)

RESNET_LEVELS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}


class ResNetLevels(nn.Module):
    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, RESNET_LEVELS)
        width = resnet.inplanes // 8  # layer1's width (64 for ResNet-18/34, 256 for ResNet-50)
        self.channels = [width * 2 ** i for i in range(4)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.body(x)


class ViTLevels(nn.Module):
    def __init__(self, vit: nn.Module, width: int):
        super().__init__()
        from cxrssl.detection.vitdet import SimpleFeaturePyramid, ViTFeatureMap

        self.body = ViTFeatureMap(vit)
        self.fpn = SimpleFeaturePyramid(self.body.out_channels, self.body.patch_size, out_channels=width)
        self.channels = [width] * 4

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = self.fpn(self.body(x))
        return OrderedDict((k, levels[k]) for k in ("0", "1", "2", "3"))


class LungSegmenter(nn.Module):
    """Backbone levels -> FPN decoder -> one logit per pixel (lung), at the input's size."""

    def __init__(self, levels: nn.Module, width: int = 64):
        super().__init__()
        self.levels = levels
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in levels.channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU())
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = list(self.levels(x).values())
        p = self.lateral[-1](feats[-1])
        for lateral, feat in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            p = F.interpolate(p, size=feat.shape[-2:], mode="nearest") + lateral(feat)
        logits = self.head(self.smooth(p))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def build_segmenter(arch: str, init: str, image_size: int, width: int = 64,
                    imagenet_weights: str | Path | None = None) -> tuple[LungSegmenter, str]:
    """The segmenter for ``init`` (random, imagenet or a backbone checkpoint) and the arch built."""
    from cxrssl.detection.model import is_vit, resolve_arch, vit_image_size
    from cxrssl.models.backbones import build_backbone

    arch = resolve_arch(arch, init)
    if is_vit(arch):
        size = vit_image_size(arch, init) if init not in ("random", "imagenet") else image_size
        encoder = build_backbone(arch, init, imagenet_weights=imagenet_weights, image_size=size)
        levels = ViTLevels(encoder, width)
    else:
        levels = ResNetLevels(build_backbone(arch, init, imagenet_weights=imagenet_weights))
    return LungSegmenter(levels, width), arch
