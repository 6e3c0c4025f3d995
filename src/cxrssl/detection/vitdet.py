"""ViTDet's simple feature pyramid on a registered timm ViT, for the torchvision Faster R-CNN heads.

Li, Mao, Girshick & He, *Exploring Plain Vision Transformer Backbones for Object Detection*
(ECCV 2022), section 3 and detectron2's ``SimpleFeaturePyramid``: the pyramid is built from the
ViT's **last** feature map alone (stride = the patch size ``p``):

* stride 4 and 8: stride-2 transposed convolutions (two for ``p / 4 = 4``: deconv, LayerNorm,
  GELU, deconv; one for ``p / s = 2``), each halving the width;
* stride ``p``: the map itself; coarser strides: 2x2 max-pooling (once per halving);
* every level then a 1x1 conv and a 3x3 conv to 256 channels, each followed by a channel
  LayerNorm (no bias in the convolutions, as detectron2's ``Conv2d`` with a norm);
* P6 ("pool") from P5 by torchvision's :class:`LastLevelMaxPool`, as its ResNet-FPN does.

Levels come out as torchvision's ``BackboneWithFPN`` names them (``"0"`` .. ``"3"``, ``"pool"``,
strides 4..64, 256 channels), so the same RPN, anchors, RoIAlign and heads of
:mod:`cxrssl.detection.model` run unchanged on them. With 16-px patches this is the paper's
design; with 8-px patches (the demo's ``vit_tiny_patch8``) stride 4 needs one deconvolution and
stride 32 two poolings.

Position embeddings: the ViT is built with ``dynamic_img_size=True`` at the image size it was
pretrained at (its stored ``pos_embed`` keeps that grid), and timm's ``resample_abs_pos_embed``
interpolates the embedding to each input's patch grid on every forward pass (the detector pads
every batch to a multiple of 32, so grids differ between batches and from the pretraining one).

:class:`ViTFeatureMap` is the encoder part (the CAM may target it: ``backbone.body`` returns a
``(B, C, H/p, W/p)`` map); :func:`tokens_to_map` / :class:`TokenReshape` turn a ViT token
sequence into such a map, dropping the CLS and register tokens.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

#: Output strides of the four pyramid levels before P6 (ViTDet's P2..P5).
STRIDES = (4, 8, 16, 32)
#: Width of the pyramid levels, the RPN head and the RoI features (mmdet R50-FPN: 256; `detection.fpn_channels`).
FPN_CHANNELS = 256


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """``(B, prefix + H*W, C)`` ViT tokens -> ``(B, C, H, W)``, dropping the ``num_prefix_tokens``
    CLS / register tokens first."""
    height, width = int(grid[0]), int(grid[1])
    patches = tokens[:, num_prefix_tokens:]
    if patches.shape[1] != height * width:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill a {height}x{width} grid "
                         f"(after dropping {num_prefix_tokens} prefix tokens of {tokens.shape[1]})")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


class TokenReshape:
    """grad-cam ``reshape_transform`` for a ViT layer that outputs tokens (a block, the final norm).

    ``grid`` is the patch grid of the current input (set it per image, e.g. ``(H // p, W // p)``);
    without one the patch tokens must fill a square grid.
    """

    def __init__(self, num_prefix_tokens: int, grid: tuple[int, int] | None = None):
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.grid = grid

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = self.grid
        if grid is None:
            side = math.isqrt(tokens.shape[1] - self.num_prefix_tokens)
            grid = (side, side)
        return tokens_to_map(tokens, grid, self.num_prefix_tokens)


class ViTFeatureMap(nn.Module):
    """A timm ViT (``dynamic_img_size=True``) -> its last feature map ``(B, C, H/p, W/p)``.

    timm's own steps (patch embedding, position embedding resampled to the input's grid, blocks,
    final norm), then the patch tokens reshaped to the grid. ``vit`` keeps its timm state dict
    (``body.vit.*`` in the detector), so a pretraining export loads into it unchanged.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if not getattr(vit, "dynamic_img_size", False):
            raise ValueError("the ViT must be built with dynamic_img_size=True (any input grid)")
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.out_channels = int(vit.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)  # (B, H, W, C): dynamic_img_size keeps the grid
        grid = x.shape[1:3]
        x = vit._pos_embed(x)  # resample_abs_pos_embed to this grid
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        return tokens_to_map(x, grid, vit.num_prefix_tokens)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (detectron2's ``LayerNorm`` in ViTDet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _scale_stage(channels: int, patch_size: int, stride: int) -> tuple[nn.Module, int]:
    """The resampling of one level (stride ``patch_size`` -> ``stride``) and its output width."""
    ratio = patch_size / stride
    steps = round(math.log2(ratio)) if ratio > 0 else 0
    if ratio <= 0 or 2.0 ** steps != ratio:
        raise ValueError(f"stride {stride} is not a power-of-two rescaling of the patch size {patch_size}")
    layers: list[nn.Module] = []
    if steps > 0:  # upsample: deconv (LN, GELU, deconv ...), halving the width each time
        for i in range(steps):
            if i:
                layers += [LayerNorm2d(channels), nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
            channels //= 2
    for _ in range(-steps):  # downsample: 2x2 max-pooling
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers), channels


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one ``(B, C, H/p, W/p)`` map: levels at :data:`STRIDES` and P6."""

    def __init__(self, in_channels: int, patch_size: int, out_channels: int = FPN_CHANNELS,
                 strides: tuple[int, ...] = STRIDES):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.scales = nn.ModuleList()
        self.convs = nn.ModuleList()
        for stride in self.strides:
            scale, width = _scale_stage(in_channels, patch_size, stride)
            self.scales.append(scale)
            self.convs.append(nn.Sequential(
                nn.Conv2d(width, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels)))
        self.extra_blocks = LastLevelMaxPool()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        levels = [conv(scale(x)) for scale, conv in zip(self.scales, self.convs)]
        names = [str(i) for i in range(len(levels))]
        levels, names = self.extra_blocks(levels, [], names)
        return OrderedDict(zip(names, levels))


class ViTDetBackbone(nn.Module):
    """ViT + simple feature pyramid: what :class:`torchvision.models.detection.FasterRCNN` takes as
    its backbone (``out_channels`` 256, an OrderedDict of levels ``"0"``..``"3"``, ``"pool"``).

    ``autocast_device`` as :class:`cxrssl.detection.model.MixedPrecisionFPN`'s: bf16 autocast of the
    ViT and the pyramid on that device type, fp32 levels handed to the heads.
    """

    autocast_device: str | None = None

    def __init__(self, vit: nn.Module, out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = ViTFeatureMap(vit)
        self.fpn = SimpleFeaturePyramid(self.body.out_channels, self.body.patch_size, out_channels)
        self.out_channels = out_channels

    def _forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.autocast_device is None:
            return self._forward(x)
        with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
            features = self._forward(x)
        return OrderedDict((k, v.float()) for k, v in features.items())
