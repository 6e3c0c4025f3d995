#!/usr/bin/env python
"""Snakemake DAG construction and a no-op dry run for the paper's whole grid (issue 15; goal <= 10 s).

The grid: config/paper.yaml with every registered pretraining method, detection 3 inits x 2
resolutions x 3 seeds x 2 engines (torchvision + mmdet), linear evaluation 3 inits x 3 fractions.
The data roots point at a synthetic layout of placeholders at the real counts and names: the NIH
metadata files and 15,000 empty ``train/<id>.dicom`` files in the Kaggle VinBigData layout (the
DAG's input functions list and stat them; no rule runs). Timed (best of ``--repeats``, each a
fresh ``snakemake -n`` process, as a user meets it):

* ``dryrun_s``: ``snakemake -n`` of the default target (DAG construction + the dry run's report);
* ``baseline_one_target_s``: ``snakemake -n`` of the NIH index only (a one-job DAG: interpreter
  start, Snakefile parsing, config validation: the fixed cost);
* ``dryrun_s_1_100_dicoms``: the whole grid over 1/100 of the placeholder DICOMs (what grows with
  the number of files).

    python benchmarks/dag_dryrun.py                  # about 1 minute on 2 busy cores
    python benchmarks/dag_dryrun.py --profile        # also cProfile of one dry run (top 15 by cumtime)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_layout(root: Path, n_dicoms: int) -> tuple[Path, Path]:
    nih, vindr = root / "nih", root / "vindr"
    (nih / "images_001" / "images").mkdir(parents=True)
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        (nih / name).write_text("placeholder\n")
    (vindr / "train").mkdir(parents=True)
    (vindr / "test").mkdir()
    (vindr / "train.csv").write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n")
    for i in range(n_dicoms):
        (vindr / "train" / f"{i:032x}.dicom").touch()
    return nih, vindr


def grid_config(nih: Path, vindr: Path) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    from cxrssl.ssl.registry import methods

    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    cfg["nih"]["root"], cfg["vindr"]["root"] = str(nih), str(vindr)
    cfg["pretrain"]["methods"] = sorted(methods())
    cfg["detection"].update(engine="torchvision", engines=["mmdet"], inits=["random", "imagenet", "barlowtwins"],
                            resolutions=[224, 640])
    cfg["evaluation"]["seeds"] = [0, 1, 2]
    cfg["linear_eval"].update(inits=["random", "imagenet", "barlowtwins"], fractions=[0.01, 0.1, 1.0])
    return cfg


def snakemake(workdir: Path, configfile: Path, extra: list[str], profile: Path | None = None):
    cmd = [sys.executable]
    if profile:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(configfile), "--cores", "1", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout + proc.stderr


def job_counts(log: str) -> dict[str, int]:
    """The dry run's job table (``rule  count``) as a dict, with its total."""
    counts = {}
    for line in log.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m:
            counts[m.group(1)] = int(m.group(2))
    return counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-dicoms", type=int, default=15000, help="Placeholder DICOMs (Kaggle VinBigData train: 15,000).")
    p.add_argument("--repeats", type=int, default=2, help="Dry runs timed (best taken).")
    p.add_argument("--profile", action="store_true", help="cProfile one dry run and print the top 15 functions.")
    p.add_argument("--json", type=Path, help="Also write the figures here.")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxrssl_dag_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        nih, vindr = make_layout(tmp / "data", args.n_dicoms)
        layout_s = time.perf_counter() - t0
        cfg = grid_config(nih, vindr)
        configfile = tmp / "grid.yaml"
        configfile.write_text(yaml.safe_dump(cfg))
        work = tmp / "work"
        work.mkdir()
        times, log = [], ""
        for _ in range(args.repeats):
            seconds, log = snakemake(work, configfile, [])
            times.append(seconds)
        counts = job_counts(log)
        # baselines in the same run: the fixed cost (one target, the NIH index) and the same grid
        # over 1/100 of the DICOMs (what grows with the file count)
        small = make_layout(tmp / "small", max(1, args.n_dicoms // 100))
        (tmp / "small.yaml").write_text(yaml.safe_dump(grid_config(*small)))
        base = min(snakemake(work, tmp / "small.yaml", ["results/prepare/nih/index.csv"])[0]
                   for _ in range(args.repeats))
        small_s = min(snakemake(work, tmp / "small.yaml", [])[0] for _ in range(args.repeats))
        out = {"n_dicoms": args.n_dicoms, "pretrain_methods": cfg["pretrain"]["methods"],
               "detection_runs": 3 * 2 * 3 * 2, "linear_eval_runs": 3 * 3, "jobs": counts.get("total"),
               "jobs_per_rule": {k: v for k, v in counts.items() if k != "total"},
               "layout_s": layout_s, "dryrun_s": min(times), "dryrun_s_all": times,
               "baseline_one_target_s": base, "dryrun_s_1_100_dicoms": small_s,
               "dag_s_over_one_target": min(times) - base, "ratio_vs_1_100_dicoms": min(times) / small_s, "goal_s": 10.0, "goal_met": min(times) <= 10.0}
        if args.profile:
            import pstats

            prof = tmp / "dag.prof"
            snakemake(work, configfile, [], profile=prof)
            stats = pstats.Stats(str(prof))
            stats.sort_stats("cumulative").print_stats(15)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
