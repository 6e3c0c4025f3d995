#!/usr/bin/env python
"""Pretraining throughput: the input path against the reference code's, and every method side by side.

Input path (Barlow Twins views, the `original` recipe at the same crop, same DataLoader workers):

* pipeline:  uint8 cache (np.load mmap) -> torchvision.transforms.v2 on uint8 tensors, per-sample
             seeded -> uint8 batches -> float/normalise on the device (cxrssl.ssl).
* reference: PIL decode of full-size PNGs + .convert('RGB') -> PIL transforms per sample (the paper's
             recipe) -> ToTensor + Normalize, as the BarlowTwins-CXR code does.

Reports loader image pairs/s and end-to-end training pairs/s (loader + forward/backward + LARS
step) of both, with pipeline/reference ratios. Then each method of --methods through the registry
(the training loop's own steps: per-sample function in the loader, inputs, loss, backward,
gradient clipping, optimizer step, schedule) in the same run: source images/s per method and the
ratio of each to Barlow Twins (--arch for the joint-embedding methods, --vit-arch for GMML).
Without --cache/--png-dir it generates random grey PNGs and the matching cache in a temporary
folder (small by default).

    python benchmarks/pretrain_throughput.py                      # ~2-3 min on 2 CPU cores
    python benchmarks/pretrain_throughput.py --n-images 512 --workers 8 --arch resnet50 \
        --vit-arch vit_small_patch16 --crop 224 --batch-size 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from cxrssl.config import section_defaults
from cxrssl.models.backbone import FEATURE_DIMS, build_resnet
from cxrssl.ssl.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews, normalize_views, sample_seed
from cxrssl.ssl.data import PairSampler
from cxrssl.ssl.lars import LARS, lars_param_groups
from cxrssl.ssl.methods.barlowtwins import BarlowTwins
from cxrssl.ssl.registry import get_method
from cxrssl.ssl.train import build_encoder


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
        epoch, i = item
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        img = torch.from_numpy(np.array(self._cache[i], copy=True)).unsqueeze(0)
        return self.views(img, sample_seed(self.seed, epoch, i))


class MethodDataset(Dataset):
    """The pretraining dataset without the index CSV: each method's per-sample function on the cache."""

    def __init__(self, cache: Path, n: int, sample, seed: int = 0):
        self.cache_path, self.n, self.sample, self.seed, self._cache = cache, n, sample, seed, None

    def __len__(self):
        return self.n

    def image(self, i):
        if self._cache is None:
            self._cache = np.load(self.cache_path, mmap_mode="r")
        return torch.from_numpy(np.array(self._cache[i], copy=True)).unsqueeze(0)

    def __getitem__(self, item):
        epoch, i = item
        return self.sample(self, i, sample_seed(self.seed, epoch, i))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(_to_device(b, device) for b in batch)


