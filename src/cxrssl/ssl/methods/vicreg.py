"""VICReg (Bardes, Ponce and LeCun 2022) through lightly's loss and projection head.

``loss = lambda * invariance + mu * variance + nu * covariance`` (``lightly.loss.VICRegLoss``)
on the outputs of ``lightly.models.modules.VICRegProjectionHead`` (``num_layers`` Linear layers,
BN + ReLU after all but the last). In DDP the loss gathers the embeddings of every rank
(``gather_distributed``; lightly's gather passes gradients back to each rank), so the variance
and covariance terms see the global batch and the invariance term is the mean over it: DDP trains
like one process with the whole batch. LARS as Barlow Twins, with one base learning rate for
weights and biases as in the authors' code. Defaults (``pretrain.vicreg``) are the paper's:
lambda = mu = 25, nu = 1, projector 8192-8192-8192, base lr 0.2 x batch/256, weight decay 1e-6,
the Barlow Twins / BYOL augmentations.
"""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from cxrssl.ssl.joint import TwoViewMethod, at_least_fp32
from cxrssl.ssl.registry import register


class VICReg(nn.Module):
    """Backbone + lightly's VICReg projection head and loss; ``forward(x1, x2)`` returns the loss.

    The loss runs in float32 even under bf16 autocast (covariances sum many products).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 lambda_param: float, mu_param: float, nu_param: float):
        super().__init__()
        self.backbone = backbone
        self.projector = VICRegProjectionHead(feature_dim, hidden_dim, output_dim, num_layers)
        self.criterion = VICRegLoss(lambda_param, mu_param, nu_param, gather_distributed=True)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        with torch.autocast(device_type=z1.device.type, enabled=False):
            return self.criterion(at_least_fp32(z1), at_least_fp32(z2))


@register
class VICRegMethod(TwoViewMethod):
    name = "vicreg"
    title = "VICReg"
    lr_columns = ("lr",)

    def build_model(self, encoder: nn.Module, global_batch: int) -> VICReg:
        s = self.s
        return VICReg(encoder, self.spec.feature_dim, s["hidden_dim"], s["output_dim"], s["num_layers"],
                      s["lambda_param"], s["mu_param"], s["nu_param"])

    def learning_rates(self) -> tuple[float, float]:
        return self.s["lr"], self.s["lr"]
