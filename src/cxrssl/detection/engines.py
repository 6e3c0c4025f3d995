"""The detection-engine contract: a registry of engines behind one interface, and one checkpoint format.

An engine (``torchvision``: :mod:`cxrssl.detection.train`; ``mmdet``: :mod:`cxrssl.detection.mmdet_engine`)
is a module exposing ``ENGINE``, an object with

* ``train(train_json, val_json, test_json, out_dir, *, init, res, seed, settings, imagenet_weights=None,
  device=None, init_name=None) -> dict``: one run from the ``detection`` settings, writing the run folder
  of CONTRIBUTING.md (``best.pth``, ``train_log.csv``, ``train_curve.png``, ``predictions_test.json``);
* ``build_from_meta(meta, state_dict, score_thr=None) -> nn.Module``: the trained network rebuilt from
  a checkpoint's meta alone, as a :data:`detector protocol <load_detector>` module.

Every ``best.pth`` / ``last.pth`` is ``{"meta": meta, "model": state_dict}``; ``meta`` is plain
JSON-able data (checked by :func:`check_meta`), never code: an engine rebuilds its network from it
(mmdet: the config is rebuilt by :func:`cxrssl.detection.mmdet_config.model_cfg` from ``settings``;
stored config text is never evaluated). Checkpoints load through
:func:`cxrssl.runtime.load_checkpoint` (tensors and plain data only).

This module imports neither torch nor an engine at import time: ``rules/common.smk`` reads
:data:`RUN_SETTINGS` and :func:`engine_names` while Snakemake builds the DAG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

#: Engine name -> module holding its ``ENGINE`` (imported on first use: mmdet needs mmcv's ops).
ENGINES = {"torchvision": "cxrssl.detection.train", "mmdet": "cxrssl.detection.mmdet_engine"}
#: Settings of the ``detection`` section that select runs (Snakemake wildcards) rather than configure
#: one; scripts do not take them and changing them never reruns a finished run.
RUN_SETTINGS = ("engine", "engines", "inits", "resolutions")
#: Nested sections of ``detection`` that are not training settings.
NOT_TRAINING = ("predict",)
#: Training settings of ViT detectors only: the torchvision engine's (mmdet is ResNet-only, refuse_vit).
VIT_SETTINGS = ("vit_optimizer", "vit_lr", "vit_weight_decay")
CHECKPOINT_FORMAT = 2
#: Keys every checkpoint meta holds, whatever the engine.
META_KEYS = ("format", "engine", "arch", "init", "init_name", "res", "seed", "classes", "num_classes",
             "settings", "input_size", "input_bit_depth")


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINES)


def get_engine(name: str):
    """The ``ENGINE`` object of a registered engine (imports its module)."""
    if name not in ENGINES:
        raise ValueError(f"unknown detection engine {name!r}; expected one of {engine_names()}")
    return import_module(ENGINES[name]).ENGINE


def training_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``detection`` section without the run-selecting settings and nested tool sections."""
    return {k: v for k, v in section.items() if k not in RUN_SETTINGS + NOT_TRAINING}


