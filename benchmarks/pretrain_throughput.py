#!/usr/bin/env python
"""Throughput of the pretraining input path: the pipeline's vs the reference code's.

* pipeline:  uint8 cache (np.load mmap) -> torchvision.transforms.v2 on uint8 tensors, per-sample
             seeded -> uint8 batches -> float/normalise on the device (cxrssl.ssl).
* reference: PIL decode of full-size PNGs + .convert('RGB') -> PIL transforms per sample (the paper's
             recipe) -> ToTensor + Normalize, as the BarlowTwins-CXR code does.

Both with the `original` recipe at the same crop size, through a DataLoader with the same workers.
Reports loader image pairs/s (two views per image) and, with a model, end-to-end training pairs/s
(loader + forward/backward + LARS step), plus pipeline/reference ratios. Without --cache/--png-dir
it generates random grey PNGs and the matching cache in a temporary folder (small by default).

    python benchmarks/pretrain_throughput.py                      # ~1-2 min on 2 CPU cores
    python benchmarks/pretrain_throughput.py --n-images 512 --workers 8 --arch resnet50 --crop 224
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cxrssl.models.backbone import FEATURE_DIMS, build_resnet
from cxrssl.ssl.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews, normalize_views
from cxrssl.ssl.barlow import BarlowTwins
from cxrssl.ssl.data import PairSampler
from cxrssl.ssl.lars import LARS, lars_param_groups


class _PILBlur:
    """Gaussian blur with sigma ~ U(0.1, 2) applied with probability p (PIL, as the reference)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class _PILSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def reference_views(size: int):
    def view(blur_p, sol_p):
        return T.Compose([
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2), _PILBlur(blur_p), _PILSolarize(sol_p),
            T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
    return view(1.0, 0.0), view(0.1, 0.2)


class ReferenceDataset(Dataset):
    def __init__(self, paths: list[Path], size: int):
        self.paths, (self.t1, self.t2) = paths, reference_views(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        return self.t1(img), self.t2(img)


class PipelineDataset(Dataset):
    """The pipeline's path without the index CSV (cxrssl.ssl.data.NIHPairDataset does the same)."""

    def __init__(self, cache: Path, size: int, seed: int = 0):
        self.cache_path, self.views, self.seed, self._cache = cache, TwoViews("original", size), seed, None
        self.n = len(np.load(cache, mmap_mode="r"))

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        from cxrssl.ssl.augment import sample_seed

        epoch, i = item
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        img = torch.from_numpy(np.array(self._cache[i], copy=True)).unsqueeze(0)
        return self.views(img, sample_seed(self.seed, epoch, i))


def make_data(folder: Path, n: int, png_size: int, cache_size: int) -> tuple[Path, list[Path]]:
    """Random smooth grey images as full-size PNGs and as the resized uint8 cache."""
    rng = np.random.default_rng(0)
    (folder / "png").mkdir(parents=True, exist_ok=True)
    cache = np.empty((n, cache_size, cache_size), np.uint8)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (png_size // 16, png_size // 16), dtype=np.uint8)
        img = Image.fromarray(small).resize((png_size, png_size), Image.BICUBIC)
        path = folder / "png" / f"{i:08d}_000.png"
        img.save(path)
        paths.append(path)
        cache[i] = np.asarray(img.resize((cache_size, cache_size), Image.LANCZOS))
    np.save(folder / "cache.npy", cache)
    return folder / "cache.npy", paths


def loader_rate(loader: DataLoader, warmup: int = 1) -> float:
    """Image pairs per second over the loader's batches (the first ``warmup`` batches excluded)."""
    count, start = 0, None
    for b, (v1, _) in enumerate(loader):
        if b == warmup - 1 or (warmup == 0 and start is None):
            start, count = time.perf_counter(), 0
            if warmup:
                continue
        count += len(v1)
    return count / (time.perf_counter() - start)


def train_rate(loader: DataLoader, model: BarlowTwins, device: torch.device, uint8: bool, steps: int) -> float:
    opt = LARS(lars_param_groups(model), lr=0.01, weight_decay=1e-6)
    model.train()
    count, start = 0, None
    for b, (v1, v2) in enumerate(loader):
        if b >= steps + 1:
            break
        if b == 1:
            start, count = time.perf_counter(), 0
        if uint8:
            x1, x2 = normalize_views(v1, device), normalize_views(v2, device)
        else:
            x1, x2 = v1.to(device, non_blocking=True), v2.to(device, non_blocking=True)
        loss = model(x1, x2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        count += len(v1)
    return count / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, help="uint8 (N, S, S) cache; generated when omitted.")
    p.add_argument("--png-dir", type=Path, help="Folder of full-size PNGs; generated when omitted.")
    p.add_argument("--n-images", type=int, default=64, help="Images generated / used (default 64).")
    p.add_argument("--png-size", type=int, default=1024, help="Side of generated PNGs (NIH: 1024).")
    p.add_argument("--cache-size", type=int, default=256, help="Side of the generated cache.")
    p.add_argument("--crop", type=int, default=224, help="View size (pretrain.image_size).")
    p.add_argument("--batch-size", type=int, default=8, help="Loader batch size.")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both paths.")
    p.add_argument("--arch", default="resnet18", help="Backbone for end-to-end rates ('none' to skip).")
    p.add_argument("--projector", type=int, nargs="+", default=[512, 512], help="Projector widths.")
    p.add_argument("--steps", type=int, default=3, help="Timed training steps per path.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--json", type=Path, help="Also write the figures here.")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="cxrssl_bench_")
    cache, pngs = args.cache, sorted(args.png_dir.glob("**/*.png")) if args.png_dir else None
    if cache is None or pngs is None:
        t0 = time.perf_counter()
        gen_cache, gen_pngs = make_data(Path(tmp.name), args.n_images, args.png_size, args.cache_size)
        cache, pngs = cache or gen_cache, pngs or gen_pngs
        print(f"generated {args.n_images} PNGs of {args.png_size} px + cache in {time.perf_counter() - t0:.1f} s")
    pngs = pngs[:args.n_images]
    n_cache = min(args.n_images, len(np.load(cache, mmap_mode="r")))

    pipe_ds = PipelineDataset(cache, args.crop)
    sampler = PairSampler(n_cache, args.batch_size)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
              pin_memory=device.type == "cuda", persistent_workers=False)
    ref_loader = DataLoader(ReferenceDataset(pngs, args.crop), shuffle=True, **kw)
    pipe_loader = DataLoader(pipe_ds, sampler=sampler, **kw)
    out = {"device": str(device), "workers": args.workers, "crop": args.crop, "png_size": args.png_size,
           "n_images": args.n_images, "torch_threads": torch.get_num_threads()}
    out["loader_pairs_per_s_reference"] = loader_rate(ref_loader)
    out["loader_pairs_per_s_pipeline"] = loader_rate(pipe_loader)
    out["loader_ratio"] = out["loader_pairs_per_s_pipeline"] / out["loader_pairs_per_s_reference"]
    if args.arch != "none":
        def model():
            torch.manual_seed(0)
            return BarlowTwins(build_resnet(args.arch), FEATURE_DIMS[args.arch], args.projector, 0.0051,
                               args.batch_size).to(device)
        out["train_pairs_per_s_reference"] = train_rate(ref_loader, model(), device, False, args.steps)
        sampler.set_epoch(1)
        out["train_pairs_per_s_pipeline"] = train_rate(pipe_loader, model(), device, True, args.steps)
        out["train_ratio"] = out["train_pairs_per_s_pipeline"] / out["train_pairs_per_s_reference"]
    for key, value in out.items():
        print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
