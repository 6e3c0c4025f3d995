"""Process-group setup for torchrun and batch norm synchronised across ranks.

Barlow Twins normalises over the global batch, so every BatchNorm is synchronised (as in the
reference code). ``torch.nn.SyncBatchNorm`` only runs on accelerators; on CPU (gloo) each
BatchNorm becomes :class:`AllReduceBatchNorm`, which computes the global statistics with
autograd-aware all-reduces, so DDP on CPU trains exactly like one process with the whole batch.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

log = logging.getLogger(__name__)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Autograd-aware sum over ranks: the backward pass sums every rank's gradient.

    ``torch.distributed.nn.functional.all_reduce`` is the public differentiable collective; torch
    2.14 flags it in favour of a private module, so that warning is silenced here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_reduce is deprecated.*")
        return dist_fn.all_reduce(x)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start nccl (CUDA) or gloo (CPU) when > 1 process.

    ``device``: ``cpu``, ``cuda`` or None (CUDA when available). Under torchrun each rank takes
    ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        dev = torch.device("cuda", local) if world > 1 or kind == "cuda" else torch.device(kind)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        log.info("rank %d/%d on %s (%s)", rank, world, dev, dist.get_backend())
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of all ranks (any device, any backend), autograd-aware.

    Same parameters and buffers as ``BatchNorm1d/2d``, so state dicts stay torchvision's.
    Without a process group it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        # two passes (mean, then squared deviations): as exact as single-process batch norm
        stats = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n  # biased, used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise every BatchNorm across ranks: SyncBatchNorm on accelerators, else all-reduce BN."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        out = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean.copy_(module.running_mean)
            out.running_var.copy_(module.running_var)
            out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
