"""Deterministic synthetic demo data in the real NIH ChestX-ray14 and VinDr-CXR layouts.

``make_demo_dataset(root, ...)`` writes ``root/nih`` (Kaggle layout), ``root/vindr`` (PhysioNet and
Kaggle annotation files side by side) and, last, ``root/manifest.json`` which marks completion.
"""

from cxrssl.demo.generate import MANIFEST, make_demo_dataset

__all__ = ["MANIFEST", "make_demo_dataset"]
