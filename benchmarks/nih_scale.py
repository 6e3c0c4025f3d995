#!/usr/bin/env python
"""NIH ChestX-ray14 at its real scale: the index, the resized cache, and the pretraining loader.

A synthetic NIH tree of ``--n`` images (default 112,120) in the Kaggle layout that ``index_nih``
reads: ``images_001/images/ ... images_012/images/`` holding as many images each as the real
folders (4,999, 10,000 x 10, 7,121, scaled to ``--n``), named ``<patient:08d>_<follow-up:03d>.png``
for 30,805 / 112,120 patients with a long tail of follow-ups, ``Data_Entry_2017.csv`` with the
real header (trailing comma included), ``train_val_list.txt`` / ``test_list.txt`` (sorted,
patient-disjoint, ~22.8 % test as the real 25,596, no final newline). The pixels are ``--distinct``
1024 x 1024 8-bit phantoms of the demo's NIH generator (``cxrssl.demo.nih.render_nih``, plus
sensor noise that brings a PNG to the real ~0.4-0.5 MB; every 32nd RGBA, as a few real ones are)
hard-linked under all the names: the disk cost is the distinct files plus directory entries.

Measured, each in a fresh child process (times; peak RSS sampled over the child and its workers,
since ``ru_maxrss`` carries the parent's peak across ``exec``):

* index: ``cxrssl.data.nih.build_index`` + the CSV write at ``--n`` and at ``--n // --small``
  (baseline): ``index_time_ratio`` (against ``index_images_ratio``), ``index_rss_ratio`` (peak RSS
  large / small, the process's import baseline in both) and ``index_rss_growth_mb`` (peak minus the
  RSS after imports: the table, proportional to N by nature; ``index_rss_kb_per_image``).
* cache: ``cxrssl.data.nih.build_cache`` (the rule's code, supervised workers, at the config's
  ``nih.cache_size``) over a seeded sample of ``--cache-sample`` images of the large index with each
  of ``--cache-workers``, and at 1/4 of the sample with 1 worker (baseline of ``cache_rss_ratio`` and
  ``cache_main_rss_ratio``: 1.0 = memory independent of the number of rows; through the memory map
  it wrote before, the main process grew by every row written, +95 MB from 500 to 2,000 images,
  6.8 GiB at 112,120); images/s, ``cache_speedup_w<k>`` against 1 worker, cache bytes per image,
  and the time and size extrapolated to ``--n``. Decoding 112k 1024 px PNGs would take too long
  here, and the sample's distinct files sit in the page cache: the figures are the CPU cost of
  decode + resize + write, not the read rate of a 45 GB dataset from disk.
* loader: the pretraining loader (``cxrssl.ssl.data.NIHPairDataset`` + ``PairSampler`` over the
  sample's cache, its first ``--loader-images`` train_val images, the config's recipe and crop)
  against the original PIL path on the same images (``benchmarks/pretrain_throughput.ReferenceDataset``:
  PNG decode + ``convert('RGB')`` + the paper's per-sample PIL transforms, as the BarlowTwins-CXR
  code), same batch size, each of ``--loader-workers``, one torch thread; ``loader_ratio_w<k>`` =
  cache / PIL, images/s per worker (0 workers: the main process is the one worker).

Output: one JSON object (also to ``--out``). Top-level keys: ``n, n_small, distinct_pngs, cpus,
cache_size, crop, batch_size, total_s``; ``tree`` (``make_s, disk_mb`` (du: hard links once),
``apparent_gb`` (the sizes of all names), ``folders, patients, max_follow_up, train_val, test, rgba``);
``index_large`` / ``index_small`` (``seconds, images, peak_rss_mb, import_rss_mb``), ``index_found_all``,
``index_time_ratio, index_images_ratio, index_rss_ratio, index_rss_growth_mb, index_rss_growth_small_mb,
index_rss_kb_per_image``; ``cache_w<k>`` and ``cache_small_w1`` (``seconds, images, images_per_s, bytes,
peak_rss_mb`` (all processes: main, forkserver, workers), ``main_rss_mb, worker_rss_mb``),
``cache_bytes_per_image``, ``cache_images_per_s_w<k>``, ``cache_speedup_w<k>``, ``cache_extrapolated_s_w<k>``,
``cache_extrapolated_gb``, ``cache_rss_ratio``, ``cache_main_rss_ratio``; ``loader_images``,
``loader_cache_w<k>`` / ``loader_pil_w<k>`` (images/s), ``loader_cache_per_worker_w<k>`` /
``loader_pil_per_worker_w<k>``, ``loader_ratio_w<k>``.

    nice -n 19 python benchmarks/nih_scale.py --out nih_scale.json   # 3.5 min on 2 shared cores (1.5 the tree)
    python benchmarks/nih_scale.py --n 600 --cache-sample 100 --distinct 8 --batch-size 8   # 15 s (the test's size)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL_N, REAL_PATIENTS, REAL_TEST = 112_120, 30_805, 25_596
#: Images per folder of the Kaggle release, images_001 .. images_012.
REAL_FOLDERS = (4_999, *[10_000] * 10, 7_121)
MIB = 2**20


def make_pool(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` distinct 1024 px phantoms of the demo's generator, with noise; every 32nd RGBA."""
    from cxrssl.demo.nih import _draw_findings, _save_png, render_nih
    from cxrssl.demo.phantom import Anatomy

    rng = np.random.default_rng([seed, 7])
    paths = []
    for i in range(n):
        img, _ = render_nih(1024, Anatomy.sample(rng), _draw_findings(rng), rng)
        noisy = np.clip(img + rng.normal(0.0, 1.5, img.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"pool_{i:04d}.png")
        _save_png(noisy, paths[-1], rgba=i % 32 == 31)
    return paths


def follow_ups(n: int, rng: np.random.Generator) -> np.ndarray:
    """Images per patient: each patient at least one, the rest with a long tail (lognormal weights)."""
    n_patients = max(2, round(n * REAL_PATIENTS / REAL_N))
    weights = rng.lognormal(0.0, 1.2, n_patients)
    counts = 1 + rng.multinomial(n - n_patients, weights / weights.sum())
    if counts.max() > 1000:
        raise ValueError(f"a patient drew {counts.max()} images: more than 3-digit follow-up numbers")
    return counts


def make_tree(root: Path, n: int, pool: list[Path], seed: int) -> dict:
    """The NIH tree of ``n`` hard-linked images, Data_Entry_2017.csv and the two lists under ``root``."""
    from cxrssl.classes import NIH_NO_FINDING
    from cxrssl.demo.nih import DATA_ENTRY_HEADER, _draw_findings

    rng = np.random.default_rng([seed, n])
    counts = follow_ups(n, rng)
    n_patients = len(counts)
    test_patient = rng.random(n_patients) < REAL_TEST / REAL_N
    test_patient[:2] = [False, True]  # both splits have a patient at any size
    sex, age = rng.choice(["M", "F"], n_patients), rng.integers(1, 90, n_patients)
    bounds = np.round(np.cumsum(REAL_FOLDERS) / REAL_N * n).astype(int)
    folders = [root / f"images_{f + 1:03d}" / "images" for f in range(len(REAL_FOLDERS))]
    for folder in folders:
        folder.mkdir(parents=True)
    source = rng.integers(0, len(pool), n)
    train_val, test = [], []
    i = 0
    with open(root / "Data_Entry_2017.csv", "w", newline="") as fh:
        fh.write(DATA_ENTRY_HEADER + "\n")
        writer = csv.writer(fh, lineterminator="\n")
        for p, count in enumerate(counts):
            for fu in range(count):
                name = f"{p + 1:08d}_{fu:03d}.png"
                os.link(pool[source[i]], folders[int(np.searchsorted(bounds, i, side="right"))] / name)
                writer.writerow([name, "|".join(_draw_findings(rng)) or NIH_NO_FINDING, fu, p + 1,
                                 int(age[p]) + fu // 20, sex[p], "PA" if rng.random() < 0.6 else "AP",
                                 2500 + 48 * (i % 12), 2048, 0.143, 0.143])
                (test if test_patient[p] else train_val).append(name)
                i += 1
    (root / "train_val_list.txt").write_text("\n".join(train_val))
    (root / "test_list.txt").write_text("\n".join(test))
    return {"folders": len(folders), "patients": n_patients, "max_follow_up": int(counts.max()) - 1,
            "train_val": len(train_val), "test": len(test)}


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes on disk counting each inode once, as du; bytes of all names, as n real files would take)."""
    seen, disk, apparent = set(), 0, 0
    for folder, dirs, files in os.walk(root):
        disk += os.stat(folder).st_blocks * 512
        for name in files:
            st = os.stat(os.path.join(folder, name))
            apparent += st.st_size
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                disk += st.st_blocks * 512
    return disk, apparent


# --- measured children ----------------------------------------------------------------------------

def child_index(spec: dict) -> dict:
    """The index stage's table and CSV (the rule's code), timed, with the peak RSS above the imports."""
    import psutil
    from convert_dicom import PeakRSS  # benchmarks/convert_dicom.py: sampled RSS of this process (and workers)

    from cxrssl.data.nih import build_index
    from cxrssl.errors import Quarantine
    from cxrssl.io import atomic_write_csv

    imported = psutil.Process().memory_info().rss / MIB
    with PeakRSS() as memory:
        start = time.perf_counter()
        index = build_index(spec["root"], Quarantine("fail", stage="index_nih"))
        atomic_write_csv(index, spec["out"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(index), "peak_rss_mb": memory.peak_total / MIB, "import_rss_mb": imported}


def child_cache(spec: dict) -> dict:
    """The cache of the first ``images`` rows of a sample index (the rule's code), timed, with peak RSS."""
    import pandas as pd
    from convert_dicom import PeakRSS

    from cxrssl.data.nih import build_cache

    index = pd.read_csv(spec["index"]).head(spec["images"])
    out = Path(spec["out"])
    with PeakRSS() as memory:
        start = time.perf_counter()
        kept = build_cache(index, spec["root"], out, spec["size"], spec["workers"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(kept), "images_per_s": len(kept) / seconds, "bytes": out.stat().st_size,
            "peak_rss_mb": memory.peak_total / MIB, "main_rss_mb": memory.peak_self / MIB,
            "worker_rss_mb": memory.peak_worker / MIB}


def measure(kind: str, spec: dict) -> dict:
    env = dict(os.environ, CXRSSL_PROGRESS="0")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child ({kind}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loader_figures(index_csv: Path, cache: Path, root: Path, workers: list[int], batch: int, crop: int,
                   recipe: str) -> dict:
    """Images/s of the pipeline's loader on the cache and of the original PIL path on the PNGs."""
    import torch
    from pretrain_throughput import ReferenceDataset, loader_rate
    from torch.utils.data import DataLoader

    from cxrssl.ssl.augment import TwoViews
    from cxrssl.ssl.data import NIHPairDataset, PairSampler, pretrain_rows

    torch.set_num_threads(1)  # loader workers run single-threaded; so does the main process at 0 workers
    dataset = NIHPairDataset(index_csv, cache, TwoViews(recipe, crop), seed=0)
    if len(dataset) < 2 * batch:
        raise ValueError(f"{len(dataset)} train_val images in the loader sample, fewer than two batches of {batch}")
    pngs = [root / p for p in pretrain_rows(index_csv, len(np.load(cache, mmap_mode="r")))["path"]]
    sampler = PairSampler(len(dataset), batch)
    out = {"loader_images": len(dataset)}
    for w in workers:
        kw = dict(batch_size=batch, num_workers=w, drop_last=True)
        torch.manual_seed(0)
        out[f"loader_pil_w{w}"] = loader_rate(DataLoader(ReferenceDataset(pngs, crop), shuffle=True, **kw))
        out[f"loader_cache_w{w}"] = loader_rate(DataLoader(dataset, sampler=sampler, **kw))
        for path in ("pil", "cache"):
            out[f"loader_{path}_per_worker_w{w}"] = out[f"loader_{path}_w{w}"] / max(1, w)
        out[f"loader_ratio_w{w}"] = out[f"loader_cache_w{w}"] / out[f"loader_pil_w{w}"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=REAL_N, help="Images in the synthetic tree (default: NIH's 112,120).")
    p.add_argument("--small", type=int, default=16, help="Index baseline at n // small images (default 16).")
    p.add_argument("--distinct", type=int, default=256, help="Distinct PNGs hard-linked under the names (256).")
    p.add_argument("--cache-sample", type=int, default=2000, help="Images the cache build is timed on (2000).")
    p.add_argument("--cache-workers", type=int, nargs="+", default=[1, 2], help="Cache worker counts (1 2).")
    p.add_argument("--loader-images", type=int, default=512, help="Sample images the loaders read (512).")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers (0 1 2).")
    p.add_argument("--batch-size", type=int, default=32, help="Loader batch size of both paths (32).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="Also write the JSON object here.")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps({"index": child_index, "cache": child_cache}[kind](json.loads(spec))))
        return {}

    import pandas as pd

    from cxrssl.config import section_defaults

    began = time.perf_counter()
    size = section_defaults("nih")["cache_size"]
    pretrain = section_defaults("pretrain")
    crop, recipe = pretrain["image_size"], pretrain["barlowtwins"]["augment"]
    n_small = max(1, args.n // args.small)
    work = Path(tempfile.mkdtemp(prefix="cxrssl_nih_scale_"))
    try:
        start = time.perf_counter()
        (work / "pool").mkdir()
        pool = make_pool(work / "pool", args.distinct, args.seed)
        tree = make_tree(work / "nih", args.n, pool, args.seed)
        make_tree(work / "nih_small", n_small, pool, args.seed)
        disk, apparent = disk_usage(work / "nih")
        tree.update(make_s=time.perf_counter() - start, disk_mb=disk / MIB, apparent_gb=apparent / 2**30,
                    rgba=sum(1 for i in range(args.distinct) if i % 32 == 31))
        out = {"n": args.n, "n_small": n_small, "distinct_pngs": args.distinct, "cpus": os.cpu_count(),
               "cache_size": size, "crop": crop, "batch_size": args.batch_size, "tree": tree}
        print(f"tree of {args.n} images ({args.distinct} distinct) in {tree['make_s']:.0f} s, {disk / MIB:.0f} MiB "
              f"on disk", file=sys.stderr)

        big = measure("index", {"root": str(work / "nih"), "out": str(work / "index.csv")})
        small = measure("index", {"root": str(work / "nih_small"), "out": str(work / "index_small.csv")})
        out.update(index_large=big, index_small=small, index_found_all=big["images"] == args.n,
                   index_time_ratio=big["seconds"] / small["seconds"], index_images_ratio=args.n / n_small,
                   index_rss_ratio=big["peak_rss_mb"] / small["peak_rss_mb"],
                   index_rss_growth_mb=big["peak_rss_mb"] - big["import_rss_mb"],
                   index_rss_growth_small_mb=small["peak_rss_mb"] - small["import_rss_mb"])
        out["index_rss_kb_per_image"] = out["index_rss_growth_mb"] * 1024 / args.n

        # a seeded sample over the whole index (every folder), its own cache rows 0..k-1
        index = pd.read_csv(work / "index.csv")
        k = min(args.cache_sample, len(index))
        rows = np.sort(np.random.default_rng(args.seed).choice(len(index), k, replace=False))
        sample = index.iloc[rows].reset_index(drop=True).assign(cache_row=np.arange(k))
        sample.to_csv(work / "sample.csv", index=False)
        spec = {"index": str(work / "sample.csv"), "root": str(work / "nih"), "size": size}
        for w in args.cache_workers:
            out[f"cache_w{w}"] = measure("cache", {**spec, "images": k, "workers": w,
                                                   "out": str(work / f"cache_w{w}.npy")})
        out["cache_small_w1"] = measure("cache", {**spec, "images": max(1, k // 4), "workers": 1,
                                                  "out": str(work / "cache_small.npy")})
        first = out[f"cache_w{args.cache_workers[0]}"]
        out["cache_bytes_per_image"] = first["bytes"] / k
        for w in args.cache_workers:
            out[f"cache_images_per_s_w{w}"] = out[f"cache_w{w}"]["images_per_s"]
            out[f"cache_extrapolated_s_w{w}"] = args.n / out[f"cache_w{w}"]["images_per_s"]
        header = first["bytes"] - k * size * size  # the .npy header
        if 1 in args.cache_workers:
            for w in args.cache_workers:
                out[f"cache_speedup_w{w}"] = out[f"cache_images_per_s_w{w}"] / out["cache_images_per_s_w1"]
        out["cache_extrapolated_gb"] = (header + args.n * size * size) / 2**30
        one = out.get("cache_w1", first)
        out["cache_rss_ratio"] = one["peak_rss_mb"] / out["cache_small_w1"]["peak_rss_mb"]
        out["cache_main_rss_ratio"] = one["main_rss_mb"] / out["cache_small_w1"]["main_rss_mb"]

        # the loaders: the sample's first train_val images, read from that sample's cache
        sample[sample["official_split"] == "train_val"].head(args.loader_images).to_csv(work / "loader.csv",
                                                                                        index=False)
        out.update(loader_figures(work / "loader.csv", work / f"cache_w{args.cache_workers[0]}.npy", work / "nih",
                                  args.loader_workers, args.batch_size, crop, recipe))
        out["total_s"] = time.perf_counter() - began
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
