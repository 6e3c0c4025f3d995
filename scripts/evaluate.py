#!/usr/bin/env python
"""Evaluate COCO detection results: COCO mAP, the VinBigData metric (VOC 2010 mAP@0.4 with "No
finding"), bootstrap intervals (percentile, BCa) of mAP50 over a fixed class set (= ``cxrssl evaluate``).

Works on any COCO GT JSON and COCO results list, e.g.
    python scripts/evaluate.py --gt coco_test.json --results predictions_test.json --out metrics.json
"""

from cxrssl.evaluation.command import main

if __name__ == "__main__":
    raise SystemExit(main())
