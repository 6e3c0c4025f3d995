#!/usr/bin/env python
"""Split the converted VinDr-CXR images into train/val/test (seeded, multi-label stratified).

PhysioNet keeps its official test set; Kaggle gets a test set carved out of its training images.
Writes VINDR_SPLIT (image_id, split).
"""

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.data.split import run_split
from cxrssl.utils import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_section_args(parser, "vindr.split")
    add_section_args(parser, "vindr", exclude=("root",))
    parser.add_argument("--seed", type=int, default=0, help="split seed (config seed; default: 0)")
    parser.add_argument("--annotations", required=True, help="input annotations.csv")
    parser.add_argument("--metadata", required=True, help="input metadata.csv of the converted images")
    parser.add_argument("--output", required=True, help="output split.csv")
    parser.add_argument("--log", help="log file")
    args = parser.parse_args()
    setup_logging(args.log)
    run_split(args.annotations, args.metadata, args.output, section_args(args, "vindr", exclude=("root",))["layout"],
              seed=args.seed,
              **section_args(args, "vindr.split"))


if __name__ == "__main__":
    main()
