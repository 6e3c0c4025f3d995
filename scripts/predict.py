#!/usr/bin/env python
"""Detect VinDr-CXR abnormalities on new DICOM/PNG files with a trained detector (= cxrssl-predict).

Writes submission.csv (Kaggle VinBigData format, original pixels), predictions.json (COCO results)
and overlays/*.png into --out-dir. See --help.
"""

from cxrssl.detection.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
