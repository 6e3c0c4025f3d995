"""What the two-view joint-embedding methods (Barlow Twins, VICReg) share.

Two augmented uint8 views per image (:class:`cxrssl.ssl.augment.TwoViews`, recipe from the
method's ``augment`` setting), normalised on the device, and LARS (:mod:`cxrssl.ssl.lars`) with
weights and 1-D parameters (biases, norms) in two groups, warm-up + cosine to 0.001 x base.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrssl.ssl.augment import TwoViews, normalize_views
from cxrssl.ssl.data import ViewPair
from cxrssl.ssl.lars import LARS, lars_param_groups, set_learning_rates
from cxrssl.ssl.registry import PretrainMethod


def at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    """Embeddings for a loss that sums many products: bf16/fp16 -> float32, others unchanged."""
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


class TwoViewMethod(PretrainMethod):
    """Base of the two-view methods; subclasses define ``build_model`` and ``learning_rates``."""

    def sample(self) -> ViewPair:
        return ViewPair(TwoViews(self.s["augment"], self.common["image_size"]))

    def inputs(self, batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y1, y2 = batch
        return normalize_views(y1, device, channels_last), normalize_views(y2, device, channels_last)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return LARS(lars_param_groups(model), lr=0.0, weight_decay=self.s["weight_decay"], momentum=0.9, eta=0.001)

    def learning_rates(self) -> tuple[float, float]:
        """Base learning rates of the weights and of the 1-D parameters (times batch/256)."""
        raise NotImplementedError

    def schedule(self, optimizer, step, total_steps, warmup_steps, global_batch) -> dict[str, float]:
        lr_w, lr_b = set_learning_rates(optimizer, step, total_steps, warmup_steps, *self.learning_rates(),
                                        global_batch)
        return dict(zip(self.lr_columns, (lr_w, lr_b)))
