"""GMML (group masked model learning) on a ViT: the SPCXR pretraining (arXiv 2211.12944).

Each image gets one augmented view (the clean target) and a corrupted copy of it:

* **group masking**: random rectangles aligned to the ViT's patch grid (:func:`group_mask`) until
  a share of the image drawn per image from ``mask_ratio`` is covered; a rectangle's side is at
  most ``max_block`` of the image side;
* **corruption**: with probability ``replace_prob`` the masked area takes the pixels of the same
  area of another training image's view ("patches of another image"; at share ``replace_ratio``),
  otherwise Gaussian grey noise with the ImageNet mean and std (about N(0, 1) after
  normalisation). The donor is drawn per sample from the whole training set rather than from
  the current batch: the same in distribution, and independent of how a batch is split across
  ranks, so DDP and resume stay exact.
* the ViT encodes the corrupted image; a light head (:class:`ReconstructionHead`: an MLP on each
  patch token, then a transposed convolution back to the patch's pixels) reconstructs it;
* :class:`GMMLLoss`: L1 between the reconstruction and the clean view over the corrupted pixels
  (``loss_on: corrupted``) or over all of them (``all``).

AdamW with no weight decay on biases, norms, the position embedding and the CLS token; learning
rate ``lr x batch/256`` after a linear warm-up, cosine to ``min_lr``; weight decay cosine from
``weight_decay`` to ``weight_decay_end``; each parameter's gradient norm clipped to ``clip_grad``.

Defaults (``pretrain.gmml`` in the schema): no SPCXR code is public, so they are those of the
authors' generic GMML code (Atito et al., "GMML is all you need", github.com/Sara-Ahmed/GMML,
``main.py``): ``drop_perc`` 0.75 with the share drawn from U(0.5, 0.75), ``drop_replace`` 0.3 for
the images corrupted by another image's patches (half of them with the default ``drop_type``
noise), blocks up to 0.3 of the side, loss on the corrupted pixels only (``drop_only``), lr 5e-4
x batch/256, min lr 1e-6, 10 warm-up epochs, weight decay 0.04 -> 0.4, gradient clip 3.0, and
the clean view's augmentation. That code is GPL; this module is written from the description
only (it differs in details, e.g. a rectangle is placed inside the image rather than clipped
at its border).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from cxrssl.ssl.augment import IMAGENET_MEAN, IMAGENET_STD, SeparableGaussianBlur, normalize_views, seeded
from cxrssl.ssl.registry import PretrainMethod, register

RECIPES = ("original", "cxr")
LOSS_ON = ("corrupted", "all")
_NOISE_MEAN = 255 * float(np.mean(IMAGENET_MEAN))
_NOISE_STD = 255 * float(np.mean(IMAGENET_STD))


# --- masking and corruption (worker side, per sample) ---------------------------------------------

def group_mask(grid: tuple[int, int], share: float, max_block: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``grid`` of masked patches: random rectangles until at least ``share`` is covered.

    A rectangle has 1..``round(max_block * side)`` patches per side and lies inside the grid;
    drawing stops at the first rectangle that brings the covered share to ``share`` or more.
    """
    gh, gw = grid
    if not 0 < share <= 1:
        raise ValueError(f"mask share must be in (0, 1], got {share}")
    target = math.ceil(share * gh * gw - 1e-9)
    hmax, wmax = max(1, round(max_block * gh)), max(1, round(max_block * gw))
    mask = np.zeros((gh, gw), dtype=bool)
    while mask.sum() < target:
        h, w = int(rng.integers(1, hmax + 1)), int(rng.integers(1, wmax + 1))
        r, c = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
        mask[r:r + h, c:c + w] = True
    return mask


def patch_pixels(cells: np.ndarray | torch.Tensor, patch: int):
    """A patch-grid mask ``(..., gh, gw)`` as a pixel mask ``(..., gh*patch, gw*patch)``."""
    if isinstance(cells, torch.Tensor):
        return cells.repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return np.repeat(np.repeat(cells, patch, -2), patch, -1)


