#!/usr/bin/env python
"""Self-supervised pretraining of one method on the NIH ChestX-ray14 train_val images.

Single process:  python scripts/pretrain.py --method M --index I --cache C --out-dir D [settings]
Several GPUs:    torchrun --standalone --nproc_per_node=N scripts/pretrain.py ... (DDP; --batch-size
                 is the global batch, split across the N processes)
Several nodes:   srun -n N python scripts/pretrain.py ... (one rank per SLURM task; MASTER_ADDR and
                 MASTER_PORT set by the job, as the rules' torch_launcher does)

Shared settings are the `pretrain` section's flags; the method's own come from its block
`pretrain.<method>` (see `--method M --help`). Rerunning after an interruption resumes from
D/checkpoint.pth (same settings, data and initial weights only). Writes D/backbone.pth (the
library's state dict without the classifier), D/backbone.json (its sidecar), D/metrics.csv and
D/loss.png.
"""

from __future__ import annotations

import argparse

from cxrssl.config import OWN_RULE_METHODS, add_section_args, section_args, section_schema

EXCLUDE = ("methods",)


def method_names() -> list[str]:
    """The methods with a settings block in the schema (the registry checks its modules agree),
    less those with their own rules and script (cxrssl.config.OWN_RULE_METHODS)."""
    return [k for k, v in section_schema("pretrain")["properties"].items()
            if v.get("type") == "object" and k not in OWN_RULE_METHODS]


def main(argv: list[str] | None = None) -> None:
    names = method_names()
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--method", choices=names, default="barlowtwins")
    method = first.parse_known_args(argv)[0].method

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=names, default="barlowtwins",
                        help="Pretraining method (default: barlowtwins); its settings follow below.")
    parser.add_argument("--index", required=True, help="NIH index CSV (rule index_nih).")
    parser.add_argument("--cache", required=True, help="uint8 (N, S, S) .npy image cache of the index.")
    parser.add_argument("--out-dir", required=True,
                        help="Run folder: backbone.pth, backbone.json, metrics.csv, loss.png, checkpoint.pth.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of initialisation, sampling and augmentation.")
    parser.add_argument("--imagenet-weights", default=None,
                        help="Local ImageNet state dict of the method's arch (for init imagenet on offline machines).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, shared by torchrun's ranks on a node (each srun task's own).")
    parser.add_argument("--checkpoint", default=None, help="Checkpoint file (default: OUT_DIR/checkpoint.pth).")
    parser.add_argument("--no-resume", action="store_true", help="Ignore an existing checkpoint and start over.")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="Test hook: stop after this many steps without writing outputs, as a kill would.")
    # --log-file: under Python 3.11 torchrun's own parser rejects a bare --log anywhere on its
    # command line (ambiguous with its --log-dir/--logs-specs), so torchrun launches use the alias.
    parser.add_argument("--log", "--log-file", dest="log", default=None, help="Log file (the rule's log).")
    add_section_args(parser, "pretrain", exclude=EXCLUDE)
    add_section_args(parser, f"pretrain.{method}")
    add_section_args(parser, "tracking")  # live metrics (cxrssl.tracking)
    args = parser.parse_args(argv)

    from cxrssl.ssl.train import pretrain
    from cxrssl.utils import setup_logging

    setup_logging(args.log)
    from cxrssl import tracking

    tracking.configure(section_args(args, "tracking"))
    settings = {**section_args(args, "pretrain", exclude=EXCLUDE), method: section_args(args, f"pretrain.{method}")}
    pretrain(args.index, args.cache, args.out_dir, settings, method=method, seed=args.seed,
             imagenet_weights=args.imagenet_weights, device=args.device, checkpoint=args.checkpoint,
             resume=not args.no_resume, stop_after_steps=args.stop_after_steps, threads=args.threads)


if __name__ == "__main__":
    main()
