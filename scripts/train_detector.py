#!/usr/bin/env python
"""Fine-tune Faster R-CNN + FPN on the VinDr COCO splits for one engine x init x resolution x seed.

Either detection engine (cxrssl.detection.engines): torchvision (resumes an interrupted run from
last.pth; multi-GPU through torchrun with the same flags) or mmdet 3.3 (mmengine Runner; a rerun
starts over; needs mmcv 2.1.0 with compiled ops: `make mmcv` or `make install-mmdet MMCV_WHEEL=...`).
Both write best.pth, last.pth, train_log.csv, train_curve.png and predictions_test.json (COCO results
in the converted pixels of coco_test.json) into --out-dir. Settings come from the `detection` config
section (see --help).
"""

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.detection.engines import RUN_SETTINGS, engine_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, choices=engine_names(), help="Detection engine.")
    parser.add_argument("--init", required=True, help="Backbone init: random, imagenet or a checkpoint path.")
    parser.add_argument("--init-name", default=None, help="Name recorded in the checkpoints (default: --init).")
    parser.add_argument("--res", required=True, type=int, help="Input resolution: longest image side in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation, data order and flips.")
    parser.add_argument("--train-json", required=True, help="coco_train.json")
    parser.add_argument("--val-json", required=True, help="coco_val.json (selects the best epoch by mAP50)")
    parser.add_argument("--test-json", required=True, help="coco_test.json (predicted with the best epoch)")
    parser.add_argument("--out-dir", required=True, help="Run folder.")
    parser.add_argument("--imagenet-weights", default=None, help="Local ImageNet state dict (offline machines).")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this job (fixed, so CPU results do not depend on the cores granted).")
    # --log-file is the spelling to use under torchrun, whose own parser takes --log for --log-dir
    parser.add_argument("--log", "--log-file", dest="log", default=None, help="Log file.")
    add_section_args(parser, "detection", exclude=RUN_SETTINGS)
    add_section_args(parser, "tracking")  # live metrics (cxrssl.tracking)
    args = parser.parse_args()

    # Imported after parsing so that --help works without torch's start-up cost or mmcv installed.
    from cxrssl.detection.engines import get_engine
    from cxrssl.runtime import configure_threads
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    configure_threads(args.threads)
    from cxrssl import tracking

    tracking.configure(section_args(args, "tracking"))
    get_engine(args.engine).train(
        args.train_json, args.val_json, args.test_json, args.out_dir, init=args.init, res=args.res,
        seed=args.seed, settings=section_args(args, "detection", exclude=RUN_SETTINGS),
        imagenet_weights=args.imagenet_weights, device=args.device, init_name=args.init_name)


if __name__ == "__main__":
    main()
