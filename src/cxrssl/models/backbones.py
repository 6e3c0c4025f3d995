"""Backbone registry: torchvision ResNets and timm ViTs, built, initialised and exported alike.

Every registered backbone (:data:`BACKBONES`) is its library's own model, so what pretraining
exports is a plain state dict that the library loads unchanged:

* ResNets: ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` (only ``fc.*``
  missing);
* ViTs: ``timm.create_model(model_name, **model_kwargs).load_state_dict(sd, strict=False)`` (only
  ``head.*`` missing), with ``model_name`` and ``model_kwargs`` from the sidecar.

A small JSON sidecar next to ``backbone.pth`` (``backbone.json``: method, arch, library,
model name and arguments, image size, patch size, feature width, config fingerprint) tells
downstream stages which backbone to build; see :func:`write_sidecar` / :func:`read_sidecar`.

``init`` is ``random``, ``imagenet`` (torchvision's or timm's weights, or a local file given as
``imagenet_weights``; offline machines get a :class:`WeightsUnavailableError` that names the file
to fetch) or a checkpoint path. Every file goes through :func:`cxrssl.runtime.load_checkpoint`
(``weights_only``) or, for ``.safetensors``, the safetensors reader: no file's content runs.

Encoders built here return features: a ResNet with ``fc = Identity`` gives the pooled ``(B, C)``
map, a timm ViT built with ``num_classes=0`` gives its pre-logits (the CLS token). ViTs are built
with ``dynamic_img_size=True`` so they run at any multiple of the patch size (the position
embedding is interpolated); weights made at another image size are resampled on load by timm's
``checkpoint_filter_fn``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from cxrssl.errors import BadInputError
from cxrssl.io import atomic_write_json
from cxrssl.models.backbone import (WeightsUnavailableError, build_resnet, extract_state_dict_of)
from cxrssl.runtime import load_checkpoint

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "cxrssl-backbone-1"
SIDECAR_KEYS = ("format", "method", "arch", "library", "model_name", "model_kwargs", "image_size", "patch_size",
                "feature_dim", "fingerprint")
POOLS = ("mean", "cls")


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: which library builds it, with which arguments."""

    name: str
    library: str  # "torchvision" or "timm"
    model_name: str  # torchvision builder or timm model name
    feature_dim: int
    patch_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm arguments beyond the model name's
    imagenet: bool = True  # whether the library has ImageNet weights for it

    @property
    def family(self) -> str:
        return "vit" if self.library == "timm" else "resnet"

    def library_kwargs(self, image_size: int) -> dict[str, Any]:
        """Arguments that rebuild the bare library model (no classifier change) at ``image_size``."""
        return {**self.kwargs, "img_size": int(image_size)} if self.family == "vit" else {}


#: Registered backbones. ``vit_tiny_patch8`` is timm's ViT-Ti with 8-px patches and 4 blocks: a
#: ViT small enough for the CPU demo (about 1.8 M parameters); it has no ImageNet weights.
BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec("resnet18", "torchvision", "resnet18", 512),
    BackboneSpec("resnet34", "torchvision", "resnet34", 512),
    BackboneSpec("resnet50", "torchvision", "resnet50", 2048),
    BackboneSpec("vit_small_patch16", "timm", "vit_small_patch16_224", 384, 16),
    BackboneSpec("vit_base_patch16", "timm", "vit_base_patch16_224", 768, 16),
    BackboneSpec("vit_tiny_patch8", "timm", "vit_tiny_patch16_224", 192, 8, {"patch_size": 8, "depth": 4},
                 imagenet=False),
)}


def get_spec(arch: str) -> BackboneSpec:
    try:
        return BACKBONES[arch]
    except KeyError:
        raise ValueError(f"unknown backbone {arch!r}; registered: {', '.join(BACKBONES)}") from None


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    if spec.patch_size and image_size % spec.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of {spec.name}'s patch size {spec.patch_size}")


# --- files ----------------------------------------------------------------------------------------

def load_state_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint (``.safetensors`` or a torch file), wrappers stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors holds tensors only; a bad file is just unreadable
            raise BadInputError(str(path), f"not a readable safetensors {what} ({type(exc).__name__}: {exc})") from None
    return extract_state_dict_of(load_checkpoint(path, what), path)


def sidecar_path(backbone_path: str | Path) -> Path:
    return Path(backbone_path).with_suffix(".json")


def write_sidecar(backbone_path: str | Path, spec: BackboneSpec, *, method: str, image_size: int,
                  fingerprint: str) -> Path:
    """Write ``backbone.json`` next to ``backbone.pth`` (atomically)."""
    meta = {"format": SIDECAR_FORMAT, "method": method, "arch": spec.name, "library": spec.library,
            "model_name": spec.model_name, "model_kwargs": spec.library_kwargs(image_size),
            "image_size": int(image_size), "patch_size": spec.patch_size, "feature_dim": spec.feature_dim,
            "fingerprint": fingerprint}
    path = sidecar_path(backbone_path)
    atomic_write_json(meta, path)
    return path


