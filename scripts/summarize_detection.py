#!/usr/bin/env python
"""Summarise detection runs (engine x init x resolution x seed) into a CSV, the paired differences of
every init against the baselines (same test-image resamples, intervals and p-values), a Markdown
report (with the heatmaps' localisation scores) and a bar plot of mAP50 with bootstrap CIs.

    python scripts/summarize_detection.py --run torchvision imagenet 640 0 results/.../metrics.json \
        --run torchvision barlowtwins 640 0 ... --localization torchvision imagenet 640 0 .../localization.json \
        --baselines imagenet random --csv summary.csv --differences differences.csv --markdown summary.md \
        --plot map50.png
"""

from __future__ import annotations

import argparse

from cxrssl.evaluation import Run, write_summary
from cxrssl.utils import setup_logging


def _runs(parser, items) -> list[Run]:
    runs = []
    for engine, init, res, seed, path in items or []:
        try:
            runs.append(Run(engine, init, int(res), int(seed), path))
        except ValueError:
            parser.error(f"{engine} {init} {res} {seed} {path}: RES and SEED must be integers")
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    meta = ("ENGINE", "INIT", "RES", "SEED", "PATH")
    parser.add_argument("--run", nargs=5, action="append", required=True, metavar=meta,
                        help="One evaluated run and its metrics.json (repeat per run).")
    parser.add_argument("--localization", nargs=5, action="append", default=[], metavar=meta,
                        help="One run's heatmap localization.json (repeat per run; optional).")
    parser.add_argument("--baselines", nargs="*", default=[],
                        help="Inits every other init is compared with (paired differences).")
    parser.add_argument("--csv", required=True, help="Summary CSV to write.")
    parser.add_argument("--differences", default=None, help="Paired-differences CSV to write.")
    parser.add_argument("--markdown", required=True, help="Markdown tables to write.")
    parser.add_argument("--plot", required=True, help="Bar plot (PNG) to write.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    write_summary(_runs(parser, args.run), args.csv, args.markdown, args.plot,
                  localization=_runs(parser, args.localization), baselines=args.baselines,
                  out_differences=args.differences)


if __name__ == "__main__":
    main()
