#!/usr/bin/env python
"""Benchmark the DICOM -> PNG conversion against the common naive recipe.

Generates (or takes ``--dicom-dir``) radiograph-sized 12-bit DICOMs, some JPEG 2000 lossless and
some MONOCHROME1, then in one run measures:

* the pipeline (``cxrssl.data.convert.convert_dicoms``) with 1 worker and with each of
  ``--workers`` (fresh output folders, so nothing is cached), and a rerun that hits the cache;
* CPU seconds per image over the whole process tree (sampled; immune to other load on the machine);
* the naive baseline most VinDr notebooks use: pydicom ``dcmread`` + ``apply_voi_lut`` +
  MONOCHROME1 flip + min-max to 8 bit + PIL Lanczos resize + PIL PNG, one process;
* peak resident memory (sampled over the run's process tree: in all, main, largest worker) for N and for
  ``--memory-factor`` x N files (hard links under new names), to show memory does not grow with
  the number of files.

Every measurement runs in a fresh child process so the memory figures are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_voi_lut


def make_dicoms(folder: Path, n: int, height: int, width: int, j2k_every: int, seed: int) -> list[Path]:
    """Smooth anatomy-like 12-bit images with noise; every ``j2k_every``-th is JPEG 2000 lossless."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
        body = np.exp(-(((yy - cy) / (0.45 * height)) ** 2 + ((xx - cx) / (0.4 * width)) ** 2))
        lungs = np.exp(-(((yy - cy) / (0.25 * height)) ** 2 + ((np.abs(xx - cx) - 0.18 * width) / (0.1 * width)) ** 2))
        image = 600 + 2800 * body - 1500 * lungs + rng.normal(0, 40, size=(height, width)).astype(np.float32)
        pixels = np.clip(image, 0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = height, width, 1
        ds.PhotometricInterpretation = "MONOCHROME1" if i % 3 == 1 else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.tobytes()
        if j2k_every and i % j2k_every == 0:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = folder / "train" / f"bench{i:05d}.dicom"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def naive_convert(paths: list[Path], out: Path, size: int) -> None:
    """The usual notebook recipe (one process)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        ds = pydicom.dcmread(path)
        data = apply_voi_lut(ds.pixel_array, ds)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            data = np.amax(data) - data
        data = data - np.min(data)
        data = (data / np.max(data) * 255).astype(np.uint8)
        image = Image.fromarray(data)
        scale = size / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(out / f"{path.stem}.png")


class PeakRSS:
    """Samples the resident memory of this process and all its descendants (pool workers are
    forked from the forkserver, so getrusage(RUSAGE_CHILDREN) would not see them)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.me, self.interval = psutil.Process(), interval
        self.peak_total = self.peak_self = self.peak_worker = 0
        self.cpu: dict[int, float] = {}  # pid -> last seen user+system seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self.me.memory_info().rss
        times = self.me.cpu_times()
        self.cpu[self.me.pid] = times.user + times.system
        workers = []
        for proc in self.me.children(recursive=True):
            try:
                workers.append(proc.memory_info().rss)
                times = proc.cpu_times()
                self.cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                pass
        self.peak_self = max(self.peak_self, own)
        self.peak_worker = max([self.peak_worker, *workers])
        self.peak_total = max(self.peak_total, own + sum(workers))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._sample()
        self.cpu_start = sum(self.cpu.values())
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def child(spec: dict) -> dict:
    """One measured run in this (fresh) process; imports happen before the clock starts."""
    from cxrssl.data.convert import convert_dicoms

    paths = [Path(p) for p in spec["paths"]]
    out = Path(spec["out"])
    with PeakRSS() as memory:
        start = time.perf_counter()
        if spec["kind"] == "naive":
            naive_convert(paths, out, spec["size"])
            converted = len(paths)
        else:
            result = convert_dicoms(paths, out / "images", out / "metadata.csv", size=spec["size"], bit_depth=8,
                                    workers=spec["workers"])
            converted = len(result.converted)
        seconds = time.perf_counter() - start
    mib = 2**20
    return {"seconds": seconds, "converted": converted, "self_mb": memory.peak_self / mib,
            "worker_mb": memory.peak_worker / mib, "total_mb": memory.peak_total / mib,
            "cpu_s": sum(memory.cpu.values()) - memory.cpu_start, "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(spec: dict) -> dict:
    env = dict(os.environ, CXRSSL_PROGRESS="0")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom-dir", help="Use the DICOMs under this folder (recursively) instead of generating.")
    parser.add_argument("--n-files", type=int, default=8, help="DICOMs to generate / use (default 8).")
    parser.add_argument("--height", type=int, default=2500, help="Generated image height (default 2500).")
    parser.add_argument("--width", type=int, default=2048, help="Generated image width (default 2048).")
    parser.add_argument("--j2k-every", type=int, default=4, help="Every k-th generated file is JPEG 2000 (0: none).")
    parser.add_argument("--size", type=int, default=1024, help="Longest side of the PNGs (default 1024).")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Worker counts to compare with 1.")
    parser.add_argument("--memory-factor", type=int, default=3, help="File-count multiple for the memory check.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    work = Path(tempfile.mkdtemp(prefix="cxrssl_bench_"))
    try:
        if args.dicom_dir:
            paths = sorted(p for p in Path(args.dicom_dir).rglob("*") if p.suffix.lower() in (".dicom", ".dcm"))
            paths = paths[: args.n_files]
        else:
            t0 = time.perf_counter()
            paths = make_dicoms(work / "dicom", args.n_files, args.height, args.width, args.j2k_every, args.seed)
            print(f"generated {len(paths)} DICOMs {args.height}x{args.width} 12-bit "
                  f"({sum(1 for i in range(len(paths)) if args.j2k_every and i % args.j2k_every == 0)} JPEG 2000) "
                  f"in {time.perf_counter() - t0:.1f} s")
        n = len(paths)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{n} files, {megabytes:.1f} MiB, output longest side {args.size}px, {os.cpu_count()} CPUs visible")
        base = {"paths": [str(p) for p in paths], "size": args.size}

        naive = measure({**base, "kind": "naive", "out": str(work / "naive")})
        rows = [("naive (pydicom+PIL Lanczos, 1 proc)", 1, naive)]
        for workers in sorted({1, *args.workers}):
            rows.append((f"pipeline, {workers} worker(s)", workers,
                         measure({**base, "kind": "pipeline", "workers": workers, "out": str(work / f"p{workers}")})))
        cached = measure({**base, "kind": "pipeline", "workers": max(args.workers), "out": str(work / "p1")})

        print(f"\n{'run':38s} {'img/s':>7s} {'wall s':>7s} {'CPU s/img':>9s}   peak RSS MiB: all processes "
              "(main / largest worker)")
        for name, _, r in rows:
            print(f"{name:38s} {n / r['seconds']:7.2f} {r['seconds']:7.2f} {r['cpu_s'] / n:9.2f}   "
                  f"{r['total_mb']:6.0f} ({r['self_mb']:.0f} / {r['worker_mb']:.0f})")
        print(f"{'pipeline rerun, all cached':38s} {n / cached['seconds']:7.1f} {cached['seconds']:7.2f}"
              f" {cached['cpu_s'] / n:9.3f}   (converted {cached['converted']})")
        one = next(r for name, w, r in rows if w == 1 and name.startswith("pipeline"))
        print(f"\nper-core speed, pipeline / naive: {naive['seconds'] / one['seconds']:.2f}x wall, "
              f"{naive['cpu_s'] / one['cpu_s']:.2f}x CPU time (CPU time is what to trust on a loaded machine)")
        for name, workers, r in rows[2:]:
            print(f"scaling 1 -> {workers} workers: {one['seconds'] / r['seconds']:.2f}x "
                  f"(efficiency {one['seconds'] / r['seconds'] / workers:.0%})")

        # memory vs file count: the same files again under new names (hard links)
        many = []
        for k in range(args.memory_factor):
            for p in paths:
                link = work / "many" / p.parent.name / f"{p.stem}_{k}{p.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, link)
                many.append(str(link))
        workers = max(args.workers)
        big = measure({"paths": many, "size": args.size, "kind": "pipeline", "workers": workers,
                       "out": str(work / "many_out")})
        small = next(r for name, w, r in rows if w == workers and name.startswith("pipeline"))
        print(f"\npeak RSS, pipeline with {workers} workers: {n} files -> {small['total_mb']:.0f} MiB in all "
              f"(main {small['self_mb']:.0f}, worker {small['worker_mb']:.0f}); {len(many)} files -> "
              f"{big['total_mb']:.0f} MiB (main {big['self_mb']:.0f}, worker {big['worker_mb']:.0f}); "
              f"{len(many) / big['seconds']:.2f} img/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
