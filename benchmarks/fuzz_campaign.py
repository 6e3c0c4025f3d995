#!/usr/bin/env python
"""A long fuzzing campaign over every input the data stages and the checkpoint loader take.

The generators and oracles are those of the test suite (tests/fuzzing.py), run at scale:

* ``--cases`` mutated DICOMs (every reader variant; header mutations with a known expected outcome
  and random byte damage), converted by the real stage (``run_convert``, ``--workers`` supervised
  workers, ``skip``) in batches, with ids pseudonymised, planted patient names and ids in tags and
  file names, and a batch under ``fail`` now and then (nothing partial may stay);
* ``--cases / 2`` mutated annotation files (both layouts), NIH Data_Entry and list files;
* ``--cases / 4`` hostile configs (random keys and values) and mutated YAML files;
* malicious checkpoints (pickle payloads that would create a marker file) and mutated ones.

Prints one JSON object: cases, clean errors, consistent results, uncaught exceptions, hangs,
silent wrong outputs, errors that do not name their input, partial files, identifier leaks (every
output file and the stage log grepped for the planted names) and peak memory (largest worker and
this process, sampled). Goal: zero everywhere but cases, clean errors and ok. ``--seed`` makes a
run repeatable; ``--keep`` leaves the files for inspection.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fuzzing  # noqa: E402  (tests/fuzzing.py: the suite's generators and oracles)

from cxrssl.config import ConfigError, load_config, load_schema, validate_config  # noqa: E402
from cxrssl.data.convert import run_convert  # noqa: E402
from cxrssl.errors import BadInputError  # noqa: E402
from cxrssl.privacy import Pseudonymizer  # noqa: E402


class Tally:
    """Outcome counts per input kind, with the first few examples of every failure."""

    FAILURES = ("uncaught", "wrong", "unnamed", "hang", "partial", "leak")

    def __init__(self):
        self.counts: dict[str, Counter] = {}
        self.examples: list[dict] = []

    def add(self, what: str, outcome: str, detail: str = "", case: str = "") -> None:
        self.counts.setdefault(what, Counter())[outcome] += 1
        if outcome in self.FAILURES and len(self.examples) < 30:
            self.examples.append({"input": what, "outcome": outcome, "case": case, "detail": detail[:300]})

    def total(self, outcome: str) -> int:
        return sum(c[outcome] for c in self.counts.values())


class PeakMemory:
    """Samples the high-water mark (VmHWM) of this process's forkserver workers every 20 ms."""

    def __init__(self):
        self.worker_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            try:
                for server in me.children():
                    for worker in server.children():
                        with open(f"/proc/{worker.pid}/status") as fh:
                            for line in fh:
                                if line.startswith("VmHWM"):
                                    self.worker_mb = max(self.worker_mb, int(line.split()[1]) / 1024)
            except (OSError, psutil.Error):
                continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def leaks_under(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        texts = [path.name] + ([path.read_bytes().decode("latin-1")] if path.is_file() else [])
        found += [f"{secret} in {path}" for secret in fuzzing.SECRETS if any(secret in t for t in texts)]
    return found


def dicom_campaign(work: Path, n: int, batch: int, workers: int, rng: np.random.Generator, tally: Tally,
                   timeout_s: float) -> None:
    seeds = fuzzing.dicom_seeds(work / "seeds")
    private, names = work / "private", sorted(seeds)
    for start in range(0, n, batch):
        folder = work / f"batch{start:06d}"
        cases = [fuzzing.mutate_dicom(seeds[names[int(rng.integers(len(names)))]],
                                      folder / "site" / "train" / f"{fuzzing.FILE_SECRET}_{start + i:06d}.dicom", rng)
                 for i in range(min(batch, n - start))]
        results = folder / "results"
        (results / "logs").mkdir(parents=True)
        handler = logging.FileHandler(results / "logs" / "convert.log")
        logging.getLogger().addHandler(handler)
        fail_run = start // batch % 5 == 4  # every fifth batch under `fail`: the run must stop cleanly
        outcome: dict = {}

        def run():
            try:
                run_convert([c.path for c in cases], [], results / "img", results / "metadata.csv", results / "q.csv",
                            size=32, workers=workers, on_bad_input="fail" if fail_run else "skip",
                            pseudonymize_ids=True, private_dir=private)
            except BaseException as exc:  # noqa: BLE001 - classified below
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout=timeout_s * 4 + 120)
        logging.getLogger().removeHandler(handler)
        handler.close()
        if thread.is_alive():
            tally.add("dicom", "hang", f"batch {start} did not finish", str(folder))
            return  # the stuck thread keeps its workers: stop the DICOM campaign here
        for leak in leaks_under(results):
            tally.add("dicom", "leak", leak, str(folder))
        for leftover in fuzzing.temporary_leftovers(results):
            tally.add("dicom", "partial", str(leftover), str(folder))
        ids = Pseudonymizer(True, private)
        error = outcome.get("error")
        if fail_run:
            if error is None:
                tally.add("dicom_fail_runs", "ok")
            elif isinstance(error, BadInputError) and any(error.item == ids.file_label(c.path) for c in cases):
                tally.add("dicom_fail_runs", "partial" if (results / "metadata.csv").exists() else "clean",
                          "metadata.csv left behind by a failed run", str(folder))
            else:
                tally.add("dicom_fail_runs", "uncaught", f"{type(error).__name__}: {error}", str(folder))
            continue
        if error is not None:
            tally.add("dicom", "uncaught", f"{type(error).__name__}: {error}", str(folder))
            continue
        meta = pd.read_csv(results / "metadata.csv", dtype={"image_id": str}).set_index("image_id")
        quarantined = dict(pd.read_csv(results / "q.csv")[["item", "reason"]].itertuples(index=False))
        for case in cases:
            label = ids.file_label(case.path)
            image_id = ids.image_id(case.path.stem)
            row = meta.loc[image_id].to_dict() if image_id in meta.index else None
            png = cv2.imread(str(results / row["png"]), cv2.IMREAD_UNCHANGED) if row else None
            result = fuzzing.judge_conversion(case, label, row, quarantined, png)
            if result == "clean" and "stopped after" in quarantined.get(label, ""):
                result = "hang"
            tally.add("dicom", result, quarantined.get(label, ""), f"{case.seed}/{case.kind}")
        shutil.rmtree(folder / "site")  # the inputs are large in number; keep outputs only with --keep


