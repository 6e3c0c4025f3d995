"""SSL monitor: a weighted kNN classifier on the frozen backbone, run while pretraining.

The usual SSL kNN monitor (InstDisc, Wu et al. 2018; lightly's ``knn_predict`` and solo-learn's
``WeightedKNNClassifier``): L2-normalised features, cosine similarity of each query to a labelled
bank, the ``k`` nearest neighbours vote with weight ``exp(similarity / temperature)``. Those
implementations vote for one class out of C; NIH is multi-label, so here the vote is the weighted
average of the neighbours' 0/1 label vectors: one score per finding, and the monitor reports
the ROC AUC per finding and their mean over the findings with both classes among the queries
(:mod:`cxrssl.linear_eval.metrics`, as linear evaluation scores).

Data (:class:`KNNMonitor`): a seeded sample of the NIH index, patient-disjoint by construction:
the bank from ``train_val`` patients, the queries from the official ``test`` patients (the
official lists share no patient; :func:`cxrssl.linear_eval.data.load_nih_index` checks it). Images
are the whole cached image resized to the pretraining size, ImageNet-normalised like the views.
It is a monitor, never a selection criterion: nothing downstream reads it.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrssl.classes import NIH_FINDINGS
from cxrssl.linear_eval.data import load_nih_index, open_cache
from cxrssl.linear_eval.metrics import mean_auc, per_finding_auc
from cxrssl.models.backbones import feature_extractor
from cxrssl.ssl.augment import normalize_views

log = logging.getLogger(__name__)

MONITOR_COLUMNS = ["epoch", "step", "knn_mean_auc", "n_findings"]


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int,
               temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Per query and label column: the exp(cos / T)-weighted mean label of its ``k`` nearest bank items.

    ``bank`` (N, D), ``bank_labels`` (N, C) in {0, 1}, ``queries`` (Q, D); returns (Q, C) in [0, 1].
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"features must be (N, D) and (Q, D), got {tuple(bank.shape)} and {tuple(queries.shape)}")
    if bank_labels.shape[0] != bank.shape[0]:
        raise ValueError(f"{bank.shape[0]} bank features but {bank_labels.shape[0]} label rows")
    k = min(int(k), bank.shape[0])
    bank = F.normalize(bank.float(), dim=1)
    labels = bank_labels.float()
    out = []
    for q in queries.float().split(chunk):
        sim = F.normalize(q, dim=1) @ bank.T  # (q, N) cosine similarities
        top, idx = sim.topk(k, dim=1)
        # softmax over the k neighbours = exp(s / T) / sum exp(s / T), without overflow
        weights = torch.softmax(top / temperature, dim=1)
        out.append(torch.einsum("qk,qkc->qc", weights, labels[idx]))
    return torch.cat(out) if out else torch.empty(0, labels.shape[1])


def knn_auc(bank: torch.Tensor, bank_labels: np.ndarray, queries: torch.Tensor, query_labels: np.ndarray,
            k: int, temperature: float, names=NIH_FINDINGS) -> tuple[float, dict[str, float]]:
    """Mean ROC AUC (over findings with both classes among the queries) of the kNN scores, and per finding."""
    scores = knn_scores(bank, torch.as_tensor(bank_labels), queries, k, temperature).cpu().numpy()
    aucs = per_finding_auc(np.asarray(query_labels), scores, list(names), "kNN monitor", warn=False)
    return mean_auc(aucs), aucs


def _sample(frame, n: int, rng: np.random.Generator):
    rows = np.sort(rng.choice(len(frame), size=min(n, len(frame)), replace=False))
    return frame.iloc[rows]


class KNNMonitor:
    """The kNN monitor's bank and queries, loaded once; call it with the backbone being trained."""

    def __init__(self, index_path: str | Path, cache_path: str | Path, *, n_images: int, image_size: int,
                 k: int, temperature: float, seed: int, batch_size: int = 256):
        cache = open_cache(cache_path)
        index = load_nih_index(index_path, n_cache_rows=len(cache))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x6B6E6E]))  # local: no global RNG touched
        bank = _sample(index[index["official_split"] == "train_val"], n_images, rng)
        queries = _sample(index[index["official_split"] == "test"], n_images, rng)
        if bank.empty or queries.empty:
            raise ValueError(f"{index_path}: the kNN monitor needs train_val and test images "
                             f"(has {len(bank)} and {len(queries)}); set pretrain.monitor_every_epochs: 0")
        shared = set(bank["patient_id"]) & set(queries["patient_id"])
        assert not shared, "bank and queries share patients"  # load_nih_index guarantees disjoint lists
        self.k, self.temperature, self.batch_size = int(k), float(temperature), int(batch_size)
        self.images = {name: self._load(cache, part["cache_row"].to_numpy(), image_size)
                       for name, part in (("bank", bank), ("queries", queries))}
        self.labels = {"bank": bank[list(NIH_FINDINGS)].to_numpy(np.float32),
                       "queries": queries[list(NIH_FINDINGS)].to_numpy(np.float32)}
        defined = int(sum(np.unique(col).size == 2 for col in self.labels["queries"].T))
        log.info("kNN monitor: bank %d images of %d train_val patients, %d query images of %d test patients "
                 "(%d findings with both classes), k %d, T %g", len(bank), bank["patient_id"].nunique(),
                 len(queries), queries["patient_id"].nunique(), defined, self.k, self.temperature)
        if defined == 0:
            log.warning("kNN monitor: no finding has both classes among the %d queries; its AUC is undefined "
                        "(raise pretrain.monitor_images)", len(queries))

    @staticmethod
    def _load(cache: np.ndarray, rows: np.ndarray, size: int) -> torch.Tensor:
        images = torch.from_numpy(np.stack([np.asarray(cache[r]) for r in rows])).unsqueeze(1)  # (N, 1, S, S)
        if images.shape[-1] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False).round().clamp(0, 255).to(torch.uint8)
        return images

    @torch.no_grad()
    def features(self, encoder: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 channels_last: bool = False, amp: bool = False) -> torch.Tensor:
        net = feature_extractor(encoder)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        out = []
        with autocast:
            for chunk in images.split(self.batch_size):
                out.append(net(normalize_views(chunk, device, channels_last)).float())
        return torch.cat(out)

    def __call__(self, encoder: torch.nn.Module, device: torch.device, channels_last: bool = False,
                 amp: bool = False) -> dict:
        """``{"knn_mean_auc", "n_findings"}`` of ``encoder``'s features (eval mode; every module's mode is restored)."""
        modes = [(m, m.training) for m in encoder.modules()]
        encoder.eval()
        try:
            feats = {name: self.features(encoder, imgs, device, channels_last, amp)
                     for name, imgs in self.images.items()}
        finally:
            for module, mode in modes:
                module.training = mode
        value, aucs = knn_auc(feats["bank"], self.labels["bank"], feats["queries"], self.labels["queries"],
                              self.k, self.temperature)
        return {"knn_mean_auc": value, "n_findings": sum(not math.isnan(v) for v in aucs.values())}
