#!/usr/bin/env python
"""Fine-tune Faster R-CNN + FPN with mmdet 3.3 (mmengine Runner) for one init x resolution x seed.

The paper's own framework, as a second engine beside the torchvision one. Writes best.pth (best val
bbox mAP50), last.pth, train_log.csv, train_curve.png and predictions_test.json (COCO results in
the converted pixels of coco_test.json) into --out-dir; mmengine's own logs go to
<out-dir>/mmdet_work. A rerun starts over. Settings come from the `detection` config section (see
--help). Needs mmcv 2.1.0 with compiled ops: `make mmcv` or `make install-mmdet MMCV_WHEEL=...`.
"""

import argparse

from cxrssl.config import add_section_args, section_args

EXCLUDE = ("engine", "engines", "inits", "resolutions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="Backbone init: random, imagenet or a checkpoint path.")
    parser.add_argument("--res", required=True, type=int, help="Input resolution: longest image side in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation, data order and flips.")
    parser.add_argument("--train-json", required=True, help="coco_train.json")
    parser.add_argument("--val-json", required=True, help="coco_val.json (selects the best epoch by mAP50)")
    parser.add_argument("--test-json", required=True, help="coco_test.json (predicted with the best epoch)")
    parser.add_argument("--out-dir", required=True, help="Run folder.")
    parser.add_argument("--imagenet-weights", default=None, help="Local ImageNet state dict (offline machines).")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, "detection", exclude=EXCLUDE)
    args = parser.parse_args()

    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    # Imported after parsing so that --help works without mmcv installed.
    from cxrssl.detection.mmdet_engine import train

    train(args.train_json, args.val_json, args.test_json, args.out_dir, init=args.init, res=args.res,
          seed=args.seed, params=section_args(args, "detection", exclude=EXCLUDE),
          imagenet_weights=args.imagenet_weights)


if __name__ == "__main__":
    main()
