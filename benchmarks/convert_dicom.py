#!/usr/bin/env python
"""Benchmark the DICOM -> PNG conversion at VinDr scale against the common naive recipe.

Generates (or takes ``--dicom-dir``) full-size radiographs, by default 32 DICOMs of 3,000 x 2,500
pixels, 12, 14 and 16 bits stored in turn, every 4th JPEG 2000 lossless, 2 in 5 MONOCHROME1, then
in one run measures:

* the pipeline (``cxrssl.data.convert.convert_dicoms``) with 1 worker and with each of
  ``--workers`` (fresh output folders, so nothing is cached), and a rerun that hits the cache;
* CPU seconds per image over the whole process tree (sampled; immune to other load on the machine),
  and images/s per core (its inverse);
* the naive baseline most VinDr notebooks use: pydicom ``dcmread`` + ``apply_voi_lut`` +
  MONOCHROME1 flip + min-max to 8 bit + PIL Lanczos resize + PIL PNG, one process;
* the same pipeline runs on ``--memory-factor`` x N files (hard links under new names): peak
  resident memory (sampled over the run's process tree: in all, main, largest worker) does not grow
  with the number of files, and the difference to the N-file runs is the cost of one more file
  (wall and CPU, without the workers' start-up);
* the time 18,000 files (VinDr-CXR) would take at this mix with 1 and with the most workers (the
  N-file run plus the cost per extra file; CPU-bound too: CPU s per extra file / workers, for idle
  cores), and the read rate that asks of the disk (files were in the page cache here);
* the JPEG 2000 files converted with decoding at the reduced resolution level (the default) and
  at full resolution (``j2k_reduce=False``), 1 worker: CPU per image, the decode alone
  (``read_dicom``, CPU time), and how much the PNGs differ (mean / largest absolute difference in
  grey levels).

Every measurement runs in a fresh child process so the memory figures are its own. A readable
table goes to stderr; stdout is one JSON object (also written to ``--json``). The default run took
150 s (25 s of it generating the files) on this 2-core machine, shared with other work.
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

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_voi_lut

#: VinDr-CXR's number of DICOMs (train 15,000 + test 3,000), for the extrapolated run time.
VINDR_FILES = 18_000


def make_dicoms(folder: Path, n: int, height: int, width: int, j2k_every: int, seed: int,
                bits: tuple[int, ...] = (12, 14, 16)) -> list[Path]:
    """Smooth anatomy-like images with noise, ``bits`` stored in turn; every ``j2k_every``-th is
    JPEG 2000 lossless, 2 in 5 are MONOCHROME1."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        stored = bits[i % len(bits)]
        top = 2**stored - 1
        cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
        body = np.exp(-(((yy - cy) / (0.45 * height)) ** 2 + ((xx - cx) / (0.4 * width)) ** 2))
        lungs = np.exp(-(((yy - cy) / (0.25 * height)) ** 2 + ((np.abs(xx - cx) - 0.18 * width) / (0.1 * width)) ** 2))
        noise = rng.normal(0, 40, size=(height, width)).astype(np.float32)
        image = top / 4095 * (600 + 2800 * body - 1500 * lungs + noise)
        pixels = np.clip(image, 0, top).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "DX"
        ds.Rows, ds.Columns, ds.SamplesPerPixel = height, width, 1
        ds.PhotometricInterpretation = "MONOCHROME1" if i % 5 in (1, 3) else "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, stored, stored - 1, 0
        ds.WindowCenter, ds.WindowWidth = (top + 1) // 2, top + 1
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
    from cxrssl.data.dicom import read_dicom

    paths = [Path(p) for p in spec["paths"]]
    out = Path(spec["out"])
    if spec["kind"] == "decode":  # read_dicom alone, CPU time, full then reduced for each file
        full, reduced, shapes = [], [], []
        for path in paths:
            for longest_side, times in ((None, full), (spec["size"], reduced)):
                start = time.process_time()
                image, _ = read_dicom(path, longest_side=longest_side)
                times.append(time.process_time() - start)
            shapes.append(list(image.shape))
        return {"full_cpu_s": full, "reduced_cpu_s": reduced, "reduced_shapes": shapes}
    with PeakRSS() as memory:
        start = time.perf_counter()
        if spec["kind"] == "naive":
            naive_convert(paths, out, spec["size"])
            converted = len(paths)
        else:
            result = convert_dicoms(paths, out / "images", out / "metadata.csv", size=spec["size"], bit_depth=8,
                                    workers=spec["workers"], j2k_reduce=spec.get("j2k_reduce", True))
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


def is_j2k(path: Path) -> bool:
    """Whether the file's pixel data are JPEG 2000 of a syntax the conversion may decode reduced."""
    from cxrssl.data.dicom import REDUCIBLE_SYNTAXES

    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID") in REDUCIBLE_SYNTAXES


