#!/usr/bin/env python
"""Training-step time of the torchvision engine's detector against torchvision's stock Faster R-CNN.

cxrssl's detector follows the paper's mmdetection R50-FPN (cxrssl.detection.model): mmdet's
``norm_eval`` (BatchNorm in eval mode with trainable affine weights instead of FrozenBatchNorm2d),
L1 box losses, the RPN's ``min_pos_iou`` floor and adaptive RoIAlign sampling (``sampling_ratio=0``
instead of 2). The baseline is what cxrssl built before: the same backbone, FPN, anchors and
proposal / RoI counts with torchvision's own heads and FrozenBatchNorm2d. Both train on the same
batches (a COCO JSON of the pipeline, e.g. the demo's ``coco_train.json``, or synthetic images),
alternately, so that a shared machine's load biases neither; the figure is the ratio of their
median step times.

    python benchmarks/detection_step.py --coco results/prepare/vindr/coco_train.json --res 128 \\
        --arch resnet18 --init imagenet --rpn-proposals 100 --rois-per-image 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrssl.detection.dataset import CocoDetection, collate
from cxrssl.detection.model import IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, build_detector


def stock_detector(arch: str, weights: Path | None, res: int, proposals: int, rois: int) -> FasterRCNN:
    """torchvision's Faster R-CNN as cxrssl built it before (FrozenBatchNorm2d, stock heads)."""
    resnet = getattr(torchvision.models, arch)(norm_layer=FrozenBatchNorm2d)
    if weights:
        resnet.load_state_dict({k: v for k, v in torch.load(weights, weights_only=True).items()
                                if "num_batches_tracked" not in k})
    return FasterRCNN(_resnet_fpn_extractor(resnet, 3), num_classes=NUM_CLASSES, min_size=res, max_size=res,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, rpn_pre_nms_top_n_train=2000,
                      rpn_post_nms_top_n_train=proposals, rpn_pre_nms_top_n_test=1000,
                      rpn_post_nms_top_n_test=proposals, box_batch_size_per_image=rois, box_positive_fraction=0.25)


def synthetic_batches(n: int, batch: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        images, targets = [], []
        for _ in range(batch):
            images.append(torch.rand(3, size, size, generator=g))
            xy = torch.rand(2, generator=g) * size * 0.6
            targets.append({"boxes": torch.cat([xy, xy + size * 0.3]).view(1, 4), "labels": torch.tensor([3])})
        yield images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_seconds(model, images, targets, optimizer, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    start = time.perf_counter()
    losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", default=None, help="A pipeline COCO JSON to train on (default: synthetic images).")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--init", default="imagenet", choices=["random", "imagenet"],
                        help="imagenet (random weights saved as a local 'ImageNet' file: norm_eval applies) or random.")
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rpn-proposals", type=int, default=100)
    parser.add_argument("--rois-per-image", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="Timed steps per model (default 24).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/detection_step.json")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 steps, as the engine's loss heads).")
    parser.add_argument("--compile", action="store_true",
                        help="Also time cxrssl's detector with its backbone through torch.compile "
                             "(detection.compile): median_step_s['cxrssl compiled'] and compile_speedup.")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor).")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = None
    if args.init == "imagenet":
        weights = out.parent / f"{args.arch}_weights.pth"
        torch.save(getattr(torchvision.models, args.arch)().state_dict(), weights)
    ours = build_detector(args.arch, args.init, res=args.res, imagenet_weights=weights,
                          rpn_proposals=args.rpn_proposals, rois_per_image=args.rois_per_image).train()
    if args.init == "imagenet":
        stock = stock_detector(args.arch, weights, args.res, args.rpn_proposals, args.rois_per_image).train()
    else:
        stock = FasterRCNN(_resnet_fpn_extractor(getattr(torchvision.models, args.arch)(), 5), num_classes=NUM_CLASSES,
                           min_size=args.res, max_size=args.res, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                           rpn_post_nms_top_n_train=args.rpn_proposals, box_batch_size_per_image=args.rois_per_image).train()
    device = torch.device(args.device)
    models = {"cxrssl": ours.to(device), "stock torchvision": stock.to(device)}
    if args.compile:
        from cxrssl.detection.model import compile_backbone

        torch.manual_seed(args.seed)
        twin = build_detector(args.arch, args.init, res=args.res, imagenet_weights=weights,
                              rpn_proposals=args.rpn_proposals, rois_per_image=args.rois_per_image).train()
        models["cxrssl compiled"] = compile_backbone(twin.to(device), backend=args.compile_backend)
    optimizers = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for k, m in models.items()}
    if args.coco:
        ds = CocoDetection(args.coco)
        batches = [collate([ds[(i * args.batch_size + j) % len(ds)] for j in range(args.batch_size)])
                   for i in range(args.steps + 2)]
    else:
        batches = list(synthetic_batches(args.steps + 2, args.batch_size, args.res, args.seed))
    batches = [([im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
               for images, targets in batches]
    times = {k: [] for k in models}
    for i, (images, targets) in enumerate(batches):
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):  # alternate who goes first
            seconds = step_seconds(models[name], images, targets, optimizers[name], device)
            if i >= 2:  # the first steps warm up allocators and caches
                times[name].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["cxrssl"] / median["stock torchvision"]
    result = {"config": vars(args), "median_step_s": median, "ratio": ratio, "device": str(device)}
    if args.compile:
        result["compile_speedup"] = median["cxrssl"] / median["cxrssl compiled"]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median training step: cxrssl {median['cxrssl']:.3f} s, stock torchvision "
          f"{median['stock torchvision']:.3f} s: ratio {ratio:.3f} ({args.steps} steps each, {args.threads} thread(s))")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
