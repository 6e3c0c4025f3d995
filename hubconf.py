"""torch.hub entry points of cxrssl: pretrained encoders and trained detectors from local weights.

    encoder = torch.hub.load("path/to/cxrssl", "barlowtwins_resnet50", source="local",
                             weights="results/pretrain/barlowtwins/backbone.pth")
    detector = torch.hub.load("path/to/cxrssl", "detector", source="local",
                              weights="results/detection/torchvision/barlowtwins_640px_seed0/best.pth")

One entry ``<method>_<arch>`` per registered pretraining method (:mod:`cxrssl.ssl.registry`) and
each registered backbone (:mod:`cxrssl.models.backbones`) of a family the method trains. An
encoder entry returns the backbone without its classifier (``(B, 3, H, W) -> (B, feature_dim)``);
``weights`` is a pretraining ``backbone.pth`` (or an exported ``<method>_<arch>.pth``), checked
against its sidecar when there is one; without ``weights`` the encoder is randomly initialised
(cxrssl ships no weights and downloads none). ``detector`` returns a trained detector of any
engine (:func:`cxrssl.detection.engines.load_detector`) in eval mode.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch", "torchvision", "timm"]

_SRC = _Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in _sys.path:
    _sys.path.insert(0, str(_SRC))


def _encoder_entry(method: str, arch: str):
    def entry(weights=None, image_size=None, **kwargs):
        from cxrssl.models.backbones import build_backbone, read_sidecar

        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        meta = read_sidecar(weights) if weights is not None else None
        if meta is not None and meta["method"] != method:
            raise ValueError(f"{weights} was pretrained with {meta['method']}, not {method}")
        if meta is not None and meta["arch"] != arch:
            raise ValueError(f"{weights} is a {meta['arch']} backbone, not {arch}")
        size = int(image_size or (meta["image_size"] if meta else 224))
        return build_backbone(arch, "random" if weights is None else str(weights), image_size=size).eval()

    entry.__name__ = f"{method}_{arch}"
    entry.__doc__ = (f"{arch} encoder pretrained with {method}: ``weights`` = its backbone.pth "
                     f"(random initialisation without). Returns (B, 3, H, W) -> (B, features).")
    return entry


def _register_encoders() -> None:
    from cxrssl.models.backbones import BACKBONES
    from cxrssl.ssl.registry import methods

    for name, cls in methods().items():
        for arch, spec in BACKBONES.items():
            if spec.family in cls.families:
                globals()[f"{name}_{arch}"] = _encoder_entry(name, arch)


_register_encoders()


def detector(weights, score_thr=None, device="cpu"):
    """A trained cxrssl detector (``best.pth`` of a detection run, either engine) in eval mode.

    ``model([image])`` takes (3, H, W) float images in [0, 1] and returns one dict of ``boxes``
    (xyxy, input pixels), ``labels`` (COCO ids 1..14 of cxrssl.classes) and ``scores`` per image.
    """
    from cxrssl.detection.engines import load_detector

    return load_detector(weights, device=device, score_thr=score_thr)[0]
