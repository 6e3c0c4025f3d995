"""Barlow Twins (Zbontar et al. 2021), as the BarlowTwins-CXR code ran it.

The loss normalises each embedding dimension over the *global* batch (``BatchNorm1d(affine=False)``,
synchronised across ranks in DDP), forms the cross-correlation ``c = z1n.T @ z2n / global_batch``,
sums it over ranks and returns ``sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2``. Projector
``(Linear no bias, BN, ReLU) x (k-1)`` then ``Linear no bias``; LARS with separate rates for weights
and for biases/BN (``lr_weights``, ``lr_biases``, times batch/256); weight decay 1e-6 as in the
authors' code (the paper's text says 1.5e-6). Settings: ``pretrain.barlowtwins``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from cxrssl.runtime import all_reduce_sum
from cxrssl.ssl.joint import TwoViewMethod, at_least_fp32
from cxrssl.ssl.registry import register


def build_projector(in_dim: int, widths: Sequence[int]) -> nn.Sequential:
    """``(Linear no bias, BN1d, ReLU) x (k-1)`` then ``Linear no bias``, widths ``in_dim, *widths``."""
    if not widths:
        raise ValueError("projector needs at least one layer width")
    sizes = [in_dim, *widths]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """Flattened off-diagonal elements of a square matrix (no copy of the diagonal needed)."""
    n, m = x.shape
    if n != m:
        raise ValueError(f"expected a square matrix, got {tuple(x.shape)}")
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def cross_correlation(z1n: torch.Tensor, z2n: torch.Tensor, global_batch: int) -> torch.Tensor:
    """``z1n.T @ z2n / global_batch``, summed over ranks when a process group is running.

    The all-reduce is autograd-aware (its backward sums the gradients of every rank), so with
    DDP's gradient averaging the parameter gradients equal those of one process seeing the whole
    batch. (The reference code used the in-place, non-differentiable all-reduce, whose gradients
    are ``1/world_size`` of that.)
    """
    c = z1n.T @ z2n / global_batch
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        c = all_reduce_sum(c)
    return c


def barlow_twins_loss(c: torch.Tensor, lambd: float) -> torch.Tensor:
    """``sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2`` of a cross-correlation matrix."""
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwinsLoss(nn.Module):
    """``forward(z_a, z_b)``: affine-free BN of each embedding, cross-correlation, loss (lightly's style).

    Runs in float32 even under bf16 autocast: the 8192 x 8192 cross-correlation sums hundreds of
    products, too many for bf16's 8-bit mantissa. ``global_batch`` is the batch summed over all
    ranks (the divisor of the cross-correlation).
    """

    def __init__(self, dim: int, lambd: float, global_batch: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.lambd = float(lambd)
        self.global_batch = int(global_batch)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z1n, z2n = self.bn(at_least_fp32(z_a)), self.bn(at_least_fp32(z_b))
            return barlow_twins_loss(cross_correlation(z1n, z2n, self.global_batch), self.lambd)


class BarlowTwins(nn.Module):
    """Backbone (``fc`` = Identity) + projector + :class:`BarlowTwinsLoss`; ``forward`` returns the loss."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projector: Sequence[int], lambd: float,
                 global_batch: int):
        super().__init__()
        if hasattr(backbone, "fc"):
            backbone.fc = nn.Identity()
        self.backbone = backbone
        self.projector = build_projector(feature_dim, projector)
        self.criterion = BarlowTwinsLoss(projector[-1], lambd, global_batch)

    @property
    def bn(self) -> nn.Module:
        """The final affine-free batch norm (inside the loss)."""
        return self.criterion.bn

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        """Projector output of one view (before the final normalisation)."""
        return self.projector(self.backbone(y))

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.embed(y1), self.embed(y2))


@register
class BarlowTwinsMethod(TwoViewMethod):
    name = "barlowtwins"
    title = "Barlow Twins"
    lr_columns = ("lr_weights", "lr_biases")

    def build_model(self, encoder: nn.Module, global_batch: int) -> BarlowTwins:
        return BarlowTwins(encoder, self.spec.feature_dim, self.s["projector"], self.s["lambd"], global_batch)

    def learning_rates(self) -> tuple[float, float]:
        return self.s["lr_weights"], self.s["lr_biases"]
