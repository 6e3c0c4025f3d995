"""The pretraining-method registry: one module per method under :mod:`cxrssl.ssl.methods`.

A method is a subclass of :class:`PretrainMethod` decorated with :func:`register`, in its own
module of ``cxrssl/ssl/methods/`` (found by :func:`methods`, which imports every module there),
plus its settings block ``pretrain.<name>`` in the config schema. It brings:

* ``sample``: the per-sample function run in loader workers (augmented views, corruption), given
  the image source, the image index and the sample's own seed; it returns uint8 tensors;
* ``build_model``: head and loss around the encoder (``model.backbone`` is what is exported);
  ``model(*inputs)`` returns the loss;
* ``inputs``: the batch on the device (normalisation);
* ``optimizer`` (its parameter groups) and ``schedule`` (learning rate, weight decay per step);
* ``clip_gradients`` (optional).

The training loop (:mod:`cxrssl.ssl.train`) is shared: data, DDP, AMP, checkpoints, resume,
metrics and the backbone export are the same for every method. Adding a method touches its
module and its schema block only; the rules take the method as a wildcard and every method's
backbone becomes a downstream ``init`` of the same name.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from importlib import import_module
from typing import ClassVar

import torch
from torch import nn

from cxrssl.models.backbones import BackboneSpec, get_spec

_REGISTRY: dict[str, type[PretrainMethod]] = {}


def register(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    """Class decorator: make ``cls`` the method called ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two pretraining methods are called {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def methods() -> dict[str, type[PretrainMethod]]:
    """Every registered method (imports each module of :mod:`cxrssl.ssl.methods` once)."""
    package = import_module("cxrssl.ssl.methods")
    for info in pkgutil.iter_modules(package.__path__):
        import_module(f"{package.__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[PretrainMethod]:
    found = methods()
    if name not in found:
        raise ValueError(f"unknown pretraining method {name!r}; registered: {', '.join(found)}")
    return found[name]


class PretrainMethod:
    """Base class of a pretraining method; see the module docstring for what a subclass defines.

    ``settings`` is the method's block (``pretrain.<name>``, which holds at least ``arch`` and
    ``init``), ``common`` the shared ``pretrain`` settings (``epochs``, ``batch_size``,
    ``image_size``, ``warmup_epochs``, ``amp``, ...).
    """

    name: ClassVar[str]
    title: ClassVar[str]  # for plots and logs, e.g. "Barlow Twins"
    families: ClassVar[tuple[str, ...]] = ("resnet", "vit")  # backbone families it can train
    lr_columns: ClassVar[tuple[str, ...]]  # what schedule() returns, logged per step in metrics.csv

    def __init__(self, settings: dict, common: dict):
        self.s, self.common = settings, common
        self.spec: BackboneSpec = get_spec(settings["arch"])
        if self.spec.family not in self.families:
            raise ValueError(f"{self.name} trains {'/'.join(self.families)} backbones, not {self.spec.name}")

    # --- worker side ----------------------------------------------------------------------------
    def sample(self) -> Callable:
        """A picklable ``(images, index, seed) -> tuple of uint8 tensors``."""
        raise NotImplementedError

    # --- device side ----------------------------------------------------------------------------
    def build_model(self, encoder: nn.Module, global_batch: int) -> nn.Module:
        raise NotImplementedError

    def inputs(self, batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def schedule(self, optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int,
                 global_batch: int) -> dict[str, float]:
        raise NotImplementedError

    def clip_gradients(self, model: nn.Module) -> None:
        """Called between backward and the optimizer step; nothing by default."""
