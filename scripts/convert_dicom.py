#!/usr/bin/env python
"""Convert VinDr-CXR DICOMs to resized PNGs and metadata.csv (cached per file; see cxrssl.data.convert)."""

import argparse

from cxrssl.config import add_section_args, section_args
from cxrssl.data.convert import run_convert
from cxrssl.utils import setup_logging


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dicoms", nargs="*", default=[], help="DICOM files to convert.")
    parser.add_argument("--dicom-dirs", nargs="*", default=[],
                        help="Folders whose *.dicom / *.dcm files are converted (missing folders are skipped).")
    parser.add_argument("--out-dir", required=True, help="Folder of the converted PNGs (also holds the per-file cache record).")
    parser.add_argument("--metadata", required=True, help="metadata.csv to write (PNG paths are relative to its folder).")
    parser.add_argument("--quarantine", required=True, help="CSV listing the DICOMs that could not be converted.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Worker processes (default: 1); 0 converts in this process, without crash isolation.")
    parser.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                        help="fail: stop at the first bad DICOM; skip: list it in the quarantine CSV and go on.")
    parser.add_argument("--log", help="Log file (the rule's log:).")
    add_section_args(parser, "vindr.convert")
    add_section_args(parser, "privacy")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    run_convert(args.dicoms, args.dicom_dirs, args.out_dir, args.metadata, args.quarantine,
                workers=args.workers, on_bad_input=args.on_bad_input, **section_args(args, "vindr.convert"),
                **section_args(args, "privacy"))


if __name__ == "__main__":
    main()
