"""Two-view augmentations on uint8 tensors (torchvision.transforms.v2), seeded per sample.

Views are produced as uint8 ``(C, S, S)`` tensors straight from the uint8 image cache, which keeps
DataLoader workers cheap and the host-to-device copies 4x smaller than float; scaling to [0, 1],
grey-to-RGB expansion and ImageNet normalisation run batched on the training device
(:func:`normalize_views`).

Every sample's randomness comes from its own seed (:class:`TwoViews` forks torch's RNG), so the
views of image ``i`` in epoch ``e`` do not depend on the worker count, the rank or on resuming.

Recipes (``pretrain.augment``):

``original``
    The paper's recipe (the reference code applied it to PIL ``convert('RGB')`` images):
    RandomResizedCrop(size, scale 0.08-1, bicubic), horizontal flip 0.5, ColorJitter(0.4, 0.4,
    0.2, 0.1) with p 0.8, RandomGrayscale 0.2, Gaussian blur (sigma 0.1-2) with p 1.0 / 0.1,
    Solarize with p 0.0 / 0.2 (views 1 / 2). On grey images saturation, hue and grayscale change
    nothing; they are kept (with their random draws) so this is the reference recipe itself.
``cxr``
    Grey-aware:

    * RandomResizedCrop with scale 0.2-1: the smallest paper crops (8 % of the image) often show
      no lung at all on a chest film, which gives the invariance task little to match.
    * horizontal flip 0.5 (kept from the paper; situs is not a label here).
    * brightness 0.4 / contrast 0.4 with p 0.8: exposure and windowing vary between X-ray
      machines; saturation, hue and grayscale are dropped (no-ops on grey images).
    * random gamma 0.7-1.5 with p 0.5: the non-linear counterpart of windowing (different
      detector LUTs / VOI curves), which brightness/contrast cannot express.
    * milder blur, sigma 0.1-1.0 with p 0.5 / 0.1: sigma 2 px at 224 px erases nodules of a few
      millimetres, the lesions the downstream detector has to find.
    * no solarisation (not a physical variation of radiographs) and no rotation/affine: the
      authors found a rotation variant worse.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

RECIPES = ("original", "cxr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SeparableGaussianBlur(nn.Module):
    """Gaussian blur with sigma ~ U(``sigma_min``, ``sigma_max``), as two 1-D convolutions.

    Same result as ``v2.GaussianBlur`` (reflect padding, kernel covering +-3 sigma at the largest
    sigma; PIL's blur, used by the paper, is untruncated) at ~1/6 of the cost of its 2-D kernel,
    which matters on the CPU workers feeding a GPU.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.sigma = sigma
        self.radius = math.ceil(3 * sigma[1])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * float(torch.rand(()))
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        k = k / k.sum()
        c = img.shape[-3]
        out = img.float().unsqueeze(0)
        out = F.conv2d(F.pad(out, (self.radius, self.radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        out = F.conv2d(F.pad(out, (0, 0, self.radius, self.radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        out = out.squeeze(0)
        return out.round_().clamp_(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else out.to(img.dtype)


def _blur(sigma_max: float, p: float) -> nn.Module:
    return v2.RandomApply([SeparableGaussianBlur((0.1, sigma_max))], p=p)


class RandomGamma(nn.Module):
    """Gamma correction with ``gamma`` drawn log-uniformly from ``gamma_range``, with prob ``p``."""

    def __init__(self, gamma_range: tuple[float, float] = (0.7, 1.5), p: float = 0.5):
        super().__init__()
        self.log_lo, self.log_hi = math.log(gamma_range[0]), math.log(gamma_range[1])
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return img
        gamma = math.exp(self.log_lo + (self.log_hi - self.log_lo) * float(torch.rand(())))
        return TF.adjust_gamma(img, gamma)


def original_transforms(size: int) -> tuple[v2.Compose, v2.Compose]:
    """The paper's two asymmetric views, unchanged (applied to the 1-channel grey image, see TwoViews)."""

    def view(blur_p: float, solarize_p: float) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            _blur(2.0, blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
        ])

    return view(1.0, 0.0), view(0.1, 0.2)


def cxr_transforms(size: int) -> tuple[v2.Compose, v2.Compose]:
    """Grey-aware two views (on 1-channel uint8 tensors); see the module docstring."""

    def view(blur_p: float) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC,
                                 antialias=True),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
            RandomGamma((0.7, 1.5), p=0.5),
            _blur(1.0, blur_p),
        ])

    return view(0.5), view(0.1)


class TwoViews:
    """Callable ``(image uint8 (1, H, W), seed) -> (view1, view2)`` uint8 ``(1, size, size)``.

    Both recipes run on the single grey channel. For ``original`` this is the paper's recipe,
    not an approximation: on an image whose three channels are equal (PIL ``convert('RGB')`` of a
    grey film) saturation, hue and grayscale are the identity, and crop, flip, brightness,
    contrast, blur and solarize act on every channel alike. torchvision keeps the same random
    draws on 1-channel input, so for a given seed the views equal the 3-channel ones up to
    rounding (<= 3 grey levels, from the tensor RGB->grey and hue round trips, which PIL's
    integer grey conversion does not have; tested), at a third of the cost (the hue conversion
    alone costs more than the rest). ``normalize_views`` expands to 3 channels.
    """

    def __init__(self, recipe: str, size: int):
        if recipe not in RECIPES:
            raise ValueError(f"unknown augmentation recipe {recipe!r}; expected one of {RECIPES}")
        self.recipe, self.size = recipe, size
        self.t1, self.t2 = original_transforms(size) if recipe == "original" else cxr_transforms(size)

    def __call__(self, image: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"expected a uint8 (1, H, W) image, got {image.dtype} {tuple(image.shape)}")
        return seeded(seed, lambda: (self.t1(image).contiguous(), self.t2(image).contiguous()))


def seeded(seed: int, fn):
    """``fn()`` with torch's CPU generator seeded by ``seed``, restored afterwards.

    torchvision's random transforms draw from the global CPU generator; seeding it per sample makes
    a sample's augmentation independent of workers, ranks and resumes. (torch.random.fork_rng and
    torch.manual_seed also touch CUDA and cost ~1 ms each, more than the augmentation.)
    """
    gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        return fn()
    finally:
        gen.set_state(saved)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for the views of image ``index`` in ``epoch`` (independent streams)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def normalize_views(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(B, C, S, S)`` (C = 1 or 3) -> float32 ImageNet-normalised ``(B, 3, S, S)`` on ``device``."""
    x = x.to(device, non_blocking=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    x = (x.float() - mean) / std  # a 1-channel batch broadcasts to 3 channels here
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
