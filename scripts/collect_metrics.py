#!/usr/bin/env python
"""Collect a run's headline metrics into one JSON for DVC (dvc metrics show / diff, dvc exp show).

Detection: mAP50, mAP, mAP75 and the VOC-style mAP of every evaluation run (the engine and run name
are taken from the folder <engine>/<init>_<res>px_seed<seed>/). Linear evaluation: mean test and
validation AUC of every init x label fraction.
"""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--detection", nargs="*", default=[],
                        help="metrics.json of each detection evaluation run.")
    parser.add_argument("--linear", nargs="*", default=[], help="metrics.json of each linear-evaluation run.")
    parser.add_argument("--output", required=True, help="Output JSON (e.g. results/metrics.json).")
    parser.add_argument("--log", default=None, help="Log file.")
    args = parser.parse_args()

    from cxrssl.tracking import write_metrics
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    write_metrics(args.detection, args.linear, args.output)


if __name__ == "__main__":
    main()
