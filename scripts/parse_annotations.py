#!/usr/bin/env python
"""Read the VinDr-CXR annotation CSV(s) of either layout into one validated table.

Writes VINDR_ANNOTATIONS (reader boxes in original pixels) and a quarantine report of bad rows.
"""

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.data.annotations import run_parse
from cxrssl.errors import POLICIES
from cxrssl.utils import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_section_args(parser, "vindr")
    add_section_args(parser, "privacy")
    parser.add_argument("--on-bad-input", choices=POLICIES, default="fail",
                        help="fail: stop at the first bad row; skip: quarantine it and go on (default: fail)")
    parser.add_argument("--annotations", required=True, help="output annotations.csv")
    parser.add_argument("--quarantine", required=True, help="output quarantine report (CSV)")
    parser.add_argument("--log", help="log file")
    args = parser.parse_args()
    setup_logging(args.log)
    vindr = section_args(args, "vindr")
    run_parse(vindr["root"], vindr["layout"], args.annotations, args.quarantine, args.on_bad_input,
              **section_args(args, "privacy"))


if __name__ == "__main__":
    main()
