"""Image side: a backbone's feature map -> one global vector and a set of region features.

Any backbone that maps ``(B, 3, H, W)`` images to a ``(B, C, h, w)`` feature map and says its
``out_channels`` fits (:class:`FeatureMapBackbone`); each of the ``h * w`` cells is a region.
:class:`ResNetFeatureMap` is the torchvision ResNet up to its last conv stage (``layer4``, the
paper's local features); a ViT fits by reshaping its patch tokens to the patch grid.

``output_stride=16`` turns layer4's stride-2 convolutions into stride 1 (a finer region grid:
7x7 -> 14x14 at 224 px). Strides are not weights: the state dict stays torchvision's and loads
into a standard ResNet (whose layer4 then runs at stride 32 again, as detection backbones do).

Which map gives the regions (``local_features``): ``layer4``, the last conv map (the paper's), or
``layer3``, the intermediate one (GLoRIA's local features: a smaller receptive field, and stride 16
without touching layer4's strides). The global vector is always the pooled last map.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from cxrssl.models.backbone import FEATURE_DIMS, backbone_state_dict, build_resnet


@runtime_checkable
class FeatureMapBackbone(Protocol):
    """What the image encoder needs of a backbone: ``forward(x) -> (B, C, h, w)`` and ``C``; for
    ``local_features="layer3"`` also ``stages(x) -> (intermediate map, last map)`` and
    ``mid_channels``."""

    out_channels: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class ResNetFeatureMap(nn.Module):
    """A torchvision ResNet's last conv map (``fc`` dropped, ``avgpool`` unused)."""

    def __init__(self, resnet: nn.Module, arch: str, output_stride: int = 32):
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        resnet.fc = nn.Identity()
        self.resnet, self.arch, self.output_stride = resnet, arch, output_stride
        self.out_channels = FEATURE_DIMS[arch]
        self.mid_channels = self.out_channels // 2  # layer3's width: every ResNet doubles it at layer4
        if output_stride == 16:
            block = resnet.layer4[0]
            conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides in conv2
            conv.stride = (1, 1)
            block.downsample[0].stride = (1, 1)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer3 map, layer4 map)."""
        r = self.resnet
        mid = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))
        return mid, r.layer4(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[1]

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """torchvision-format state dict without ``fc`` (what linear evaluation and detection load)."""
        return backbone_state_dict(self.resnet)


def resnet_feature_map(arch: str, init: str = "random", imagenet_weights=None, output_stride: int = 32):
    """A :class:`ResNetFeatureMap` built through the project's backbone factory (any ``init``)."""
    return ResNetFeatureMap(build_resnet(arch, init, imagenet_weights), arch, output_stride)


LOCAL_FEATURES = ("layer4", "layer3")


class ImageEncoder(nn.Module):
    """Backbone feature map -> global embedding (mean-pooled map, linear) and region embeddings (1x1 conv).

    Separate projections for the global and local spaces, as in GLoRIA: the report-level and the
    sentence-level alignment need not agree on one space. ``local_features``: the map the regions
    come from (module doc).
    """

    def __init__(self, backbone: FeatureMapBackbone, embed_dim: int, local_features: str = "layer4"):
        super().__init__()
        if local_features not in LOCAL_FEATURES:
            raise ValueError(f"local_features must be one of {LOCAL_FEATURES}, got {local_features!r}")
        if local_features == "layer3" and not hasattr(backbone, "stages"):
            raise ValueError(f"local_features: layer3 needs a backbone with stages(); {type(backbone).__name__} has none")
        self.backbone, self.local_features = backbone, local_features
        width = backbone.out_channels if local_features == "layer4" else backbone.mid_channels
        self.global_head = nn.Linear(backbone.out_channels, embed_dim)
        self.local_head = nn.Conv2d(width, embed_dim, kernel_size=1)

    def _maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(map of the regions, last map)."""
        if self.local_features == "layer4":
            fmap = self.backbone(x)
            return fmap, fmap
        return self.backbone.stages(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(global ``(B, D)``, regions ``(B, h*w, D)`` row-major, grid ``(h, w)``)."""
        local, fmap = self._maps(x)
        return self.global_head(fmap.mean(dim=(2, 3))), *self._local(local)

    def _local(self, fmap: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        local = self.local_head(fmap)
        return local.flatten(2).transpose(1, 2), tuple(local.shape[-2:])

    def regions(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """Per space, region features ``(B, h*w, D)`` and their grid, from one backbone pass:
        ``local`` (the local head) and ``global`` (the global head at every location of the last
        map: their mean is the global embedding, the head being linear, so each is a region's share
        of the image-report similarity, a CAM of the global alignment). The grids differ when the
        regions come from layer3 of a stride-32 backbone."""
        local, fmap = self._maps(x)
        return {"local": self._local(local),
                "global": (self.global_head(fmap.flatten(2).transpose(1, 2)), tuple(fmap.shape[-2:]))}


def region_map(similarity: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-region scores ``(..., h*w)`` -> bilinear maps ``(..., H, W)`` at image size."""
    lead = similarity.shape[:-1]
    maps = similarity.reshape(-1, 1, *grid).float()
    up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return up.reshape(*lead, *size)
