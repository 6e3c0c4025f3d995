"""torchvision ResNets with the pipeline's three kinds of initialisation (detection's entry point).

``init`` is ``"random"``, ``"imagenet"`` or a path to a checkpoint. A checkpoint may be a plain
torchvision-format state dict (what ResNet pretraining exports), a dict holding one under
``"state_dict"``/``"model"``/``"backbone"``, or an mmdet/mmengine checkpoint; prefixes such as
``backbone.``/``module.`` are stripped. Weights are always checked: no missing backbone keys.
Every file is read through :func:`cxrssl.runtime.load_checkpoint` (``weights_only``; a file that
holds code is refused with a :class:`~cxrssl.errors.BadInputError` naming it). A checkpoint whose
``backbone.json`` sidecar names another architecture (e.g. a ViT) is refused with a message saying
so. The registry of every backbone (ResNets and ViTs) is :mod:`cxrssl.models.backbones`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from cxrssl.errors import BadInputError
from cxrssl.runtime import load_checkpoint

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50")
#: torchvision ImageNet weights per arch (the paper used IMAGENET1K_V2 for ResNet-50).
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
}
#: Feature width of the last stage (the input of ``fc``).
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_PREFIXES = ("module.", "backbone.body.", "backbone.", "encoder.", "model.")


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could neither be found locally nor downloaded."""


def _constructor(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return getattr(torchvision.models, arch)


def extract_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint and strip wrapper prefixes."""
    state = checkpoint
    for key in ("backbone", "state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint holds no state dict of tensors")
    out = {}
    for name, tensor in state.items():
        stripped = True
        while stripped:  # wrappers nest, e.g. "module.backbone.conv1.weight"
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
                    break
        out[name] = tensor
    return out


def extract_state_dict_of(checkpoint, path: str | Path) -> dict[str, torch.Tensor]:
    """:func:`extract_state_dict` with a refusal that names the file."""
    try:
        return extract_state_dict(checkpoint)
    except ValueError as exc:
        raise BadInputError(str(path), str(exc)) from None


def _check_sidecar(path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose ``backbone.json`` says it is not a torchvision ResNet."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return
    from cxrssl.models.backbones import read_sidecar  # the registry imports this module

    meta = read_sidecar(path)
    if meta is not None and meta["library"] != "torchvision":
        raise BadInputError(str(path), f"is a {meta['arch']} ({meta['library']}) backbone from "
                            f"{meta.get('method') or 'an unknown'} pretraining; this stage needs a torchvision "
                            f"{type(model).__name__} (detection builds ViTs itself: cxrssl.detection.model follows the sidecar)")


def load_backbone_weights(model: nn.Module, path: str | Path, keep_fc: bool = False) -> None:
    """Load a checkpoint into a torchvision ResNet; ``fc`` may be absent, nothing else may.

    ``fc`` is loaded only with ``keep_fc`` (ImageNet classifiers); self-supervised and detection
    checkpoints carry no meaningful classifier.
    """
    path = Path(path)
    _check_sidecar(path, model)
    state = extract_state_dict_of(load_checkpoint(path, "backbone checkpoint"), path)
    if not keep_fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another arch's weights
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise ValueError(f"{path}: does not fit {type(model).__name__} ({first})") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: does not fit {type(model).__name__}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
    log.info("loaded backbone weights from %s", path)


def load_imagenet_weights(model: nn.Module, arch: str, local_path: str | Path | None = None) -> None:
    """ImageNet weights from ``local_path`` (a state dict) or torchvision's download cache."""
    if local_path:
        load_backbone_weights(model, local_path, keep_fc=True)
        return
    weights = torchvision.models.get_weight(IMAGENET_WEIGHTS[arch])
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # no network, proxy, certificate...: say what to fetch instead
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not available offline and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download {weights.url} on a machine with internet, "
            f"copy it here and set `imagenet_weights: /path/to/{Path(weights.url).name}` in config.yaml "
            f"(or put it in torch's cache, {torch.hub.get_dir()}/checkpoints/)."
        ) from exc
    model.load_state_dict(state)
    log.info("loaded torchvision %s weights", IMAGENET_WEIGHTS[arch])


def build_resnet(arch: str, init: str = "random", imagenet_weights: str | Path | None = None,
                 norm_layer=None, zero_init_residual: bool = False) -> nn.Module:
    """A torchvision ResNet initialised from ``random``, ``imagenet`` or a checkpoint path.

    ``fc`` is kept (as in torchvision) so exported state dicts load into
    ``torchvision.models.resnetXX`` unchanged; callers that need features replace it by Identity.
    ``zero_init_residual`` zeroes the last BatchNorm of every residual block (torchvision's
    option; the random-init arm of the authors' pretraining code used it). It only matters for
    ``random``: other inits overwrite every weight.
    """
    kwargs = {"norm_layer": norm_layer} if norm_layer is not None else {}
    if zero_init_residual:
        kwargs["zero_init_residual"] = True
    model = _constructor(arch)(weights=None, **kwargs)
    if init == "random":
        pass
    elif init == "imagenet":
        load_imagenet_weights(model, arch, imagenet_weights)
    else:
        load_backbone_weights(model, init)
    return model


def backbone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision-format state dict without ``fc`` (what detection and mmdet's ResNet load)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