def csv_campaign(work: Path, n: int, rng: np.random.Generator, tally: Tally) -> None:
    seeds = {layout: fuzzing.annotation_seed(layout) for layout in ("physionet", "kaggle")}
    entry_seed, list_seed = fuzzing.nih_seed()
    names = list_seed.decode().split("\n")
    for i in range(n):
        layout = ("physionet", "kaggle")[i % 2]
        data, touched, kind = fuzzing.mutate_text(seeds[layout], rng)
        outcome, detail = fuzzing.judge_annotations(work / "csv" / f"a{i:06d}", layout, seeds[layout], data, touched)
        tally.add(f"annotations_{layout}", outcome, detail, kind)
        for name, seed, is_list in (("Data_Entry_2017.csv", entry_seed, False), ("train_val_list.txt", list_seed, True)):
            data, touched, kind = fuzzing.mutate_text(seed, rng)
            outcome, detail = fuzzing.judge_nih(work / "csv" / f"n{i:06d}" / name, data, touched, names, is_list)
            tally.add("nih_list" if is_list else "nih_data_entry", outcome, detail, kind)
        if i % 200 == 199:
            shutil.rmtree(work / "csv")


def config_campaign(work: Path, n: int, seed: int, rng: np.random.Generator, tally: Tally) -> None:
    keys = fuzzing.schema_keys(load_schema())
    rnd = random.Random(seed)
    for _ in range(n):
        config = fuzzing.random_config(rnd, keys, rnd.randint(1, 6))
        try:
            validated = validate_config(config, source="fuzz.yaml")
        except ConfigError as exc:
            tally.add("config", "clean" if str(exc).startswith("fuzz.yaml is not valid:") else "unnamed", str(exc))
            continue
        except Exception as exc:  # noqa: BLE001
            tally.add("config", "uncaught", f"{type(exc).__name__}: {exc}", json.dumps(config, default=str)[:200])
            continue
        tally.add("config", "ok" if validate_config(validated) == validated else "wrong")
    text = (REPO / "config.yaml").read_bytes()
    for i in range(n):
        path = work / "yaml" / f"c{i:06d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fuzzing.mutate_text(text, rng)[0])
        try:
            load_config(path)
            tally.add("config_yaml", "ok")
        except ConfigError as exc:
            tally.add("config_yaml", "clean" if str(exc).startswith(str(path)) else "unnamed", str(exc))
        except Exception as exc:  # noqa: BLE001
            tally.add("config_yaml", "uncaught", f"{type(exc).__name__}: {exc}", str(path))
        path.unlink()


