#!/usr/bin/env python
"""Data summary for the report: images per split, boxes per class, DICOM properties, NIH findings,
and every quarantined input with its reason (an HTML page and two CSVs)."""

from __future__ import annotations

import argparse

from cxrssl.report import write_data_summary
from cxrssl.utils import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vindr-metadata", required=True, help="VinDr metadata.csv (conversion).")
    parser.add_argument("--vindr-split", required=True, help="VinDr split.csv.")
    parser.add_argument("--vindr-fused", required=True, help="VinDr fused_boxes.csv.")
    parser.add_argument("--nih-index", required=True, help="NIH index.csv.")
    parser.add_argument("--quarantine", nargs="*", default=[], help="Quarantine CSVs (stage, item, reason).")
    parser.add_argument("--html", required=True, help="HTML page to write.")
    parser.add_argument("--counts", required=True, help="Long-format counts CSV to write.")
    parser.add_argument("--quarantined", required=True, help="Combined quarantine CSV to write.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    write_data_summary(args.vindr_metadata, args.vindr_split, args.vindr_fused, args.nih_index, args.quarantine,
                       args.html, args.counts, args.quarantined)


if __name__ == "__main__":
    main()
