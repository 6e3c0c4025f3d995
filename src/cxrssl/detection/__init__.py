"""Faster R-CNN + FPN fine-tuning on VinDr-CXR (two engines) and prediction on new images.

Modules, one job each (as in torchvision's references/detection):
``engines`` (the engine registry, the checkpoint format, :func:`load_detector`), ``model`` (build
the torchvision detector), ``dataset`` (COCO JSON -> tensors), ``transforms`` (image reading,
flips), ``schedule`` (the learning rates both engines step), ``engine`` (one epoch, inference, COCO
mAP50), ``train`` (the torchvision engine: a whole run with checkpoints and resume),
``mmdet_config`` / ``mmdet_engine`` (the mmdet engine), ``predict`` (the ``cxrssl-predict`` tool).

Names are imported lazily, so that ``rules/common.smk`` can read :mod:`cxrssl.detection.engines`
without loading torch while Snakemake builds the DAG.
"""

from importlib import import_module

_EXPORTS = {"build_detector": "model", "load_trained_detector": "model", "load_detector": "engines",
            "get_engine": "engines"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"cxrssl.detection.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cxrssl.detection' has no attribute {name!r}")
