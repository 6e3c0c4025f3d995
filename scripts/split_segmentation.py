#!/usr/bin/env python
"""Parse the lung-mask releases (Montgomery County and Shenzhen layouts), quarantine images whose
masks are missing, empty or of another size, and split the patients into train / val / test.

Writes --split (one row per usable image: source, layout, name, patient, image, masks, split) and
--quarantine (source, file, reason). Settings come from the `segmentation` config section.
"""

import argparse

from cxrssl.config import add_section_args, section_args

EXCLUDE = ("enabled", "inits", "arch", "image_size", "width", "epochs", "batch_size", "lr", "weight_decay", "hflip",
           "threshold", "n_bootstrap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="Output split.csv")
    parser.add_argument("--quarantine", required=True, help="Output quarantine.csv")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the patient permutation.")
    parser.add_argument("--log", default=None, help="Log file.")
    add_section_args(parser, "segmentation", exclude=EXCLUDE)
    args = parser.parse_args()

    from cxrssl.io import atomic_write_csv
    from cxrssl.segmentation.data import parse_sources, split_patients
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    s = section_args(args, "segmentation", exclude=EXCLUDE)
    sources = [dict(zip(("layout", "root"), item.split("=", 1))) for item in s["sources"]]
    frame, bad = parse_sources(sources)
    frame["split"] = split_patients(frame, s["val_fraction"], s["test_fraction"], args.seed)
    atomic_write_csv(frame, args.split)
    atomic_write_csv(bad, args.quarantine)


if __name__ == "__main__":
    main()
