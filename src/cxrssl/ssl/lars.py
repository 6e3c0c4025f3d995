"""LARS optimizer and the Barlow Twins learning-rate schedule.

LARS (You et al. 2017) as used by Barlow Twins: for every parameter ``p`` with gradient ``g``

* ``dp = g + weight_decay * p``                      (skipped for 1-D params: biases, BN)
* ``dp = q * dp`` with ``q = eta * |p| / |dp|``      (skipped for 1-D params; ``q = 1`` when
  ``|p|`` or ``|dp|`` is 0)
* ``mu = momentum * mu + dp``;  ``p = p - lr * mu``

Parameters are split into two groups (weights, then 1-D "biases") with separate learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS with per-group ``exclude`` (no weight decay and no trust ratio for that group)."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, exclude: bool = False):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} weight_decay={weight_decay} "
                             f"momentum={momentum} eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                                      exclude=exclude))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if not group["exclude"]:
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, dp_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    trust = torch.where((p_norm > 0) & (dp_norm > 0),
                                        group["eta"] * p_norm / dp_norm, torch.ones_like(p_norm))
                    dp = dp.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Group 0: weights (ndim > 1, decayed and adapted); group 1: biases and BN (ndim == 1)."""
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim != 1]
    biases = [p for p in model.parameters() if p.requires_grad and p.ndim == 1]
    return [dict(params=weights, exclude=False), dict(params=biases, exclude=True)]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR at ``step`` (0-based): linear warm-up from 0, then cosine to 0.001."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    q = 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, decay_steps) / decay_steps))
    end = 0.001
    return q + end * (1 - q)


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int,
                       lr_weights: float, lr_biases: float, global_batch: int) -> tuple[float, float]:
    """Set both groups' LR for ``step`` (base LRs times ``global_batch / 256``); return them."""
    scale = lr_factor(step, total_steps, warmup_steps) * global_batch / 256
    lrs = (lr_weights * scale, lr_biases * scale)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return lrs
