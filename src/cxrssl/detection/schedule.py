"""The learning-rate schedule both detection engines follow, iteration by iteration.

The paper's mmdetection 2.28 config (``lr_config = dict(policy='CosineAnnealing', warmup='linear',
warmup_iters=500, warmup_ratio=0.001, min_lr=1e-4)``) ran mmcv's ``CosineAnnealingLrUpdaterHook``
with its default ``by_epoch=True``: the cosine value changes once per epoch (epoch ``e`` of ``E``,
0-based, gets ``min_lr + (lr - min_lr) (1 + cos(pi e / E)) / 2``), and the linear warm-up scales that
value per iteration by ``0.001 + 0.999 it / warmup_iters`` during the first ``warmup_iters``
iterations. :class:`WarmupCosine` is that function; the torchvision engine uses it through
``LambdaLR`` and the mmdet engine through a registered mmengine scheduler, so both engines step the
same learning rates (checked in the tests).
"""

from __future__ import annotations

import math

#: mmdet's linear warm-up starts at this fraction of the base LR (the paper's warmup_ratio).
WARMUP_START_FACTOR = 0.001


class WarmupCosine:
    """LR factor (of ``lr``) at iteration ``it`` (0-based); see the module docstring.

    A callable object, so ``LambdaLR`` saves it in its state dict as plain data.
    """

    def __init__(self, lr: float, min_lr: float, warmup_iters: int, epochs: int, iters_per_epoch: int):
        if epochs < 1 or iters_per_epoch < 1:
            raise ValueError(f"need at least one epoch and one iteration per epoch, got {epochs}, {iters_per_epoch}")
        self.lr, self.min_lr = float(lr), float(min_lr)
        self.warmup_iters, self.epochs, self.iters_per_epoch = int(warmup_iters), int(epochs), int(iters_per_epoch)

    def __call__(self, it: int) -> float:
        epoch = min(int(it) // self.iters_per_epoch, self.epochs - 1)
        cosine = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        factor = cosine / self.lr
        if it < self.warmup_iters:
            factor *= WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * it / self.warmup_iters
        return factor
