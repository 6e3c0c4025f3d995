"""Faster R-CNN + FPN fine-tuning on VinDr-CXR (torchvision engine) and prediction on new images.

Modules, one job each (as in torchvision's references/detection):
``model`` (build / load the detector), ``dataset`` (COCO JSON -> tensors), ``transforms``
(image reading, flips), ``engine`` (one epoch, inference, COCO mAP50), ``train`` (a whole run with
checkpoints and resume), ``predict`` (the ``cxrssl-predict`` tool).
"""

from cxrssl.detection.model import build_detector, load_trained_detector

__all__ = ["build_detector", "load_trained_detector"]
