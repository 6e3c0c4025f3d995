#!/usr/bin/env python
"""Zero-shot (annotation-free) lesion localisation of a multimodal run against a box file.

    python scripts/zeroshot.py --run-dir results/pretrain/multimodal --layout nih \
        --boxes BBox_List_2017.csv --images IMAGES_DIR --out-dir results/zeroshot/multimodal/nih

Similarity maps of each finding's prompts (and, for MS-CXR, of each box's report sentence) with
the image's region features, scored by the project's localisation scorer beside a random-map and
a centre-prior baseline; the binarisation threshold is chosen on the validation images, scores
and bootstrap CIs are over the test images. Writes localization.json, summary.csv, scores.csv,
panel.png, items.json and quarantine.csv in --out-dir. Settings: the `zeroshot` section.
"""

from __future__ import annotations

import argparse

from cxrssl.config import add_section_args, section_args

SECTION = "zeroshot"
EXCLUDE = ("layouts", "nih_boxes", "nih_images", "rsna_labels", "rsna_images", "ms_cxr_boxes", "ms_cxr_images")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="Multimodal run folder (model.json, model.pth, text_encoder/).")
    parser.add_argument("--layout", required=True, choices=["nih", "rsna", "ms_cxr"], help="Layout of the box file.")
    parser.add_argument("--boxes", required=True, help="Box file: BBox_List_2017.csv, stage_2_train_labels.csv or "
                                                       "MS_CXR_Local_Alignment_v1.1.0.csv.")
    parser.add_argument("--images", required=True, help="Folder the images of the box file are in (relative to).")
    parser.add_argument("--out-dir", required=True, help="Output folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the val/test split, random maps and bootstrap.")
    parser.add_argument("--on-bad-input", choices=["fail", "skip"], default="fail",
                        help="fail: stop at the first bad box row; skip: quarantine it and go on.")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch.")
    parser.add_argument("--log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, SECTION, exclude=EXCLUDE)
    args = parser.parse_args(argv)

    from cxrssl.multimodal.zeroshot import run_zero_shot
    from cxrssl.runtime import configure_threads
    from cxrssl.utils import seed_everything, setup_logging

    setup_logging(args.log)
    configure_threads(args.threads)
    seed_everything(args.seed)
    s = section_args(args, SECTION, exclude=EXCLUDE)
    run_zero_shot(args.run_dir, args.layout, args.boxes, args.images, args.out_dir, seed=args.seed,
                  n_boot=s["bootstrap"], val_fraction=s["val_fraction"], panel_per_finding=s["panel_per_finding"],
                  on_bad_input=args.on_bad_input, device=s["device"])


if __name__ == "__main__":
    main()
