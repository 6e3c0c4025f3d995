#!/usr/bin/env python
"""Detector heatmaps (Ablation-CAM or EigenCAM) on test images with their localisation scores
against the GT boxes (localization.json), and side-by-side panels.

    python scripts/heatmaps.py run --engine torchvision --checkpoint best.pth --coco coco_test.json \
        --out-dir results/heatmaps/torchvision/imagenet_640px_seed0
    python scripts/heatmaps.py panel --column imagenet DIR1/heatmaps.json --column barlowtwins DIR2/heatmaps.json \
        --out panel.png
"""

from __future__ import annotations

import argparse

from cxrssl.cam import make_panel, render_run
from cxrssl.config import add_section_args, section_args
from cxrssl.detection.engines import engine_names
from cxrssl.utils import setup_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="Heatmaps of one detection run (heatmap_XX.png + heatmaps.json).")
    run.add_argument("--engine", default=None, choices=engine_names(),
                     help="Detection engine of the run (checked against the checkpoint's; default: the checkpoint's).")
    run.add_argument("--checkpoint", required=True, help="Trained detector checkpoint (best.pth).")
    run.add_argument("--coco", required=True, help="Test COCO JSON (images relative to its folder).")
    run.add_argument("--out-dir", required=True, help="Folder receiving heatmap_XX.png and heatmaps.json.")
    run.add_argument("--label", default="", help="Run label shown in the titles (e.g. the init).")
    run.add_argument("--seed", type=int, default=0, help="Seed of the localisation bootstrap (default: 0).")
    run.add_argument("--log", default=None, help="Log file (the rule's log).")
    add_section_args(run, "heatmaps")
    panel = sub.add_parser("panel", help="Rows = images, columns = runs, from the runs' heatmaps.json.")
    panel.add_argument("--column", nargs=2, action="append", required=True, metavar=("LABEL", "MANIFEST"),
                       help="Column label and its run's heatmaps.json (repeat per column).")
    panel.add_argument("--out", required=True, help="Panel PNG to write.")
    panel.add_argument("--title", default="", help="Figure title.")
    panel.add_argument("--log", default=None, help="Log file (the rule's log).")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    if args.command == "run":
        render_run(args.engine, args.checkpoint, args.coco, args.out_dir, section_args(args, "heatmaps"), args.label,
                   args.seed)
    else:
        make_panel([tuple(c) for c in args.column], args.out, args.title)


if __name__ == "__main__":
    main()
