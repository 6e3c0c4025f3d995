"""The method's loss ``L = Lg(v|t) + Lg(t|v) + Ll(v|t) + Ll(t|v)`` (REFERENCE.md section 7).

* Global: InfoNCE between L2-normalised image and report embeddings, image->report (each image
  picks its report among the batch's) and report->image, temperature ``tau_g``.
* Local, sentence-level (GLoRIA's attention, sentences instead of words): each sentence ``s_k``
  of report ``j`` attends over the regions ``r`` of image ``i``,
  ``a = softmax_r(cos(s_k, r) / tau_a)``, ``c_ijk = sum_r a_r r``; the image-report score
  aggregates its sentences, ``S(i, j) = 1/gamma * log sum_k exp(gamma * cos(c_ijk, s_k))``;
  InfoNCE over ``S / tau_l`` in both directions.

Negatives come from every DDP rank: each rank scores its own samples against the gathered batch
(:func:`cxrssl.runtime.all_gather_cat`, autograd-aware), so with DDP's gradient averaging the
update equals one process's on the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cxrssl.runtime import all_gather_cat


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _targets(n_local: int, device: torch.device, gather: bool) -> torch.Tensor:
    """Columns of this rank's samples in the gathered batch (ranks are concatenated in order)."""
    return torch.arange(n_local, device=device) + (_rank() * n_local if gather else 0)


def _gather(x: torch.Tensor, gather: bool) -> torch.Tensor:
    return all_gather_cat(x) if gather else x


class GlobalInfoNCE(nn.Module):
    """Image<->report InfoNCE; returns ``{"image_to_text": Lg(v|t), "text_to_image": Lg(t|v)}``."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor, text: torch.Tensor, gather: bool = True) -> dict[str, torch.Tensor]:
        """``gather=False``: this process's batch only (e.g. a validation set scored on every rank)."""
        v, t = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        all_v, all_t = _gather(v, gather), _gather(t, gather)
        target = _targets(len(v), v.device, gather)
        return {"image_to_text": F.cross_entropy(v @ all_t.T / self.temperature, target),
                "text_to_image": F.cross_entropy(t @ all_v.T / self.temperature, target)}


def sentence_region_scores(regions: torch.Tensor, sentences: torch.Tensor, mask: torch.Tensor,
                           attention_temperature: float, aggregation: float) -> torch.Tensor:
    """Image-report local scores ``S(i, j)`` ``(Bi, Bt)`` (the module doc's formula).

    ``regions`` ``(Bi, R, D)``, ``sentences`` ``(Bt, K, D)``, ``mask`` ``(Bt, K)`` (True = a
    sentence; every report needs one). Inputs need not be normalised.
    """
    r = F.normalize(regions.float(), dim=-1)
    s = F.normalize(sentences.float(), dim=-1)
    att = torch.softmax(torch.einsum("ird,jkd->ijkr", r, s) / attention_temperature, dim=-1)
    context = F.normalize(torch.einsum("ijkr,ird->ijkd", att, r), dim=-1)
    cos = (context * s.unsqueeze(0)).sum(-1)  # (Bi, Bt, K)
    cos = cos.masked_fill(~mask.unsqueeze(0), float("-inf"))
    return torch.logsumexp(aggregation * cos, dim=-1) / aggregation


def attention_maps(regions: torch.Tensor, sentences: torch.Tensor, attention_temperature: float) -> torch.Tensor:
    """Each sentence's attention over its own image's regions: ``(B, K, R)`` (for heatmaps)."""
    r = F.normalize(regions.float(), dim=-1)
    s = F.normalize(sentences.float(), dim=-1)
    return torch.softmax(torch.einsum("brd,bkd->bkr", r, s) / attention_temperature, dim=-1)


class LocalSentenceRegionLoss(nn.Module):
    """Sentence<->region InfoNCE; returns ``{"image_to_text": Ll(v|t), "text_to_image": Ll(t|v)}``."""

    def __init__(self, temperature: float = 0.1, attention_temperature: float = 0.25, aggregation: float = 5.0):
        super().__init__()
        for name, value in (("temperature", temperature), ("attention_temperature", attention_temperature),
                            ("aggregation", aggregation)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.temperature, self.attention_temperature = float(temperature), float(attention_temperature)
        self.aggregation = float(aggregation)

    def scores(self, regions, sentences, mask) -> torch.Tensor:
        return sentence_region_scores(regions, sentences, mask, self.attention_temperature, self.aggregation)

    def forward(self, regions: torch.Tensor, sentences: torch.Tensor, mask: torch.Tensor,
                gather: bool = True) -> dict[str, torch.Tensor]:
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every report needs at least one sentence")
        all_r, all_s = _gather(regions, gather), _gather(sentences, gather)
        all_m = _gather(mask.to(torch.uint8), gather).bool()  # collectives do not take bool tensors everywhere
        target = _targets(len(regions), regions.device, gather)
        v2t = self.scores(regions, all_s, all_m) / self.temperature  # this rank's images x all reports
        t2v = self.scores(all_r, sentences, mask).T / self.temperature  # this rank's reports x all images
        return {"image_to_text": F.cross_entropy(v2t, target), "text_to_image": F.cross_entropy(t2v, target)}


class MultimodalLoss(nn.Module):
    """``global_weight * (Lg(v|t) + Lg(t|v)) + local_weight * (Ll(v|t) + Ll(t|v))``; also returns the parts."""

    def __init__(self, temperature_global: float = 0.1, temperature_local: float = 0.1,
                 attention_temperature: float = 0.25, aggregation: float = 5.0, global_weight: float = 1.0,
                 local_weight: float = 1.0):
        super().__init__()
        self.global_loss = GlobalInfoNCE(temperature_global)
        self.local_loss = LocalSentenceRegionLoss(temperature_local, attention_temperature, aggregation)
        self.global_weight, self.local_weight = float(global_weight), float(local_weight)

    def forward(self, out: dict[str, torch.Tensor], gather: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``out``: the model's ``image_global, text_global, regions, sentences, sentence_mask``."""
        g = self.global_loss(out["image_global"], out["text_global"], gather)
        parts = {f"global_{k}": v for k, v in g.items()}
        total = self.global_weight * (g["image_to_text"] + g["text_to_image"])
        loc = self.local_loss(out["regions"], out["sentences"], out["sentence_mask"], gather)
        parts.update({f"local_{k}": v for k, v in loc.items()})
        total = total + self.local_weight * (loc["image_to_text"] + loc["text_to_image"])
        return total, parts