def checkpoint_campaign(work: Path, n: int, rng: np.random.Generator, tally: Tally) -> None:
    import os

    import torch

    from cxrssl.runtime import load_checkpoint

    folder = work / "ckpt"
    folder.mkdir(parents=True)
    marker = folder / "PWNED"

    class Payload:
        def __init__(self, how):
            self.how = how

        def __reduce__(self):
            if self.how == "system":
                return os.system, (f"touch {marker}",)
            if self.how == "exec":
                return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)
            return Path.touch, (marker,)

    evil = []
    for how in ("touch", "system", "exec"):
        torch.save({"model": {"w": torch.zeros(2)}, "x": Payload(how)}, folder / f"zip_{how}.pth")
        torch.save(Payload(how), folder / f"legacy_{how}.pth", _use_new_zipfile_serialization=False)
        (folder / f"pickle_{how}.pth").write_bytes(pickle.dumps(Payload(how)))
        evil += [folder / f"zip_{how}.pth", folder / f"legacy_{how}.pth", folder / f"pickle_{how}.pth"]
    for path in evil:
        try:
            load_checkpoint(path)
            tally.add("checkpoint_malicious", "wrong", "loaded", path.name)
        except BadInputError as exc:
            tally.add("checkpoint_malicious", "clean" if exc.item == str(path) else "unnamed", str(exc))
        except Exception as exc:  # noqa: BLE001
            tally.add("checkpoint_malicious", "uncaught", f"{type(exc).__name__}: {exc}", path.name)
        if marker.exists():
            tally.add("checkpoint_malicious", "wrong", "the payload ran", path.name)
            marker.unlink()
    good = folder / "good.pth"
    torch.save({"model": {"w": torch.arange(6.0)}, "step": 3, "metrics": [{"loss": 1.0}]}, good)
    data = good.read_bytes()
    for i in range(n):
        mutated = bytearray(data)
        if i % 2:
            mutated = mutated[:int(rng.integers(0, len(mutated)))]
        for _ in range(int(rng.integers(1, 8))):
            if mutated:
                mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        path = folder / "m.pth"
        path.write_bytes(bytes(mutated))
        try:
            load_checkpoint(path)
            tally.add("checkpoint_mutated", "ok")
        except BadInputError as exc:
            tally.add("checkpoint_mutated", "clean" if exc.item == str(path) else "unnamed", str(exc))
        except Exception as exc:  # noqa: BLE001
            tally.add("checkpoint_mutated", "uncaught", f"{type(exc).__name__}: {exc}", str(i))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="Mutated DICOMs (CSV cases: half, configs: a quarter).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every generator (a run is repeatable).")
    parser.add_argument("--workers", type=int, default=2, help="Conversion worker processes.")
    parser.add_argument("--batch", type=int, default=250, help="DICOMs per conversion run.")
    parser.add_argument("--timeout", type=float, default=60.0, help="Per-file conversion timeout (a hang) in seconds.")
    parser.add_argument("--work-dir", help="Where the cases are written (default: a temporary folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = parser.parse_args(argv)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.ERROR)  # the stage's own messages go to each batch's log file (grepped for leaks)
    logging.basicConfig(level=logging.INFO, handlers=[terminal], force=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cxrssl-fuzz-"))
    rng, tally, start = np.random.default_rng(args.seed), Tally(), time.monotonic()
    try:
        with PeakMemory() as peak:
            dicom_campaign(work / "dicom", args.cases, args.batch, args.workers, rng, tally, args.timeout)
        csv_campaign(work, max(1, args.cases // 2), rng, tally)
        config_campaign(work, max(1, args.cases // 4), args.seed, rng, tally)
        checkpoint_campaign(work, max(1, args.cases // 10), rng, tally)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = {
        "seed": args.seed,
        "cases": sum(sum(c.values()) for c in tally.counts.values()),
        "clean_errors": tally.total("clean"),
        "consistent_results": tally.total("ok"),
        "uncaught": tally.total("uncaught"),
        "hangs": tally.total("hang"),
        "silent_wrong_outputs": tally.total("wrong"),
        "errors_not_naming_the_input": tally.total("unnamed"),
        "partial_files": tally.total("partial"),
        "identifier_leaks": tally.total("leak"),
        "peak_memory_mb": {"largest_worker": round(peak.worker_mb, 1),
                           "campaign_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "seconds": round(time.monotonic() - start, 1),
        "by_input": {what: dict(sorted(c.items())) for what, c in sorted(tally.counts.items())},
        "failures": tally.examples,
    }
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