def _plain(value: Any, where: str) -> Any:
    """``value`` if it is JSON data (dicts with str keys, lists, str, finite numbers, bools, None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"checkpoint meta {where} is not a finite number: {value!r}")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"checkpoint meta {where} has a non-string key {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise ValueError(f"checkpoint meta {where} is a {type(value).__name__}, not plain JSON data")


def make_meta(engine: str, *, arch: str, init: str, init_name: str | None, res: int, seed: int,
              settings: Mapping[str, Any], input_size: int, input_bit_depth: int, **extra: Any) -> dict:
    """The meta every engine stores in its checkpoints (plain JSON data, checked)."""
    from cxrssl.classes import VINDR_CLASSES

    meta = {"format": CHECKPOINT_FORMAT, "engine": engine, "arch": arch, "init": str(init),
            "init_name": str(init_name or init), "res": int(res), "seed": int(seed),
            "classes": list(VINDR_CLASSES), "num_classes": len(VINDR_CLASSES) + 1,
            "settings": training_settings(settings), "input_size": int(input_size),
            "input_bit_depth": int(input_bit_depth), **extra}
    return check_meta(meta, "new checkpoint")


def check_meta(meta: Any, where: str) -> dict:
    """``meta`` as plain JSON data with the common keys and the canonical class table."""
    from cxrssl.classes import VINDR_CLASSES

    if not isinstance(meta, Mapping):
        raise ValueError(f"{where}: checkpoint meta is not a mapping")
    plain = _plain(meta, "meta")
    json.dumps(plain)  # JSON-able by construction; fails loudly otherwise
    missing = [k for k in META_KEYS if k not in plain]
    if missing:
        raise ValueError(f"{where}: checkpoint meta lacks {missing}")
    if plain["engine"] not in ENGINES:
        raise ValueError(f"{where}: unknown engine {plain['engine']!r} in the checkpoint meta")
    if plain["classes"] != list(VINDR_CLASSES):
        raise ValueError(f"{where}: checkpoint class table {plain['classes']} differs from "
                         f"cxrssl.classes.VINDR_CLASSES")
    return plain


def _legacy_meta(ckpt: dict, path: Path) -> dict:
    """Format-1 checkpoints: torchvision's meta (upgraded), mmdet's held Python config text (refused)."""
    if ckpt.get("engine") == "mmdet" or "state_dict" in ckpt:
        raise ValueError(f"{path}: an mmdet checkpoint of the old format, whose network is described by "
                         f"stored config code; cxrssl never executes stored code: retrain the run")
    meta = dict(ckpt["meta"])
    meta.update({k: ckpt[k] for k in ("epoch", "val_mAP50") if k in ckpt})
    meta.setdefault("engine", "torchvision")
    meta.setdefault("format", 1)
    meta.setdefault("init_name", meta.get("init"))
    meta.setdefault("seed", 0)
    meta.setdefault("settings", {})
    meta.setdefault("input_size", 0)
    meta.setdefault("input_bit_depth", 8)
    return meta


def read_checkpoint(path: str | Path, what: str = "detector checkpoint") -> tuple[dict, dict]:
    """(meta, state dict) of a detection checkpoint, loaded without unpickling code.

    Raises :class:`cxrssl.errors.BadInputError` naming the file for anything that is not a cxrssl
    detection checkpoint (a refused pickle, another format, a meta that is not plain data).
    """
    from cxrssl.errors import BadInputError
    from cxrssl.runtime import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path, what)
    if not isinstance(ckpt, dict) or "meta" not in ckpt or not ({"model", "state_dict"} & set(ckpt)):
        raise BadInputError(str(path), f"not a cxrssl {what} (needs 'meta' and 'model')")
    try:
        meta = ckpt["meta"] if ckpt["meta"].get("format", 1) >= 2 else _legacy_meta(ckpt, path)
        meta = check_meta(meta, str(path))
    except (AttributeError, ValueError) as exc:
        raise BadInputError(str(path), str(exc)) from None
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise BadInputError(str(path), "its 'model' entry is not a state dict")
    return meta, state


def load_detector(checkpoint: str | Path, device="cpu", score_thr: float | None = None):
    """A trained detector of any engine in eval mode on ``device``, and its meta.

    The module answers like a torchvision detector: ``model(images)`` takes a list of (3, H, W)
    float tensors in [0, 1] and returns one ``{"boxes" (xyxy, input pixels), "labels" (COCO ids
    1..14), "scores"}`` dict per image; ``model.backbone`` returns the FPN levels (the CAM target);
    ``model.input_geometry(h, w)`` gives (resized h, w, padded h, w) of an input. ``score_thr``
    replaces the stored lowest score kept.
    """
    from cxrssl.errors import BadInputError

    path = Path(checkpoint)
    meta, state = read_checkpoint(path)
    engine = get_engine(meta["engine"])
    try:
        model = engine.build_from_meta(meta, state, score_thr=score_thr)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise BadInputError(str(path), f"does not rebuild as a {meta['engine']} detector: {exc}") from None
    return model.to(device).eval(), meta
