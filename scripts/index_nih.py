#!/usr/bin/env python
"""Index NIH ChestX-ray14 (labels, official split, image paths) and build its resized uint8 cache."""

import argparse

from cxrssl.config import add_section_args
from cxrssl.data.nih import index_nih
from cxrssl.utils import setup_logging


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", required=True, help="index.csv to write.")
    parser.add_argument("--cache", required=True, help="uint8 (N, S, S) .npy cache to write.")
    parser.add_argument("--quarantine", required=True, help="CSV listing the bad rows and images.")
    parser.add_argument("--workers", type=int, default=1, help="Worker processes (default: 1).")
    parser.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                        help="fail: stop at the first bad row or image; skip: quarantine it and go on.")
    parser.add_argument("--log", help="Log file (the rule's log:).")
    add_section_args(parser, "nih")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    index_nih(args.root, args.index, args.cache, args.quarantine, args.cache_size, workers=args.workers,
              on_bad_input=args.on_bad_input)


if __name__ == "__main__":
    main()
