#!/usr/bin/env python
"""Generate the synthetic demo dataset (NIH-like PNGs, VinDr-like DICOMs) in the real layouts.

Example: python scripts/make_demo_data.py --root data/demo --n-nih 240 --seed 0 --log demo.log
"""

import argparse
import json

from cxrssl.config import add_section_args, section_args
from cxrssl.demo import make_demo_dataset
from cxrssl.utils import setup_logging


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_section_args(parser, "demo")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generator (same seed, same bytes).")
    parser.add_argument("--log", default=None, help="Log file (the rule's log:).")
    args = parser.parse_args(argv)
    log = setup_logging(args.log)
    settings = section_args(args, "demo")
    if not settings.pop("enabled"):
        parser.error("--enabled is false: nothing to generate (demo.enabled in the config)")
    summary = make_demo_dataset(settings.pop("root"), seed=args.seed, **settings)
    log.info("summary: %s", json.dumps({k: summary[k] for k in ("settings", "seed")}))


if __name__ == "__main__":
    main()
