#!/usr/bin/env python
"""Summarise detection runs (engine x init x resolution x seed) into a CSV, a Markdown table and a
bar plot of mAP50 with bootstrap CIs grouped by resolution.

    python scripts/summarize_detection.py --run torchvision imagenet 640 0 results/.../metrics.json \
        --run torchvision barlowtwins 640 0 ... --csv summary.csv --markdown summary.md --plot map50.png
"""

from __future__ import annotations

import argparse

from cxrssl.evaluation import Run, write_summary
from cxrssl.utils import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=5, action="append", required=True,
                        metavar=("ENGINE", "INIT", "RES", "SEED", "METRICS"),
                        help="One evaluated run and its metrics.json (repeat per run).")
    parser.add_argument("--csv", required=True, help="Summary CSV to write.")
    parser.add_argument("--markdown", required=True, help="Markdown table to write.")
    parser.add_argument("--plot", required=True, help="Bar plot (PNG) to write.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    runs = []
    for engine, init, res, seed, path in args.run:
        try:
            runs.append(Run(engine, init, int(res), int(seed), path))
        except ValueError:
            parser.error(f"--run {engine} {init} {res} {seed} {path}: RES and SEED must be integers")
    write_summary(runs, args.csv, args.markdown, args.plot)


if __name__ == "__main__":
    main()