def png_difference(folder_a: Path, folder_b: Path, stems: list[str]) -> tuple[float, int]:
    """Mean and largest absolute grey-level difference between same-named PNGs of two folders."""
    diffs = [np.abs(cv2.imread(str(folder_a / f"{s}.png"), cv2.IMREAD_UNCHANGED).astype(int)
                    - cv2.imread(str(folder_b / f"{s}.png"), cv2.IMREAD_UNCHANGED).astype(int)) for s in stems]
    return float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))


def say(*args) -> None:
    print(*args, file=sys.stderr)


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom-dir", help="Use the DICOMs under this folder (recursively) instead of generating.")
    parser.add_argument("--n-files", type=int, default=32, help="DICOMs to generate / use (default 32).")
    parser.add_argument("--height", type=int, default=3000, help="Generated image height (default 3000).")
    parser.add_argument("--width", type=int, default=2500, help="Generated image width (default 2500).")
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 14, 16],
                        help="Bits stored, in turn (default 12 14 16).")
    parser.add_argument("--j2k-every", type=int, default=4, help="Every k-th generated file is JPEG 2000 (0: none).")
    parser.add_argument("--size", type=int, default=1024, help="Longest side of the PNGs (default 1024).")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Worker counts to compare with 1.")
    parser.add_argument("--memory-factor", type=int, default=3,
                        help="File-count multiple for the memory check and the cost per extra file (>= 2).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    if args.memory_factor < 2:
        parser.error("--memory-factor must be at least 2")

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cxrssl_bench_"))
    try:
        if args.dicom_dir:
            paths = sorted(p for p in Path(args.dicom_dir).rglob("*") if p.suffix.lower() in (".dicom", ".dcm"))
            paths = paths[: args.n_files]
        else:
            t0 = time.perf_counter()
            paths = make_dicoms(work / "dicom", args.n_files, args.height, args.width, args.j2k_every, args.seed,
                                tuple(args.bits))
            say(f"generated {len(paths)} DICOMs {args.height}x{args.width}, {'/'.join(map(str, args.bits))} bits "
                f"in {time.perf_counter() - t0:.1f} s")
        n = len(paths)
        j2k = [p for p in paths if is_j2k(p)]
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        say(f"{n} files ({len(j2k)} JPEG 2000), {megabytes:.1f} MiB, output longest side {args.size}px, "
            f"{os.cpu_count()} CPUs visible")
        base = {"paths": [str(p) for p in paths], "size": args.size}
        # the same files again under new names (hard links): memory vs file count, and the cost of one more file
        many = []
        for k in range(args.memory_factor):
            for p in paths:
                link = work / "many" / p.parent.name / f"{p.stem}_{k}{p.suffix}"
                link.parent.mkdir(parents=True, exist_ok=True)
                os.link(p, link)
                many.append(str(link))

        naive = measure({**base, "kind": "naive", "out": str(work / "naive")})
        counts = sorted({1, *args.workers})
        runs = {w: measure({**base, "kind": "pipeline", "workers": w, "out": str(work / f"p{w}")}) for w in counts}
        runs_many = {w: measure({"paths": many, "size": args.size, "kind": "pipeline", "workers": w,
                                 "out": str(work / f"many{w}")}) for w in counts}
        cached = measure({**base, "kind": "pipeline", "workers": max(args.workers), "out": str(work / "p1")})
        extra = len(many) - n  # per extra file: the workers' start-up left out
        wall_per_file = {w: (runs_many[w]["seconds"] - runs[w]["seconds"]) / extra for w in counts}
        cpu_per_file = (runs_many[1]["cpu_s"] - runs[1]["cpu_s"]) / extra

        say(f"\n{'run':38s} {'img/s':>7s} {'wall s':>7s} {'CPU s/img':>9s}   peak RSS MiB: all processes "
            "(main / largest worker)")
        for name, r, count in [("naive (pydicom+PIL Lanczos, 1 proc)", naive, n),
                               *[(f"pipeline, {w} worker(s)", runs[w], n) for w in counts],
                               *[(f"pipeline, {w} worker(s), {len(many)} files", runs_many[w], len(many))
                                 for w in counts]]:
            say(f"{name:38s} {count / r['seconds']:7.2f} {r['seconds']:7.2f} {r['cpu_s'] / count:9.2f}   "
                f"{r['total_mb']:6.0f} ({r['self_mb']:.0f} / {r['worker_mb']:.0f})")
        say(f"{'pipeline rerun, all cached':38s} {n / cached['seconds']:7.1f} {cached['seconds']:7.2f}"
            f" {cached['cpu_s'] / n:9.3f}   (converted {cached['converted']})")
        one = runs[1]
        say(f"\nper-core speed, pipeline / naive: {naive['seconds'] / one['seconds']:.2f}x wall, "
            f"{naive['cpu_s'] / one['cpu_s']:.2f}x CPU time (CPU time is what to trust on a loaded machine); "
            f"{cpu_per_file:.3f} CPU s per extra file")
        scaling = {w: one["seconds"] / runs[w]["seconds"] for w in counts[1:]}
        scaling_extra = {w: wall_per_file[1] / wall_per_file[w] for w in counts[1:]}
        for w in counts[1:]:
            say(f"scaling 1 -> {w} workers: {scaling[w]:.2f}x ({n} files), {scaling_extra[w]:.2f}x per extra file")

        j2k_figures: dict = {"j2k_files": len(j2k)}
        if j2k:
            stems = [p.stem for p in j2k]
            spec = {"paths": [str(p) for p in j2k], "size": args.size, "kind": "pipeline", "workers": 1}
            full = measure({**spec, "j2k_reduce": False, "out": str(work / "j2k_full")})
            reduced = measure({**spec, "j2k_reduce": True, "out": str(work / "j2k_reduced")})
            decode = measure({**spec, "kind": "decode", "out": str(work / "unused")})
            mae, largest = png_difference(work / "j2k_full" / "images", work / "j2k_reduced" / "images", stems)
            j2k_figures.update({
                "j2k_cpu_s_per_image_reduced": reduced["cpu_s"] / len(j2k),
                "j2k_cpu_s_per_image_full": full["cpu_s"] / len(j2k),
                "j2k_reduced_vs_full_conversion_cpu": full["cpu_s"] / reduced["cpu_s"],
                "j2k_decode_cpu_s_reduced": float(np.mean(decode["reduced_cpu_s"])),
                "j2k_decode_cpu_s_full": float(np.mean(decode["full_cpu_s"])),
                "j2k_reduced_vs_full_decode_cpu": sum(decode["full_cpu_s"]) / sum(decode["reduced_cpu_s"]),
                "j2k_reduced_shapes": sorted({tuple(s) for s in decode["reduced_shapes"]}),
                "j2k_png_mean_abs_diff_8bit": mae, "j2k_png_max_abs_diff_8bit": largest,
            })
            f = j2k_figures
            say(f"\nJPEG 2000 ({len(j2k)} files, 1 worker), full -> reduced level: conversion "
                f"{f['j2k_cpu_s_per_image_full']:.2f} -> {f['j2k_cpu_s_per_image_reduced']:.2f} CPU s/img "
                f"({f['j2k_reduced_vs_full_conversion_cpu']:.2f}x); read_dicom {f['j2k_decode_cpu_s_full']:.2f} -> "
                f"{f['j2k_decode_cpu_s_reduced']:.2f} CPU s ({f['j2k_reduced_vs_full_decode_cpu']:.2f}x), decoded at "
                f"{f['j2k_reduced_shapes']}; PNGs differ by {mae:.2f} grey levels on average (largest {largest})")

        most = max(args.workers)
        small, big = runs[most], runs_many[most]
        say(f"\npeak RSS, pipeline with {most} workers: {n} files -> {small['total_mb']:.0f} MiB in all "
            f"(main {small['self_mb']:.0f}, worker {small['worker_mb']:.0f}); {len(many)} files -> "
            f"{big['total_mb']:.0f} MiB (main {big['self_mb']:.0f}, worker {big['worker_mb']:.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hours = {f"{w}_worker{'s' if w > 1 else ''}": (runs[w]["seconds"] + wall_per_file[w] * (VINDR_FILES - n)) / 3600
             for w in counts}
    hours[f"{most}_workers_cpu_bound"] = VINDR_FILES * cpu_per_file / most / 3600
    say(f"\n{VINDR_FILES} files at this mix: " + ", ".join(f"{k} {v:.2f} h" for k, v in hours.items())
        + f"; the disk must deliver {megabytes / n / wall_per_file[most]:.0f} MiB/s at {most} workers")
    out = {
        "n_files": n, "height": args.height, "width": args.width, "bits": args.bits, "size": args.size,
        "megabytes": megabytes, "cpus_visible": os.cpu_count(), **j2k_figures,
        "naive": naive, "pipeline": {str(w): r for w, r in runs.items()},
        "pipeline_many": {str(w): r for w, r in runs_many.items()}, "cached": cached,
        "cpu_s_per_image_naive": naive["cpu_s"] / n, "cpu_s_per_image_pipeline": one["cpu_s"] / n,
        "cpu_s_per_extra_image_pipeline": cpu_per_file,
        "images_per_s_per_core_naive": n / naive["cpu_s"], "images_per_s_per_core_pipeline": n / one["cpu_s"],
        "pipeline_vs_naive_cpu": naive["cpu_s"] / one["cpu_s"],
        "pipeline_vs_naive_wall": naive["seconds"] / one["seconds"],
        "speedup_1_to_workers": {str(w): x for w, x in scaling.items()},
        "speedup_1_to_workers_per_extra_file": {str(w): x for w, x in scaling_extra.items()},
        "cached_images_per_s": n / cached["seconds"],
        f"hours_{VINDR_FILES}_files": hours,
        "input_mib_per_s": megabytes / n / wall_per_file[most],
        "memory_mb": {"files": n, "total": small["total_mb"], "main": small["self_mb"], "worker": small["worker_mb"],
                      "files_many": len(many), "total_many": big["total_mb"], "main_many": big["self_mb"],
                      "worker_many": big["worker_mb"]},
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
