#!/usr/bin/env python
"""Fuse the readers' VinDr-CXR boxes with weighted boxes fusion and write COCO JSON per split.

Writes VINDR_FUSED (original pixels), coco_{train,val,test}.json (converted pixels), a quarantine
report of boxes outside their image, and a per-class count table and plot for the report.
"""

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.data.fusion import SPLITS, run_fusion
from cxrssl.errors import POLICIES, Quarantine
from cxrssl.utils import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_section_args(parser, "vindr.fusion")
    parser.add_argument("--on-bad-input", choices=POLICIES, default="fail",
                        help="fail: stop at the first bad box; skip: quarantine it and go on (default: fail)")
    parser.add_argument("--annotations", required=True, help="input annotations.csv")
    parser.add_argument("--metadata", required=True, help="input metadata.csv of the converted images")
    parser.add_argument("--split", required=True, help="input split.csv")
    parser.add_argument("--fused", required=True, help="output fused_boxes.csv")
    for name in SPLITS:
        parser.add_argument(f"--coco-{name}", required=True, help=f"output COCO JSON of the {name} split")
    parser.add_argument("--quarantine", required=True, help="output quarantine report (CSV)")
    parser.add_argument("--counts-csv", help="output table of fused boxes per class and split")
    parser.add_argument("--counts-png", help="output plot of fused boxes per class and split")
    parser.add_argument("--log", help="log file")
    args = parser.parse_args()
    setup_logging(args.log)
    run_fusion(
        args.annotations, args.metadata, args.split, args.fused,
        {name: getattr(args, f"coco_{name}") for name in SPLITS},
        quarantine=Quarantine(args.on_bad_input, stage="fuse_boxes"),
        quarantine_csv=args.quarantine, counts_csv=args.counts_csv, counts_png=args.counts_png,
        **section_args(args, "vindr.fusion"),
    )


if __name__ == "__main__":
    main()
