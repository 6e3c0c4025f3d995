#!/usr/bin/env python
"""The report's first page: headline tables (linear evaluation, detection with CIs) as reStructuredText."""

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--linear", required=True, help="linear_eval/summary.csv.")
    parser.add_argument("--detection", required=True, help="evaluation/summary.csv.")
    parser.add_argument("--differences", default=None, help="evaluation/differences.csv.")
    parser.add_argument("--out", required=True, help="Output .rst (included by report/workflow.rst).")
    parser.add_argument("--log", default=None, help="Log file.")
    args = parser.parse_args(argv)

    from cxrssl.report_page import write_headline
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    write_headline(args.linear, args.detection, args.differences, args.out)


if __name__ == "__main__":
    main()