def gmml_view(recipe: str, size: int) -> v2.Compose:
    """The clean view. ``original``: GMML's (crop 5-100 % of the area, flip, light colour jitter p 0.3,
    blur p 0.1); ``cxr``: crops of 20-100 % (tiny crops of a film often show no lung), brightness and
    contrast only, milder blur (see :mod:`cxrssl.ssl.augment` for the reasons)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown GMML augmentation recipe {recipe!r}; expected one of {RECIPES}")
    if recipe == "original":
        crop, jitter, sigma = (0.05, 1.0), v2.ColorJitter(0.1, 0.1, 0.1, 0.01), (0.1, 2.0)
    else:
        crop, jitter, sigma = (0.2, 1.0), v2.ColorJitter(0.1, 0.1), (0.1, 1.0)
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([jitter], p=0.3),
        v2.RandomApply([SeparableGaussianBlur(sigma)], p=0.1),
    ])


class GMMLSample:
    """Per-sample function: ``(images, i, seed) -> (clean, corrupted, cells)``.

    ``clean`` and ``corrupted`` are uint8 ``(1, S, S)``, ``cells`` the bool ``(1, gh, gw)`` patch
    mask. Everything random comes from ``seed`` (torch's generator for the views, a NumPy
    generator for mask, noise and donor), so a sample does not depend on workers, ranks or resumes.
    """

    def __init__(self, recipe: str, size: int, patch: int, mask_ratio: tuple[float, float], max_block: float,
                 replace_prob: float, replace_ratio: float):
        if size % patch:
            raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
        lo, hi = mask_ratio
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"mask_ratio must be 0 < min <= max <= 1, got {mask_ratio}")
        self.view = gmml_view(recipe, size)
        self.size, self.patch, self.mask_ratio, self.max_block = size, patch, (lo, hi), max_block
        self.replace_prob, self.replace_ratio = replace_prob, replace_ratio

    def __call__(self, images, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, 1])
        clean = seeded(seed, lambda: self.view(images.image(i)).contiguous())
        grid = (self.size // self.patch, self.size // self.patch)
        replace = len(images) > 1 and rng.random() < self.replace_prob
        share = self.replace_ratio if replace else rng.uniform(*self.mask_ratio)
        cells = group_mask(grid, share, self.max_block, rng)
        pixels = torch.from_numpy(patch_pixels(cells, self.patch))
        if replace:
            j = int(rng.integers(0, len(images) - 1))
            j += j >= i  # another image
            donor_seed = int(rng.integers(0, 2**63 - 1))
            fill = seeded(donor_seed, lambda: self.view(images.image(j)))[0]
        else:
            noise = rng.normal(_NOISE_MEAN, _NOISE_STD, size=(self.size, self.size))
            fill = torch.from_numpy(np.clip(np.rint(noise), 0, 255).astype(np.uint8))
        corrupted = clean.clone()
        corrupted[0][pixels] = fill[pixels]
        return clean, corrupted, torch.from_numpy(cells)[None]


# --- model and loss (device side) -------------------------------------------------------------------

class ReconstructionHead(nn.Module):
    """Patch tokens ``(B, N, D)`` -> pixels ``(B, C, gh*p, gw*p)``: ``layers`` x (Linear, GELU), then a
    transposed convolution with kernel and stride ``p`` (each token paints its own patch)."""

    def __init__(self, dim: int, patch: int, layers: int, out_chans: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(layers):
            blocks += [nn.Linear(dim, dim), nn.GELU()]
        self.mlp = nn.Sequential(*blocks)
        self.to_pixels = nn.ConvTranspose2d(dim, out_chans, kernel_size=patch, stride=patch)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.mlp(tokens)
        b, n, d = x.shape
        return self.to_pixels(x.transpose(1, 2).reshape(b, d, *grid))


class GMMLLoss(nn.Module):
    """``forward(reconstruction, target, mask)``: mean absolute error over the masked pixels.

    ``sum(|r - t| * m) / sum(m)`` with the pixel mask ``m`` (``(B, 1, H, W)``) broadcast over the
    channels; ``masked_only=False`` averages over every pixel. Under DDP the divisor is the count
    of the global batch and each rank returns ``world_size * (its sum) / count``: DDP's gradient
    mean is then the gradient of the global loss, and the mean over ranks of the returned values
    is the global loss itself.
    """

    def __init__(self, masked_only: bool = True):
        super().__init__()
        self.masked_only = masked_only

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        err = (reconstruction - target).abs()
        weight = mask.to(err.dtype).expand_as(err) if self.masked_only else torch.ones_like(err)
        total, count = (err * weight).sum(), weight.sum().detach()
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            count = count.clone()
            dist.all_reduce(count)
        return total * world / count


class GMML(nn.Module):
    """ViT encoder + :class:`ReconstructionHead` + :class:`GMMLLoss`; ``forward`` returns the loss."""

    def __init__(self, backbone: nn.Module, dim: int, patch: int, head_layers: int, masked_only: bool):
        super().__init__()
        self.backbone, self.patch = backbone, patch
        self.head = ReconstructionHead(dim, patch, head_layers)
        self.criterion = GMMLLoss(masked_only)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
        return self.head(tokens, (x.shape[-2] // self.patch, x.shape[-1] // self.patch))

    def forward(self, corrupted: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        recon = self.reconstruct(corrupted)
        with torch.autocast(device_type=recon.device.type, enabled=False):
            return self.criterion(recon.float(), clean.float(), mask)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base: float, final: float) -> float:
    """Linear from 0 to ``base`` over ``warmup_steps``, then cosine from ``base`` to ``final``."""
    if step < warmup_steps:
        return base * step / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay) / decay))
    return final + (base - final) * q


@register
class GMMLMethod(PretrainMethod):
    name = "gmml"
    title = "GMML"
    families = ("vit",)
    lr_columns = ("lr", "weight_decay")

    def sample(self) -> GMMLSample:
        s = self.s
        return GMMLSample(s["augment"], self.common["image_size"], self.spec.patch_size, tuple(s["mask_ratio"]),
                          s["max_block"], s["replace_prob"], s["replace_ratio"])

    def build_model(self, encoder: nn.Module, global_batch: int) -> GMML:
        s = self.s
        return GMML(encoder, self.spec.feature_dim, self.spec.patch_size, s["head_layers"], s["loss_on"] == "corrupted")

    def inputs(self, batch, device, channels_last):
        clean, corrupted, cells = batch
        mask = patch_pixels(cells.to(device, non_blocking=True), self.spec.patch_size)
        return normalize_views(corrupted, device), normalize_views(clean, device), mask

    def optimizer(self, model: GMML) -> torch.optim.Optimizer:
        skip = {f"backbone.{n}" for n in model.backbone.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        return torch.optim.AdamW([dict(params=decay, weight_decay=self.s["weight_decay"]),
                                  dict(params=no_decay, weight_decay=0.0)], lr=0.0)

    def schedule(self, optimizer, step, total_steps, warmup_steps, global_batch) -> dict[str, float]:
        s = self.s
        lr = warmup_cosine(step, total_steps, warmup_steps, s["lr"] * global_batch / 256, s["min_lr"])
        wd = warmup_cosine(step, total_steps, 0, s["weight_decay"], s["weight_decay_end"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.param_groups[0]["weight_decay"] = wd
        return {"lr": lr, "weight_decay": wd}

    def clip_gradients(self, model: nn.Module) -> None:
        if self.s["clip_grad"] > 0:  # per parameter, as GMML does (not the global norm)
            for p in model.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_([p], self.s["clip_grad"])