def read_sidecar(backbone_path: str | Path) -> dict | None:
    """The sidecar of a backbone checkpoint, checked; None when there is none (a plain state dict)."""
    path = sidecar_path(backbone_path)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(str(path), f"not a readable backbone sidecar: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise BadInputError(str(path), f"not a {SIDECAR_FORMAT} sidecar")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise BadInputError(str(path), f"missing keys {missing}")
    if meta["arch"] not in BACKBONES:
        raise BadInputError(str(path), f"unknown arch {meta['arch']!r}; registered: {', '.join(BACKBONES)}")
    return meta


def checkpoint_arch(init: str, default: str) -> str:
    """The arch a backbone ``init`` needs: its sidecar's for a pretrained checkpoint, else ``default``."""
    if init in ("random", "imagenet"):
        return default
    meta = read_sidecar(init)
    return meta["arch"] if meta else default


def library_model(meta: dict) -> nn.Module:
    """The bare library model a sidecar describes (what its ``backbone.pth`` loads into unchanged)."""
    if meta["library"] == "torchvision":
        return getattr(torchvision.models, meta["model_name"])()
    import timm

    return timm.create_model(meta["model_name"], pretrained=False, **meta["model_kwargs"])


# --- building -------------------------------------------------------------------------------------

def build_backbone(arch: str, init: str = "random", imagenet_weights: str | Path | None = None,
                   image_size: int = 224, zero_init_residual: bool = False) -> nn.Module:
    """The encoder ``arch`` (classifier removed, returns ``(B, feature_dim)``), initialised from ``init``.

    A checkpoint with a sidecar must be of ``arch`` (use :func:`checkpoint_arch` to follow the
    checkpoint). ``zero_init_residual`` applies to random ResNets (see
    :func:`cxrssl.models.backbone.build_resnet`).
    """
    spec = get_spec(arch)
    check_image_size(spec, image_size)
    if init not in ("random", "imagenet"):
        meta = read_sidecar(init)
        if meta is not None and meta["arch"] != arch:
            raise BadInputError(str(init), f"is a {meta['arch']} backbone, not the {arch} this run builds")
    if spec.family == "resnet":
        model = build_resnet(arch, init, imagenet_weights, zero_init_residual=zero_init_residual)
        model.fc = nn.Identity()
        return model
    return _build_vit(spec, init, imagenet_weights, image_size)


def _create_vit(spec: BackboneSpec, image_size: int, pretrained: bool = False) -> nn.Module:
    import timm

    return timm.create_model(spec.model_name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                             **spec.library_kwargs(image_size))


def _build_vit(spec: BackboneSpec, init: str, imagenet_weights, image_size: int) -> nn.Module:
    if init == "imagenet" and not spec.imagenet:
        raise ValueError(f"{spec.name} is a demo architecture without ImageNet weights; use init random")
    if init == "imagenet" and not imagenet_weights:
        try:
            model = _create_vit(spec, image_size, pretrained=True)
        except Exception as exc:  # no network, hub unreachable...: say what to fetch instead
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(spec.model_name)
            source = getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None) or spec.model_name
            raise WeightsUnavailableError(
                f"ImageNet weights for {spec.name} (timm {spec.model_name}) are not available offline and "
                f"could not be downloaded ({type(exc).__name__}: {exc}). Download model.safetensors of "
                f"https://huggingface.co/{source} on a machine with internet, copy it here and set "
                f"`imagenet_weights: {{{spec.name}: /path/to/model.safetensors}}` in config.yaml."
            ) from exc
        log.info("loaded timm %s ImageNet weights", spec.model_name)
        return model
    model = _create_vit(spec, image_size)
    if init != "random":
        path = imagenet_weights if init == "imagenet" else init
        load_vit_weights(model, path, "ImageNet weights" if init == "imagenet" else "backbone checkpoint")
    return model


def load_vit_weights(model: nn.Module, path: str | Path, what: str = "backbone checkpoint") -> None:
    """Load a timm ViT state dict (any image size: timm resamples the position embedding)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k: v for k, v in load_state_file(path, what).items() if not k.startswith("head.")}
    try:
        state = checkpoint_filter_fn(state, model)
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise BadInputError(str(path), f"does not fit {type(model).__name__} ({first[:300]})") from None
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise BadInputError(str(path), f"does not fit {type(model).__name__}: missing {missing[:5]}, "
                            f"unexpected {result.unexpected_keys[:5]}")
    log.info("loaded ViT weights from %s", path)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The library's plain state dict without the classifier (``fc.*`` / ``head.*``), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith(("fc.", "head."))}


def family_of(model: nn.Module) -> str:
    """``vit`` for a timm VisionTransformer, else ``resnet``."""
    return "vit" if hasattr(model, "forward_features") and hasattr(model, "num_prefix_tokens") else "resnet"


class PooledFeatures(nn.Module):
    """ViT encoder -> one vector per image: mean of the patch tokens (``mean``) or the CLS token (``cls``).

    Both after timm's final LayerNorm. A ResNet is returned features as is (global average pool).
    """

    def __init__(self, encoder: nn.Module, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.encoder, self.pool = encoder, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.encoder.num_prefix_tokens:].mean(1)


def feature_extractor(encoder: nn.Module, pool: str = "mean") -> nn.Module:
    """An encoder from :func:`build_backbone` as a ``(B, C, H, W) -> (B, D)`` feature module."""
    return PooledFeatures(encoder, pool) if family_of(encoder) == "vit" else encoder
