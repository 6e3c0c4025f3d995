#!/usr/bin/env python
"""Summarise linear-evaluation runs: a table (init x fraction) and mean test AUC vs label fraction."""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each run.")
    parser.add_argument("--summary", required=True, help="Output CSV.")
    parser.add_argument("--plot", required=True, help="Output PNG.")
    parser.add_argument("--differences", default=None, help="Output CSV of the paired differences between inits.")
    parser.add_argument("--markdown", default=None, help="Output Markdown of the table and the differences.")
    parser.add_argument("--bootstrap", type=int, default=0, help="Patient-bootstrap resamples of the test split (0 = none).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the resamples.")
    parser.add_argument("--baselines", nargs="*", default=[], help="Inits the others are compared with.")
    parser.add_argument("--log", default=None, help="Log file.")
    args = parser.parse_args()

    from cxrssl.linear_eval.summary import summarize
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    summarize(args.metrics, args.summary, args.plot, args.differences, args.markdown, args.bootstrap, args.seed,
              args.baselines)


if __name__ == "__main__":
    main()
