#!/usr/bin/env python
"""Per-image time and agreement of cxrssl's fast Ablation-CAM against the grad-cam library default.

Both explain the same predictions of the same Faster R-CNN + FPN (the pipeline's own detector,
``cxrssl.detection.model.build_detector``, random weights unless ``--checkpoint`` is given), on the
same target layer (``backbone``) and the same CAM grid (by default the library's: the coarsest FPN
level; ``--min-grid`` picks a finer one for both):

* library default: ``AblationCAM(..., AblationLayerFasterRCNN(), ratio_channels_to_ablate=1.0,
  batch_size=32)``, every one of the 1,280 FPN channels ablated (its tutorial recipe): the full
  ablation, the reference;
* cxrssl: ``FastAblationCAM`` with ``--ratio`` of the channels, larger batches, inference mode.

Channel selection. cxrssl ablates the ``ceil(ratio x C)`` channels with the largest activation
mass ``sum |A_k|``; the others get weight 0. The library's ``ratio_channels_to_ablate=r`` ablates
``2 floor(r x C)`` channels: it binarises EigenCAM's projection of the activations (above 0.01 of
its range), scores each channel by the share of its min-max-normalised |A_k| inside that mask, and
takes the ``floor(r x C)`` best- and the ``floor(r x C)`` worst-scoring ones. At r = 1 both ablate
every channel and agree exactly (tests/test_heatmaps.py).

Fidelity: Pearson and Spearman correlation of the fast map with the full ablation and the IoU of
their top-10 % regions, for each ``--ratio`` (default: the demo's 0.02 and the default 0.1).
``--library-ratio r`` also scores the library's own channel choice at that ratio (``2 floor(r C)``
channels; ``r = 0.01`` ablates about as many as cxrssl's 0.02), i.e. the two selections at equal cost.

The default runs in a few minutes on a small CPU (ResNet-18, 128 px, 50 proposals per image). A
trained demo run on its test images (what the demo's heatmaps show), and the configuration of the
paper's heatmaps (about 250 s per image for the library on one CPU):

    python benchmarks/heatmaps.py --checkpoint results/detection/torchvision/random_128px_seed0/best.pth \
        --proposals 100 --image results/prepare/vindr/images_256px_8bit/<id>.png ...
    python benchmarks/heatmaps.py --arch resnet50 --size 512 --proposals 1000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from cxrssl.cam import FPNReshape, compute_cam, library_ablation_cam, load_model


def synthetic_image(size: int, seed: int) -> torch.Tensor:
    """A chest-like grey test image: two dark lung fields on a brighter body, a few bright blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = 0.6 - 0.35 * np.exp(-(((xx - 0.32) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    image -= 0.35 * np.exp(-(((xx - 0.68) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    for _ in range(3):
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.7), rng.uniform(0.03, 0.08)
        image += 0.4 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / r ** 2))
    image += rng.normal(0, 0.02, image.shape)
    return torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)).unsqueeze(0).expand(3, -1, -1).contiguous()


def top_region_iou(a: np.ndarray, b: np.ndarray, share: float = 0.1) -> float:
    ma = a >= np.quantile(a, 1 - share)
    mb = b >= np.quantile(b, 1 - share)
    return float((ma & mb).sum() / max(1, (ma | mb).sum()))


def agreement(fast: np.ndarray, ref: np.ndarray) -> dict:
    if np.ptp(fast) == 0 or np.ptp(ref) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "top10_iou": float("nan")}
    return {"pearson": float(pearsonr(fast.ravel(), ref.ravel())[0]),
            "spearman": float(spearmanr(fast.ravel(), ref.ravel())[0]),
            "top10_iou": top_region_iou(fast, ref)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--size", type=int, default=128, help="Image and detector input size (default 128).")
    parser.add_argument("--proposals", type=int, default=50,
                        help="RPN proposals per image at test time (torchvision default 1000; default 50).")
    parser.add_argument("--checkpoint", default=None, help="A trained best.pth instead of random weights.")
    parser.add_argument("--image", nargs="+", default=None, help="Grey PNGs to explain instead of synthetic images.")
    parser.add_argument("--n-images", type=int, default=1, help="Synthetic images timed (default 1).")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.1, 0.02],
                        help="cxrssl's shares of channels ablated (each timed; default 0.1, the schema's, and 0.02, "
                             "the demo's).")
    parser.add_argument("--library-ratio", type=float, nargs="*", default=[],
                        help="Also score the library's own channel selection at these ratios (e.g. 0.01).")
    parser.add_argument("--batch-size", type=int, default=64, help="cxrssl's ablated copies per pass.")
    parser.add_argument("--library-batch-size", type=int, default=32, help="Library batch size (its default 32).")
    parser.add_argument("--top-k", type=int, default=3, help="Predictions explained when none scores >= 0.5.")
    parser.add_argument("--min-grid", type=int, default=0,
                        help="CAM grid of both paths (cxrssl.cam.FPNReshape); 0 = the library's, the coarsest level "
                             "(2x2 cells at 128 px: use 8 for a finer comparison there).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-library", action="store_true",
                        help="Time cxrssl's fast Ablation-CAM only (no library reference, no agreement scores): "
                             "what benchmarks/gpu.sh reports.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/heatmaps.json", help="Results JSON.")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.checkpoint:
        model, _ = load_model(None, args.checkpoint, device)
    else:
        from cxrssl.detection.model import build_detector

        model = build_detector(args.arch, "random", res=args.size, score_thr=0.05).to(device).eval()
    if hasattr(model, "rpn"):
        model.rpn._post_nms_top_n["testing"] = args.proposals
    if args.image:
        from cxrssl.detection.transforms import read_grey_image, to_model_tensor

        images = [to_model_tensor(read_grey_image(path), path) for path in args.image]
    else:
        images = [synthetic_image(args.size, args.seed + i) for i in range(args.n_images)]

    def fast_runs():
        return {r: compute_cam(model, image, method="ablation", ratio=r, batch_size=args.batch_size,
                               top_k=args.top_k, min_grid=args.min_grid) for r in args.ratio}

    rows = []
    if args.no_library:
        compute_cam(model, images[0], method="ablation", ratio=args.ratio[0], batch_size=args.batch_size,
                    top_k=args.top_k, min_grid=args.min_grid)  # warm-up (allocator, cudnn)
        for n, image in enumerate(images):
            for r in args.ratio:
                run = compute_cam(model, image, method="ablation", ratio=r, batch_size=args.batch_size,
                                  top_k=args.top_k, min_grid=args.min_grid)
                rows.append({"image": n, "ratio": r, "fast_s": run.seconds, "boxes_explained": len(run.boxes),
                             "channels_ablated": run.n_channels_ablated})
        summary = {"config": vars(args), "device": str(device), "images": rows,
                   "mean": {str(r): {"fast_s": float(np.mean([x["fast_s"] for x in rows if x["ratio"] == r]))}
                            for r in args.ratio}}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary["mean"]))
        return
    for n, image in enumerate(images):
        # cxrssl's path runs before and after the library's and is timed by the mean of both, so
        # that a shared machine's changing load biases neither side
        before = fast_runs()
        first = before[args.ratio[0]]
        start = time.perf_counter()
        ref = library_ablation_cam(model, image, first.boxes, first.labels, batch_size=args.library_batch_size,
                                   reshape_transform=FPNReshape(args.min_grid) if args.min_grid else None)
        library_s = time.perf_counter() - start
        after = fast_runs()
        for r in args.library_ratio:  # the library's selection at a partial ratio, same grid and boxes
            start = time.perf_counter()
            partial = library_ablation_cam(model, image, first.boxes, first.labels, batch_size=args.library_batch_size,
                                           ratio=r, reshape_transform=FPNReshape(args.min_grid) if args.min_grid else None)
            row = {"image": n, "library_ratio": r, "library_s": library_s, "partial_s": time.perf_counter() - start,
                   "channels_ablated": 2 * int(r * 1280)}
            row.update(agreement(partial, ref))
            print(json.dumps(row), flush=True)
            rows.append(row)
        for r in args.ratio:
            fast_s = (before[r].seconds + after[r].seconds) / 2
            row = {"image": n, "ratio": r, "library_s": library_s, "fast_s": fast_s, "speedup": library_s / fast_s,
                   "channels_ablated": before[r].n_channels_ablated, "boxes_explained": len(before[r].boxes)}
            row.update(agreement(before[r].cam, ref))
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"config": vars(args), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
               "processor": platform.processor(), "device": str(device), "images": rows, "mean": {}}
    for r in args.library_ratio:
        sel = [row for row in rows if row.get("library_ratio") == r]
        m = {k: float(np.nanmean([row[k] for row in sel])) for k in ("partial_s", "pearson", "spearman", "top10_iou")}
        summary["mean"][f"library {r}"] = m
        print(f"library selection at ratio {r}: {m['partial_s']:.1f} s/image; Pearson {m['pearson']:.3f}, "
              f"Spearman {m['spearman']:.3f}, top-10% IoU {m['top10_iou']:.3f}")
    for r in args.ratio:
        sel = [row for row in rows if row.get("ratio") == r]
        m = {k: float(np.nanmean([row[k] for row in sel]))
             for k in ("library_s", "fast_s", "speedup", "pearson", "spearman", "top10_iou")}
        summary["mean"][str(r)] = m
        print(f"ratio {r}: library default {m['library_s']:.1f} s/image, cxrssl {m['fast_s']:.1f} s/image "
              f"({m['speedup']:.1f}x); Pearson {m['pearson']:.3f}, Spearman {m['spearman']:.3f}, "
              f"top-10% IoU {m['top10_iou']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
