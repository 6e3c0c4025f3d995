"""Ablation-CAM for detectors through the grad-cam package, made fast enough for a CPU.

The library's recipe for Faster R-CNN (``AblationCAM`` on ``model.backbone`` with
``AblationLayerFasterRCNN`` and ``fasterrcnn_reshape_transform``) ablates every FPN channel (1,280
for five 256-channel levels), one full RPN + ROI-head pass per channel: ~250 s per 512-px image on a
CPU. :class:`FastAblationCAM` keeps the library's scoring (``FasterRCNNBoxScoreTarget``), its
ablation value and its weights ``(score - ablated score) / score``, and differs only in

* which channels it ablates: the ``ceil(ratio x C)`` channels with the largest activation mass
  ``sum |A_k|`` (a channel's contribution to the map is weight x activation, so weak channels add
  little). The library's ``ratio_channels_to_ablate=r`` (``AblationLayer.activations_to_be_ablated``)
  instead binarises the first principal component of the activations (EigenCAM's projection,
  threshold 0.01 of its range), scores each channel by the share of its min-max-normalised |A_k|
  inside that mask, and ablates the ``floor(r x C)`` highest- *and* the ``floor(r x C)`` lowest-scoring
  channels: ``2 r`` of them, half chosen as the least relevant. Channels not ablated get weight 0 in
  both. ``benchmarks/heatmaps.py`` measures how close the fast map comes to the full ablation
  (ratio 1, every channel) at a given ratio;
* running the ablated copies under ``torch.inference_mode`` and reusing the first forward pass
  (the library runs it twice).

With ``ratio=1`` it ablates every channel and gives the library's map (checked in the tests).

Padding (:class:`PaddingAwareCAM`): a detector resizes an image and pads it to a multiple of 32, so
its feature maps cover the padded canvas. grad-cam stretches the whole feature grid over the input
image, which shifts a non-square image's map towards the padded side (up to the padding's share of
the image, e.g. 6 of 32 rows). The CAMs here stretch the grid over the padded extent instead and
crop it to the image, given the model's ``input_geometry`` (resized and padded sizes).

It is engine-agnostic: the target layer is any module path; an FPN target may return an
OrderedDict of feature maps with any keys and channel counts (torchvision's "0".."3","pool" or an
mmdet wrapper's levels), a plain layer a tensor. ViT layers that return tokens ``(B, N, C)`` (a
block, the final norm) are reshaped to ``(B, C, H, W)`` on the patch grid without the CLS and
register tokens (:class:`cxrssl.detection.vitdet.TokenReshape`) and ablated channel-last
(:class:`TokenAblationLayer`); a ViTDet detector's ``backbone.body`` already returns that map. The model takes a batch of (3, H, W) images and
returns one ``{"boxes", "labels", "scores"}`` dict per image, as torchvision detectors do.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from pytorch_grad_cam import AblationCAM, EigenCAM
from pytorch_grad_cam.ablation_layer import AblationLayer
from pytorch_grad_cam.utils.find_layers import replace_layer_recursive

log = logging.getLogger(__name__)

#: Value written into an ablated FPN channel (the library's AblationLayerFasterRCNN uses -1000).
FPN_ABLATION_VALUE = -1000.0


class FPNReshape:
    """FPN levels -> one tensor: |activation| of every level resized to one grid and stacked on the
    channel axis, in the levels' order (the library's ``fasterrcnn_reshape_transform`` for any
    level names and widths).

    The library uses the coarsest level's grid ("pool", 1/64 of the input): 2x2 cells at 128 px,
    4x4 at 224 px. ``min_cells`` picks the coarsest level whose short side has at least that many
    cells instead (the finest level if none has); ``min_cells=0`` is the library's choice.
    """

    def __init__(self, min_cells: int = 0):
        self.min_cells = int(min_cells)

    def grid(self, levels: list[torch.Tensor]) -> tuple[int, int]:
        sizes = sorted((tuple(v.shape[-2:]) for v in levels), key=lambda s: s[0] * s[1])
        for size in sizes:
            if min(size) >= self.min_cells:
                return size
        return sizes[-1]

    def __call__(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        levels = list(features.values())
        size = self.grid(levels)
        return torch.cat([torch.nn.functional.interpolate(torch.abs(v), size, mode="bilinear") for v in levels], dim=1)


#: The library's grid (the coarsest level).
fpn_reshape_transform = FPNReshape(0)


def top_channels(activations: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the ``ceil(ratio * C)`` channels with the largest activation mass (sum |A_k|)."""
    n_channels = activations.shape[0]
    k = n_channels if ratio >= 1.0 else max(1, int(np.ceil(ratio * n_channels)))
    mass = np.abs(activations.reshape(n_channels, -1)).sum(axis=1)
    order = np.argsort(-mass, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


class TopChannelAblationLayer(AblationLayer):
    """Ablates channels of a tensor output (the library's rule: 0 when the minimum is 0, else far
    below the minimum), chosen by :func:`top_channels`."""

    def activations_to_be_ablated(self, activations, ratio_channels_to_ablate=1.0):
        self.indices = top_channels(np.asarray(activations), ratio_channels_to_ablate)
        return self.indices

    def __call__(self, x):
        output = self.activations
        rows = torch.arange(output.size(0), device=output.device)
        channels = torch.as_tensor(np.asarray(self.indices[: output.size(0)]), device=output.device)
        minimum = torch.min(output)
        value = 0.0 if minimum == 0 else float(minimum) - 1e7
        self.ablate(output, rows, channels, value)
        return output

    @staticmethod
    def ablate(output: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor, value: float) -> None:
        """Set channel ``channels[i]`` of copy ``rows[i]`` to ``value`` (channels first)."""
        output[rows, channels] = value


class TokenAblationLayer(TopChannelAblationLayer):
    """Ablates channels of a ViT token output ``(B, N, C)`` (channels last; every token, the CLS and
    register tokens included, as the library's ``AblationLayerVit``), chosen by :func:`top_channels`
    on the reshaped ``(C, H, W)`` map."""

    def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate):
        self.activations = activations[input_batch_index: input_batch_index + 1].clone().repeat(
            num_channels_to_ablate, 1, 1)

    @staticmethod
    def ablate(output: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor, value: float) -> None:
        output[rows, :, channels] = value  # channels last: every token of the copy


