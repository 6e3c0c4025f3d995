#!/usr/bin/env python
"""Collect the segmentation runs' metrics.json into summary.csv, summary.md and dice_by_init.png."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("metrics", nargs="+", help="metrics.json of each init")
    parser.add_argument("--csv", required=True)
    parser.add_argument("--md", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args()

    from cxrssl.segmentation.summary import summarize

    summarize(args.metrics, args.csv, args.md, args.png)


if __name__ == "__main__":
    main()
