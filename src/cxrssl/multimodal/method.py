"""The multimodal method as pieces a pretraining registry can wrap: settings, modules, parameter
groups, optimizer, the loss of a batch, export and reload.

:class:`MultimodalSettings` is the schema block ``pretrain.multimodal`` (defaults there, with their
sources: the paper (arXiv 2401.01524) publishes no code or hyperparameters beyond ResNet-50 +
BioClinicalBERT; the others follow GLoRIA's public recipe). The CPU demo's values are in
config.yaml.

Exports (:meth:`MultimodalMethod.export`) in ``out_dir``:

* ``backbone.pth``: plain torchvision ResNet state dict without ``fc`` (the project's backbone
  contract: linear evaluation and detection take it as ``init``), with the registry's sidecar
  ``backbone.json`` (:func:`cxrssl.models.backbones.write_sidecar`);
* ``model.pth`` (every weight, tensors only) + ``text_encoder/`` (Hugging Face folder: config,
  weights, tokenizer; renamed into place whole) + ``model.json`` (settings; written last), which
  :func:`load_trained` rebuilds for zero-shot localisation.
"""

from __future__ import annotations

import hashlib
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
from cxrssl.models.backbones import get_spec, write_sidecar
from cxrssl.multimodal.image import ImageEncoder, resnet_feature_map
from cxrssl.multimodal.losses import MultimodalLoss
from cxrssl.multimodal.text import (SentenceTextEncoder, build_text_encoder, load_pretrained,
                                    quiet_progress)
from cxrssl.runtime import load_checkpoint
from cxrssl.ssl.augment import normalize_views
from cxrssl.ssl.lars import lr_factor

METHOD = "multimodal"
#: Embedding spaces of the model: sentence-region (``local``) and image-report (``global``).
SPACES = ("local", "global")
IMAGE_ENCODER, IMAGE_SIDECAR, MODEL, MODEL_JSON, TEXT_DIR = (
    "backbone.pth", "backbone.json", "model.pth", "model.json", "text_encoder")


def _schema_defaults() -> dict:
    """The defaults of the ``pretrain.multimodal`` schema block (the one place they live)."""
    from cxrssl.config import section_defaults

    return section_defaults(f"pretrain.{METHOD}")


_D = _schema_defaults()


@dataclass
class MultimodalSettings:
    """The ``pretrain.multimodal`` block (schema: meaning, source and default of each setting)."""

    reports_root: str = _D["reports_root"]   # report corpus (the prepare_reports rule's input)
    layout: str = _D["layout"]               # report layout (cxrssl.multimodal.reports)
    val_fraction: float = _D["val_fraction"]  # patient-disjoint report splits
    test_fraction: float = _D["test_fraction"]
    arch: str = _D["arch"]
    init: str = _D["init"]
    output_stride: int = _D["output_stride"]
    local_features: str = _D["local_features"]
    image_size: int = _D["image_size"]
    text_encoder: str = _D["text_encoder"]
    vocab_size: int = _D["vocab_size"]
    text_hidden: int = _D["text_hidden"]
    text_layers: int = _D["text_layers"]
    text_heads: int = _D["text_heads"]
    text_intermediate: int = _D["text_intermediate"]
    text_dropout: float | None = _D["text_dropout"]
    max_tokens: int = _D["max_tokens"]
    max_sentences: int = _D["max_sentences"]
    sentence_context: str = _D["sentence_context"]
    embed_dim: int = _D["embed_dim"]
    temperature_global: float = _D["temperature_global"]
    temperature_local: float = _D["temperature_local"]
    attention_temperature: float = _D["attention_temperature"]
    aggregation: float = _D["aggregation"]
    global_weight: float = _D["global_weight"]
    local_weight: float = _D["local_weight"]
    batch_size: int = _D["batch_size"]
    epochs: int = _D["epochs"]
    warmup_epochs: float = _D["warmup_epochs"]
    lr: float = _D["lr"]
    lr_text: float = _D["lr_text"]
    weight_decay: float = _D["weight_decay"]
    amp: bool = _D["amp"]
    workers: int = _D["workers"]
    checkpoint_every: int = _D["checkpoint_every"]

    @classmethod
    def from_dict(cls, values: dict) -> MultimodalSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown multimodal setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


#: What an export written before a setting existed was built with (load_trained).
LEGACY_SETTINGS = {"local_features": "layer4", "sentence_context": "report"}

#: Settings that change the trained weights (the resume fingerprint); workers etc. do not.
RESULT_KEYS = tuple(f.name for f in fields(MultimodalSettings)
                    if f.name not in ("workers", "checkpoint_every", "reports_root"))


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
    def embed_sentences(self, sentences: list[str], space: str = "local") -> torch.Tensor:
        """Embeddings ``(N, D)`` of free-standing sentences (prompts), each its own report: in the
        ``local`` (sentence-region) space, or the ``global`` (image-report) one."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        device = next(self.parameters()).device
        batch = self.text.collate([self.text.tokenize([s]) for s in sentences])
        report, emb, _ = self.encode_text(*(batch[k].to(device) for k in ("input_ids", "attention_mask", "sentence_ids")))
        return emb[:, 0] if space == "local" else report


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
                                  local_files_only=local_files_only, context=s.sentence_context)
        return MultimodalModel(ImageEncoder(backbone, s.embed_dim, s.local_features), text, s.embed_dim)

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
        """AdamW, fused (one kernel over all parameters: a quarter of the per-parameter loop's time
        on a CPU, where that loop was a fifth of the demo's step)."""
        return torch.optim.AdamW(self.param_groups(model), lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)

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
        # the registry's sidecar, as every method's backbone.json (linear evaluation and detection read it)
        write_sidecar(path, get_spec(self.s.arch), method=METHOD, image_size=self.s.image_size,
                      fingerprint=hashlib.sha256(json.dumps({**asdict(self.s), **(info or {})}, sort_keys=True,
                                                            default=str).encode()).hexdigest())
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
    # exports older than these settings were built without them: layer4 regions, report context
    settings = MultimodalSettings.from_dict({**LEGACY_SETTINGS, **meta["settings"]})
    text_model, tokenizer = load_pretrained(str(run / TEXT_DIR))
    text = SentenceTextEncoder(text_model, tokenizer, settings.max_tokens, settings.max_sentences,
                               settings.sentence_context)
    backbone = resnet_feature_map(settings.arch, "random", None, settings.output_stride)
    model = MultimodalModel(ImageEncoder(backbone, settings.embed_dim, settings.local_features), text,
                            settings.embed_dim)
    state = load_checkpoint(run / MODEL, "multimodal model")
    model.load_state_dict(state)
    return model.to(device).eval(), settings


def total_steps(n_train: int, settings: MultimodalSettings) -> tuple[int, int, int]:
    """(batches per epoch, total steps, warm-up steps) for ``n_train`` pairs."""
    per_epoch = n_train // settings.batch_size
    return per_epoch, per_epoch * settings.epochs, int(math.floor(settings.warmup_epochs * per_epoch + 0.5))
