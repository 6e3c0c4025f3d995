"""The multimodal method as pieces a pretraining registry can wrap: settings, modules, parameter
groups, optimizer, the loss of a batch, export and reload.

:class:`MultimodalSettings` holds the method's settings with their defaults until they move into
the schema as ``pretrain.<method>``. The paper (arXiv 2401.01524) publishes no code or
hyperparameters beyond ResNet-50 + BioClinicalBERT; the other defaults follow GLoRIA's public
recipe (attention temperature 1/4, sentence aggregation 5, local temperature 1/10, image 224,
learning rate ~5e-5 for the pretrained text encoder). :data:`DEMO_SETTINGS` is the CPU demo.

Exports (:meth:`MultimodalMethod.export`) in ``out_dir``:

* ``image_encoder.pth``: plain torchvision ResNet state dict without ``fc`` (the project's
  backbone contract: linear evaluation and detection take it as ``init``), with the sidecar
  ``image_encoder.json`` ``{method, arch, library, ...}``;
* ``model.pth`` (every weight, tensors only) + ``text_encoder/`` (Hugging Face folder: config,
  weights, tokenizer; renamed into place whole) + ``model.json`` (settings; written last), which
  :func:`load_trained` rebuilds for zero-shot localisation.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from cxrssl.io import atomic_torch_save, atomic_write_json
from cxrssl.multimodal.image import ImageEncoder, resnet_feature_map
from cxrssl.multimodal.losses import MultimodalLoss
from cxrssl.multimodal.text import (BIOCLINICALBERT, SentenceTextEncoder, build_text_encoder, load_pretrained,
                                    quiet_progress)
from cxrssl.runtime import load_checkpoint
from cxrssl.ssl.augment import normalize_views
from cxrssl.ssl.lars import lr_factor

METHOD = "multimodal"
IMAGE_ENCODER, IMAGE_SIDECAR, MODEL, MODEL_JSON, TEXT_DIR = (
    "image_encoder.pth", "image_encoder.json", "model.pth", "model.json", "text_encoder")


@dataclass
class MultimodalSettings:
    """Settings of the method (future ``pretrain.multimodal`` schema block); defaults per the module doc."""

    arch: str = "resnet50"            # image backbone (torchvision ResNet)
    init: str = "imagenet"            # random | imagenet | path to a backbone checkpoint
    output_stride: int = 32           # 16: finer region grid, same weights (cxrssl.multimodal.image)
    image_size: int = 224
    text_encoder: str = BIOCLINICALBERT  # Hub name, local folder, or "scratch"
    vocab_size: int = 8000            # scratch: WordPiece vocabulary size
    text_hidden: int = 256            # scratch BERT width / depth / heads / MLP width
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 1024
    text_dropout: float | None = None  # None: the model's own (BERT: 0.1)
    max_tokens: int = 128             # report length in tokens (all sentences, one pass)
    max_sentences: int = 12           # sentences per report used by the local loss
    embed_dim: int = 512              # shared space (global and local projections)
    temperature_global: float = 0.1
    temperature_local: float = 0.1
    attention_temperature: float = 0.25
    aggregation: float = 5.0          # sentence aggregation sharpness (GLoRIA's gamma 2)
    global_weight: float = 1.0
    local_weight: float = 1.0
    batch_size: int = 48              # global batch (all ranks)
    epochs: int = 50
    warmup_epochs: float = 1.0
    lr: float = 1e-4                  # image encoder and projection heads (AdamW)
    lr_text: float = 5e-5             # text encoder
    weight_decay: float = 1e-4        # not on biases and norm weights
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    workers: int = 4
    checkpoint_every: int = 500       # steps
    layout: str = "mimic"             # report layout (cxrssl.multimodal.reports)
    val_fraction: float = 0.1         # patient-disjoint report splits
    test_fraction: float = 0.1

    @classmethod
    def from_dict(cls, values: dict) -> MultimodalSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown multimodal setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


#: The CPU demo (measured on the demo data, see the report): ResNet-18 from scratch at 96 px with
#: a 6x6 region grid, a 2-layer BERT from scratch, batch 16 for 20 epochs (~210 steps). 64 px
#: (4x4 regions) or batch 32 (half the steps) learned no pointing-game skill in that budget.
DEMO_SETTINGS = dict(arch="resnet18", init="random", output_stride=16, image_size=96, text_encoder="scratch",
                     vocab_size=1000, text_hidden=128, text_layers=2, text_heads=2, text_intermediate=256,
                     max_tokens=96, max_sentences=10, embed_dim=128, attention_temperature=0.1, batch_size=16,
                     epochs=20, warmup_epochs=1.0, lr=1e-3, lr_text=5e-4, weight_decay=1e-4, workers=0,
                     checkpoint_every=50)
#: Settings that change the trained weights (the resume fingerprint); workers etc. do not.
RESULT_KEYS = tuple(f.name for f in fields(MultimodalSettings) if f.name not in ("workers", "checkpoint_every"))


class MultimodalModel(nn.Module):
    """Image encoder + text encoder + text projections: a batch -> embeddings for the loss."""

    def __init__(self, image: ImageEncoder, text: SentenceTextEncoder, embed_dim: int):
        super().__init__()
        self.image, self.text = image, text
        self.text_global = nn.Linear(text.width, embed_dim)
        self.text_local = nn.Linear(text.width, embed_dim)

    def encode_text(self, input_ids, attention_mask, sentence_ids):
        """(report ``(B, D)``, sentences ``(B, K, D)``, mask ``(B, K)``) in the shared spaces."""
        report, sentences, mask = self.text(input_ids, attention_mask, sentence_ids)
        return self.text_global(report), self.text_local(sentences), mask

    def forward(self, images, input_ids, attention_mask, sentence_ids) -> dict:
        image_global, regions, grid = self.image(images)
        text_global, sentences, mask = self.encode_text(input_ids, attention_mask, sentence_ids)
        return {"image_global": image_global, "regions": regions, "grid": grid, "text_global": text_global,
                "sentences": sentences, "sentence_mask": mask}

    @torch.no_grad()
    def embed_sentences(self, sentences: list[str]) -> torch.Tensor:
        """Local-space embeddings ``(N, D)`` of free-standing sentences (prompts), one report each."""
        device = next(self.parameters()).device
        batch = self.text.collate([self.text.tokenize([s]) for s in sentences])
        _, emb, _ = self.encode_text(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "sentence_ids")))
        return emb[:, 0]


class MultimodalMethod:
    """What a registry needs: build modules, parameter groups and optimizer, the loss of a batch, export."""

    name = METHOD

    def __init__(self, settings: MultimodalSettings | dict):
        self.s = settings if isinstance(settings, MultimodalSettings) else MultimodalSettings.from_dict(settings)

    # --- modules ---------------------------------------------------------------------------------
    def build_model(self, train_texts: list[str] | None, imagenet_weights=None,
                    local_files_only: bool | None = None) -> MultimodalModel:
        """Image and text encoders with projections; ``train_texts`` make the scratch vocabulary."""
        s = self.s
        backbone = resnet_feature_map(s.arch, s.init, imagenet_weights, s.output_stride)
        text = build_text_encoder(s.text_encoder, train_texts, vocab_size=s.vocab_size, hidden=s.text_hidden,
                                  layers=s.text_layers, heads=s.text_heads, intermediate=s.text_intermediate,
                                  max_tokens=s.max_tokens, max_sentences=s.max_sentences, dropout=s.text_dropout,
                                  local_files_only=local_files_only)
        return MultimodalModel(ImageEncoder(backbone, s.embed_dim), text, s.embed_dim)

    def build_loss(self) -> MultimodalLoss:
        s = self.s
        return MultimodalLoss(s.temperature_global, s.temperature_local, s.attention_temperature, s.aggregation,
                              s.global_weight, s.local_weight)

    # --- optimisation ----------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict]:
        """Text encoder at ``lr_text``, the rest at ``lr``; no weight decay on biases and norm weights."""
        model = getattr(model, "module", model)
        groups = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            text = name.startswith("text.")
            decay = p.ndim > 1
            key = ("text" if text else "image", decay)
            groups.setdefault(key, dict(params=[], name=f"{key[0]}{'' if decay else '_no_decay'}",
                                        base_lr=self.s.lr_text if text else self.s.lr,
                                        weight_decay=self.s.weight_decay if decay else 0.0))["params"].append(p)
        return [groups[k] for k in sorted(groups)]

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model), lr=0.0, betas=(0.9, 0.999), eps=1e-8)

    @staticmethod
    def set_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int) -> float:
        """Linear warm-up then cosine (to 0.001 x base) for every group; returns the factor."""
        factor = lr_factor(step, total_steps, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def batch_loss(self, net: nn.Module, loss_fn: MultimodalLoss, batch: dict, device: torch.device,
                   amp: bool = False, gather: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a collated batch (:func:`cxrssl.multimodal.data.collate_pairs`) and its four parts.

        bf16 autocast covers the encoders only (``amp`` on CUDA); the loss runs in float32.
        ``gather``: negatives from every rank (training) or this batch only (validation).
        """
        images = normalize_views(batch["images"], device)
        text = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "sentence_ids")}
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()
        with ctx:
            out = net(images, **text)
        out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
        return loss_fn(out, gather)

    # --- export / reload -------------------------------------------------------------------------
    def export(self, model: nn.Module, out_dir: str | Path, info: dict | None = None) -> Path:
        """Write the exports of the module doc; returns the image encoder's path."""
        model = getattr(model, "module", model)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = model.image.backbone
        path = out / IMAGE_ENCODER
        atomic_torch_save(backbone.export_state_dict(), path)
        atomic_write_json({"method": METHOD, "arch": self.s.arch, "library": "torchvision", "format": "state_dict",
                           "excludes": ["fc"], "output_stride_trained": self.s.output_stride,
                           "image_size": self.s.image_size, "input": "grey replicated to 3 channels, ImageNet "
                           "mean/std", "init": self.s.init, **(info or {})}, out / IMAGE_SIDECAR)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_torch_save(state, out / MODEL)
        _save_text_encoder(model.text, out / TEXT_DIR)
        atomic_write_json({"method": METHOD, "settings": asdict(self.s), **(info or {})}, out / MODEL_JSON)
        return path