class FPNAblationLayer(TopChannelAblationLayer):
    """Ablates one channel of one FPN level per copy; channel ``i`` of the reshaped activations is
    level ``l``'s channel ``i - offset[l]`` (levels in the dict's order, any names and widths)."""

    def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate):
        self.activations = OrderedDict(
            (key, value[input_batch_index: input_batch_index + 1].clone().repeat(num_channels_to_ablate, 1, 1, 1))
            for key, value in activations.items()
        )

    def __call__(self, x):
        result = self.activations
        keys = list(result)
        widths = np.array([result[k].shape[1] for k in keys])
        offsets = np.concatenate([[0], np.cumsum(widths)])
        n_copies = result[keys[0]].shape[0]
        for i, flat in enumerate(np.asarray(self.indices[:n_copies])):
            level = int(np.searchsorted(offsets, flat, side="right") - 1)
            result[keys[level]][i, int(flat - offsets[level])] = FPN_ABLATION_VALUE
        return result


class PaddingAwareCAM:
    """Mixin for grad-cam CAM classes: maps the feature grid onto the padded canvas and crops it to
    the image (see the module docstring). ``geometry`` is the model's ``input_geometry(h, w)``
    result for the current input, (resized h, w, padded h, w); None keeps the library's behaviour."""

    geometry: tuple[int, int, int, int] | None = None

    def get_target_width_height(self, input_tensor):
        height, width = input_tensor.shape[-2:]
        if not self.geometry:
            return width, height
        rh, rw, ph, pw = self.geometry
        return max(width, round(width * pw / rw)), max(height, round(height * ph / rh))

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        cams = super().compute_cam_per_layer(input_tensor, targets, eigen_smooth)
        height, width = input_tensor.shape[-2:]
        return [cam[..., :height, :width] for cam in cams]


class PaddedEigenCAM(PaddingAwareCAM, EigenCAM):
    """grad-cam's EigenCAM with the padding correction."""


class PaddedAblationCAM(PaddingAwareCAM, AblationCAM):
    """grad-cam's AblationCAM with the padding correction (the reference of the fast path)."""


class FastAblationCAM(PaddingAwareCAM, AblationCAM):
    """AblationCAM that ablates the ``ratio`` most activated channels (see the module docstring)."""

    def __init__(self, model, target_layers, reshape_transform=None, ablation_layer=None,
                 batch_size: int = 32, ratio_channels_to_ablate: float = 0.1):
        if ablation_layer is None:
            from cxrssl.detection.vitdet import TokenReshape

            if isinstance(reshape_transform, FPNReshape):
                ablation_layer = FPNAblationLayer()
            elif isinstance(reshape_transform, TokenReshape):
                ablation_layer = TokenAblationLayer()
            else:
                ablation_layer = TopChannelAblationLayer()
        super().__init__(model, target_layers, reshape_transform=reshape_transform, ablation_layer=ablation_layer,
                         batch_size=batch_size, ratio_channels_to_ablate=ratio_channels_to_ablate)
        # Keep the raw target output of the first forward pass: the ablations start from it. (While
        # the layer is swapped for the ablation layer this hook does not fire.)
        self._raw_handle = target_layers[0].register_forward_hook(self.save_activation)
        self.n_channels_ablated = 0

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        original = np.float32([target(output).cpu().item() for target, output in zip(targets, self.outputs)])
        if np.any(original <= 0):
            raise ValueError("the explained boxes are not found by the model (target score 0): nothing to ablate")
        raw = self.activations
        weights = np.zeros(activations.shape[:2], dtype=np.float32)  # channels left alone: weight 0
        layer = self.ablation_layer
        replace_layer_recursive(self.model, target_layer, layer)
        try:
            with torch.inference_mode():
                for b, (target, image) in enumerate(zip(targets, input_tensor)):
                    channels = layer.activations_to_be_ablated(activations[b], self.ratio_channels_to_ablate)
                    scores = np.empty(len(channels), dtype=np.float32)
                    for start in range(0, len(channels), self.batch_size):
                        chunk = channels[start: start + self.batch_size]
                        layer.set_next_batch(input_batch_index=b, activations=raw, num_channels_to_ablate=len(chunk))
                        layer.indices = chunk
                        outputs = self.model(image.unsqueeze(0).expand(len(chunk), -1, -1, -1))
                        scores[start: start + len(chunk)] = [target(o).cpu().item() for o in outputs]
                    weights[b, channels] = (original[b] - scores) / original[b]
                    self.n_channels_ablated = len(channels)
        finally:
            replace_layer_recursive(self.model, layer, target_layer)
        return weights

    def release(self) -> None:
        """Remove every hook this CAM put on the model."""
        handle = getattr(self, "_raw_handle", None)
        if handle is not None:
            handle.remove()
            self._raw_handle = None
        self.activations_and_grads.release()

    def __del__(self):
        self.release()
