#!/usr/bin/env python
"""Image-report multimodal pretraining (arXiv 2401.01524) on the pairs of scripts/prepare_reports.py.

Single process:  python scripts/pretrain_multimodal.py --pairs pairs.csv --out-dir D [settings]
Several GPUs:    torchrun --standalone --nproc_per_node=N scripts/pretrain_multimodal.py ... (DDP;
                 --batch-size is the global batch; negatives are gathered across ranks)

Settings: the `pretrain.multimodal` block (images are read relative to --reports-root). Writes
D/backbone.pth (torchvision state dict without fc) + D/backbone.json (the registry's sidecar): the
`multimodal` init of linear evaluation and detection; D/model.pth + D/text_encoder/ + D/model.json
(the whole model, for zero-shot localisation), D/metrics.csv, D/val.csv, D/loss.png. Rerunning
after an interruption resumes from D/checkpoint.pth (same settings, data and seed only).
"""

from __future__ import annotations

import argparse

from cxrssl.config import add_section_args, section_args

SECTION = "pretrain.multimodal"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", required=True, help="Pairs CSV with a split column (rule prepare_reports).")
    parser.add_argument("--out-dir", required=True, help="Run folder (see above).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation, sampling and augmentation.")
    parser.add_argument("--imagenet-weights", default=None,
                        help="Local ImageNet state dict of the arch (for init imagenet on offline machines).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch.")
    parser.add_argument("--no-resume", action="store_true", help="Ignore an existing checkpoint and start over.")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="Test hook: stop after this many steps without writing outputs, as a kill would.")
    parser.add_argument("--log", "--log-file", dest="log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, SECTION)
    args = parser.parse_args(argv)

    from cxrssl.multimodal.train import pretrain_multimodal
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    settings = section_args(args, SECTION)
    pretrain_multimodal(args.pairs, settings["reports_root"], args.out_dir, settings, seed=args.seed,
                        imagenet_weights=args.imagenet_weights, device=args.device, resume=not args.no_resume,
                        stop_after_steps=args.stop_after_steps, threads=args.threads)


if __name__ == "__main__":
    main()
