#!/usr/bin/env python
"""(report, frontal image) pairs of a report corpus with a patient-disjoint split, for the multimodal method.

    python scripts/prepare_reports.py --reports-root data/mimic-cxr-jpg --layout mimic --out pairs.csv

Writes the pairs table (cxrssl.multimodal.reports: report_id, patient_id, image_path, sentences,
split, ...) and the quarantine CSV beside it (reports with no usable text, no frontal image or a
missing image file). Settings: the `pretrain.multimodal` block (only its data settings are used).
"""

from __future__ import annotations

import argparse

from cxrssl.config import add_section_args, section_args

SECTION = "pretrain.multimodal"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Pairs CSV to write (quarantine.csv goes beside it).")
    parser.add_argument("--quarantine", default=None, help="Quarantine CSV (default: beside --out).")
    parser.add_argument("--hold-out-demo", default=None, metavar="REPORTS_DIR",
                        help="Demo only: the demo's reports folder; the patients of the NIH test list (its "
                             "nih_link.csv) go to the test split, never trained on.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the patient split.")
    parser.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                        help="fail: stop at the first bad report; skip: quarantine it and go on.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, SECTION)
    args = parser.parse_args(argv)

    from cxrssl.multimodal.reports import prepare_pairs
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    s = section_args(args, SECTION)
    held = ()
    if args.hold_out_demo:
        from cxrssl.demo.reports import held_out_subjects

        held = held_out_subjects(args.hold_out_demo)
    prepare_pairs(s["layout"], s["reports_root"], args.out, seed=args.seed, val_fraction=s["val_fraction"],
                  test_fraction=s["test_fraction"], force_test=held, on_bad_input=args.on_bad_input,
                  quarantine_csv=args.quarantine)


if __name__ == "__main__":
    main()