def method_rate(name: str, arch: str, cache: Path, n: int, args, device: torch.device, feed: str = "loader",
                compile_model: bool = False, info=None) -> float:
    """Source images/s of ``name``'s training steps (the loop of cxrssl.ssl.train, minus checkpoints).

    ``feed``: ``loader`` (the pipeline's DataLoader over the cache) or ``memory`` (one loader batch
    kept on the device and fed again every step: the rate without the input path). ``compile_model``:
    the model through ``torch.compile`` (``--compile-mode``), as ``pretrain.compile`` does. ``info``:
    a :class:`cxrssl.runtime.DistInfo` for DDP (each rank its slice of the global batch; the rate
    counts the global batch).
    """
    s = section_defaults("pretrain")
    s.update(batch_size=args.batch_size, image_size=args.crop)
    s[name].update(arch=arch, init="random")
    if name == "barlowtwins":
        s[name]["projector"] = args.projector
    if name == "vicreg":
        s[name].update(hidden_dim=args.projector[0], output_dim=args.projector[-1])
    torch.manual_seed(0)
    method = get_method(name)(s[name], s)
    amp = device.type == "cuda" and not args.no_amp
    channels_last = (amp or args.channels_last) and method.spec.family == "resnet"
    world, rank = (info.world_size, info.rank) if info is not None else (1, 0)
    model = method.build_model(build_encoder(s[name], args.crop), args.batch_size)
    if info is not None and info.distributed:
        from cxrssl.runtime import sync_batchnorm

        model = sync_batchnorm(model, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = method.optimizer(model)
    net = model
    if info is not None and info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net, mode=args.compile_mode, backend=args.compile_backend)
    sampler = PairSampler(n, args.batch_size, world, rank)
    loader = DataLoader(MethodDataset(cache, n, method.sample()), batch_size=sampler.local_batch, sampler=sampler,
                        num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0)
    if feed == "memory":
        sampler.set_epoch(0)
        fixed = _to_device(next(iter(loader)), device)
        if device.type == "cuda":
            torch.cuda.synchronize()

        def batches():
            while True:
                yield fixed
    else:
        def batches():
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from loader
                epoch += 1
    model.train()
    warmup = max(1, args.warmup_steps)
    total = args.steps + warmup
    count, start = 0, None
    for step, batch in enumerate(batches()):
        if step >= total:
            break
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
        method.schedule(optimizer, step + 5, 100, 5, args.batch_size)  # past the warm-up
        inputs = method.inputs(batch, device, channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext():
            loss = net(*inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.clip_gradients(model)
        optimizer.step()
        count += args.batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


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
    p.add_argument("--arch", default="resnet18", help="ResNet of the reference comparison and of barlowtwins/vicreg "
                   "('none' skips the reference training rates).")
    p.add_argument("--vit-arch", default="vit_tiny_patch8", help="ViT of gmml (default: the demo's).")
    p.add_argument("--methods", nargs="*", default=["barlowtwins", "vicreg", "gmml"],
                   help="Methods timed side by side (ratios against the first, barlowtwins by default).")
    p.add_argument("--projector", type=int, nargs="+", default=[512, 512], help="Projector widths.")
    p.add_argument("--steps", type=int, default=3, help="Timed training steps per path.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    p.add_argument("--json", type=Path, help="Also write the figures here.")
    p.add_argument("--skip-reference", action="store_true",
                   help="Only the per-method rates (no PNGs generated, no reference path).")
    p.add_argument("--in-memory", action="store_true",
                   help="Also time each method fed from one batch kept on the device (no input path): "
                        "method_<m>_images_per_s_in_memory and loader_vs_in_memory_<m> (goal >= 0.9).")
    p.add_argument("--compile", action="store_true",
                   help="Also time each method with the model through torch.compile (pretrain.compile): "
                        "method_<m>_images_per_s_compiled and compile_speedup_<m>.")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's).")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor).")
    p.add_argument("--channels-last", action="store_true",
                   help="channels_last ResNets also without AMP (on GPU it follows AMP, as in the pipeline).")
    p.add_argument("--no-amp", action="store_true", help="No bf16 autocast on GPU (pretrain.amp: false).")
    p.add_argument("--warmup-steps", type=int, default=1, help="Untimed steps first (compilation, cudnn).")
    p.add_argument("--ddp", action="store_true",
                   help="Run the methods under DDP (launch with torchrun; NCCL on GPU, gloo on CPU): "
                        "--batch-size is the global batch, rates count all ranks; rank 0 reports.")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    random.seed(0)
    info = None
    if args.ddp:
        from cxrssl.runtime import init_distributed

        info = init_distributed(args.device)
        device = info.device
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    tmp = tempfile.TemporaryDirectory(prefix="cxrssl_bench_")
    if args.skip_reference or args.ddp:
        out = method_figures(args, device, tmp, info)
        if info is not None:
            from cxrssl.runtime import cleanup_distributed

            out["ddp_world_size"], out["ddp_backend"] = info.world_size, torch.distributed.get_backend()
            cleanup_distributed()
            if not info.is_main:
                tmp.cleanup()
                return out
        return report(out, args, tmp)
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
    out.update(method_figures(args, device, tmp, None, cache, n_cache))
    return report(out, args, tmp)


def method_figures(args, device, tmp, info, cache=None, n_cache=None) -> dict:
    """Per-method rates (loader-fed; with --in-memory / --compile also those and their ratios)."""
    if cache is None:
        cache = Path(tmp.name) / "cache.npy"
        rng = np.random.default_rng(0)
        n_cache = args.n_images
        if info is None or info.is_main:
            np.save(cache, rng.integers(0, 256, (n_cache, args.cache_size, args.cache_size), dtype=np.uint8))
        if info is not None and info.distributed:  # every rank its own temporary folder: share rank 0's
            import torch.distributed as dist

            names = [str(cache)]
            dist.broadcast_object_list(names, src=0)
            cache = Path(names[0])
    out = {"device": str(device), "workers": args.workers, "crop": args.crop, "batch_size": args.batch_size,
           "torch_threads": torch.get_num_threads(), "amp": device.type == "cuda" and not args.no_amp}
    arch = args.arch if args.arch != "none" else "resnet18"
    for name in args.methods:
        method_arch = args.vit_arch if get_method(name).families == ("vit",) else arch
        out[f"method_{name}_arch"] = method_arch
        out[f"method_{name}_images_per_s"] = method_rate(name, method_arch, cache, n_cache, args, device, info=info)
        if args.in_memory:
            rate = method_rate(name, method_arch, cache, n_cache, args, device, "memory", info=info)
            out[f"method_{name}_images_per_s_in_memory"] = rate
            out[f"loader_vs_in_memory_{name}"] = out[f"method_{name}_images_per_s"] / rate
        if args.compile:
            eager = method_rate(name, method_arch, cache, n_cache, args, device, "memory", info=info)
            compiled = method_rate(name, method_arch, cache, n_cache, args, device, "memory", True, info=info)
            out[f"method_{name}_images_per_s_eager_in_memory"] = eager
            out[f"method_{name}_images_per_s_compiled"] = compiled
            out[f"compile_speedup_{name}"] = compiled / eager
    if args.methods:
        base = args.methods[0]
        for name in args.methods[1:]:
            out[f"method_ratio_{name}_vs_{base}"] = (out[f"method_{name}_images_per_s"]
                                                     / out[f"method_{base}_images_per_s"])
    return out


def report(out: dict, args, tmp) -> dict:
    for key, value in out.items():
        print(f"{key:32s} {value:.2f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