def _save_text_encoder(text: SentenceTextEncoder, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder renamed into place: never a half-written folder."""
    quiet_progress()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        text.model.save_pretrained(tmp)
        text.tokenizer.save_pretrained(tmp)
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[MultimodalModel, MultimodalSettings]:
    """Rebuild a trained model from :meth:`MultimodalMethod.export`'s files (no code is unpickled)."""
    run = Path(run_dir)
    meta = json.loads((run / MODEL_JSON).read_text())
    settings = MultimodalSettings.from_dict(meta["settings"])
    text_model, tokenizer = load_pretrained(str(run / TEXT_DIR))
    text = SentenceTextEncoder(text_model, tokenizer, settings.max_tokens, settings.max_sentences)
    backbone = resnet_feature_map(settings.arch, "random", None, settings.output_stride)
    model = MultimodalModel(ImageEncoder(backbone, settings.embed_dim), text, settings.embed_dim)
    state = load_checkpoint(run / MODEL, "multimodal model")
    model.load_state_dict(state)
    return model.to(device).eval(), settings


def total_steps(n_train: int, settings: MultimodalSettings) -> tuple[int, int, int]:
    """(batches per epoch, total steps, warm-up steps) for ``n_train`` pairs."""
    per_epoch = n_train // settings.batch_size
    return per_epoch, per_epoch * settings.epochs, int(math.floor(settings.warmup_epochs * per_epoch + 0.5))
