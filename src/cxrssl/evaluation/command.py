"""Evaluate COCO detection results: COCO mAP, the VinBigData metric (VOC 2010 mAP@0.4 with "No
finding"), bootstrap intervals (percentile, BCa) of mAP50 over a fixed class set.

Works on any COCO GT JSON and COCO results list, e.g.
    cxrssl evaluate --gt coco_test.json --results predictions_test.json --out metrics.json
(``scripts/evaluate.py`` is the same command, as the workflow's rule runs it).
"""

from __future__ import annotations

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.evaluation import evaluate, format_table
from cxrssl.io import atomic_write_json
from cxrssl.utils import setup_logging

EXCLUDE = ("seeds", "baselines")  # the fine-tuning grid and the summary's comparisons, not metric settings


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="COCO GT JSON (images, annotations, categories).")
    parser.add_argument("--results", required=True, help="COCO results JSON (list of detections).")
    parser.add_argument("--out", required=True, help="metrics JSON to write.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling (default: 0).")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, "evaluation", exclude=EXCLUDE)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    log = setup_logging(args.log)
    settings = section_args(args, "evaluation", exclude=EXCLUDE)
    metrics = evaluate(args.gt, args.results, seed=args.seed, **settings)
    atomic_write_json(metrics, args.out)
    table = format_table(metrics)
    print(table)
    log.info("metrics written to %s\n%s", args.out, table)
    return 0
