#!/usr/bin/env python
"""Fine-tune Faster R-CNN + FPN (torchvision) on the VinDr COCO splits for one init x resolution x seed.

Writes best.pth, last.pth (resume state), train_log.csv, train_curve.png and predictions_test.json
into --out-dir; rerunning after an interruption resumes from last.pth. Settings come from the
`detection` config section (see --help). Multi-GPU: launch with torchrun (same flags).
"""

import argparse

from cxrssl.config import add_section_args, section_args

EXCLUDE = ("engine", "engines", "inits", "resolutions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    # --log-file is the spelling to use under torchrun, whose own parser takes --log for --log-dir
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this job (fixed, so CPU results do not depend on the cores granted).")
    parser.add_argument("--log", "--log-file", dest="log", default=None, help="Log file.")
    add_section_args(parser, "detection", exclude=EXCLUDE)
    args = parser.parse_args()

    from cxrssl.detection.train import train_detector
    from cxrssl.runtime import configure_threads
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    configure_threads(args.threads)
    train_detector(args.train_json, args.val_json, args.test_json, args.out_dir, init=args.init, res=args.res,
                   seed=args.seed, settings=section_args(args, "detection", exclude=EXCLUDE),
                   imagenet_weights=args.imagenet_weights, device=args.device, init_name=args.init_name)


if __name__ == "__main__":
    main()
