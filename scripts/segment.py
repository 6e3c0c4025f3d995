#!/usr/bin/env python
"""Train a lung segmenter for one backbone init on split.csv and score it on the test split.

Writes metrics.json (Dice and IoU with bootstrap CIs), per_image.csv, train_log.csv and examples.png
into --out-dir. Settings come from the `segmentation` config section.
"""

import argparse

from cxrssl.config import add_section_args, section_args

EXCLUDE = ("enabled", "inits", "sources", "val_fraction", "test_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="split.csv of split_segmentation.py")
    parser.add_argument("--init", required=True, help="Backbone init: random, imagenet or a checkpoint path.")
    parser.add_argument("--init-name", default=None, help="Name recorded in metrics.json (default: --init).")
    parser.add_argument("--out-dir", required=True, help="Run folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation and data order.")
    parser.add_argument("--imagenet-weights", default=None, help="Local ImageNet weights (offline machines).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--log", default=None, help="Log file.")
    add_section_args(parser, "segmentation", exclude=EXCLUDE)
    args = parser.parse_args()

    import pandas as pd

    from cxrssl.runtime import configure_threads
    from cxrssl.segmentation.train import train_segmentation
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    configure_threads(args.threads)
    train_segmentation(pd.read_csv(args.split), args.out_dir, init=args.init, init_name=args.init_name,
                       settings=section_args(args, "segmentation", exclude=EXCLUDE), seed=args.seed,
                       imagenet_weights=args.imagenet_weights)


if __name__ == "__main__":
    main()
