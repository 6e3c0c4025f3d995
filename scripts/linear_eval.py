#!/usr/bin/env python
"""Linear evaluation (or fine-tuning) of one backbone init on one NIH label fraction.

Writes split.csv, history.csv and metrics.json into --out-dir. Settings come from the
`linear_eval` config section (see --help); inits and fractions are chosen by the caller. A
pretrained --init with a backbone.json sidecar builds the arch the sidecar names; --arch is the
backbone of random / imagenet and of checkpoints without a sidecar.
"""

import argparse

from cxrssl.config import add_section_args, section_args

EXCLUDE = ("inits", "fractions", "bootstrap", "baselines")  # pick runs / belong to the summary


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"label fraction must be in (0, 1], got {text}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="Backbone init: random, imagenet or a checkpoint path.")
    parser.add_argument("--init-name", default=None, help="Name recorded in metrics.json (default: --init).")
    parser.add_argument("--fraction", required=True, type=fraction, help="Labelled fraction of the training patients.")
    parser.add_argument("--index", required=True, help="NIH index CSV (results/prepare/nih/index.csv).")
    parser.add_argument("--cache", required=True, help="NIH uint8 image cache (.npy).")
    parser.add_argument("--out-dir", required=True, help="Run folder for split.csv, history.csv, metrics.json.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the splits, subsets and training.")
    parser.add_argument("--imagenet-weights", default=None, help="Local ImageNet state dict (offline machines).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this job (fixed, so CPU results do not depend on the cores granted).")
    parser.add_argument("--log", default=None, help="Log file.")
    add_section_args(parser, "linear_eval", exclude=EXCLUDE)
    add_section_args(parser, "tracking")  # live metrics (cxrssl.tracking)
    args = parser.parse_args()

    from cxrssl.linear_eval import run_linear_eval
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    from cxrssl import tracking

    tracking.configure(section_args(args, "tracking"))
    run_linear_eval(index_path=args.index, cache_path=args.cache, init=args.init, fraction=args.fraction,
                    out_dir=args.out_dir, seed=args.seed, settings=section_args(args, "linear_eval", exclude=EXCLUDE),
                    imagenet_weights=args.imagenet_weights, init_name=args.init_name, threads=args.threads)


if __name__ == "__main__":
    main()
