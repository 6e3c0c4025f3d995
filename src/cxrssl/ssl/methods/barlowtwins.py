"""Barlow Twins model and loss (Zbontar et al. 2021), as the BarlowTwins-CXR code ran it.

The loss normalises each embedding dimension over the *global* batch (``BatchNorm1d(affine=False)``,
synchronised across ranks in DDP), forms the cross-correlation ``c = z1n.T @ z2n / global_batch``,
sums it over ranks and returns ``sum_i (c_ii - 1)^2 + lambd * sum_{i != j} c_ij^2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from cxrssl.runtime import all_reduce_sum


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


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


class BarlowTwins(nn.Module):
    """Backbone (``fc`` = Identity) + projector + affine-free BN; ``forward`` returns the loss.

    ``global_batch`` is the batch summed over all ranks (the divisor of the cross-correlation).
    The final normalisation and the loss run in float32 even under bf16 autocast: the 8192 x 8192
    cross-correlation sums hundreds of products, too many for bf16's 8-bit mantissa.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, projector: Sequence[int], lambd: float,
                 global_batch: int):
        super().__init__()
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.projector = build_projector(feature_dim, projector)
        self.bn = nn.BatchNorm1d(projector[-1], affine=False)
        self.lambd = float(lambd)
        self.global_batch = int(global_batch)

    def embed(self, y: torch.Tensor) -> torch.Tensor:
        """Projector output of one view (before the final normalisation)."""
        return self.projector(self.backbone(y))

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.embed(y1), self.embed(y2)
        with torch.autocast(device_type=z1.device.type, enabled=False):
            z1n, z2n = self.bn(_at_least_fp32(z1)), self.bn(_at_least_fp32(z2))
            c = cross_correlation(z1n, z2n, self.global_batch)
            return barlow_twins_loss(c, self.lambd)
