"""End-to-end: the whole DAG on the tiny demo config, and Snakemake's caching (issue 5).

Rerun triggers in use (Snakemake defaults, see README "Incremental re-runs"):
``params`` — each rule passes its config section as flags, so changing a setting reruns exactly
the rules that read it; ``input`` — a changed input set (e.g. a new DICOM) reruns the rule;
``mtime`` — a newer input reruns its consumers; ``code`` — an edited rule body reruns the rule.
"""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from conftest import snakemake, write_config

pytestmark = pytest.mark.slow


def scheduled(proc) -> dict[str, int]:
    """Rule -> job count from a dry run's "Job stats" table (empty when nothing to do)."""
    out = proc.stdout + proc.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)\s*$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
    return counts


def test_whole_dag_produces_every_stage(demo_run):
    results = demo_run / "results"
    meta = pd.read_csv(results / "prepare/vindr/metadata.csv")
    assert len(meta) == 36 + 12
    split = pd.read_csv(results / "prepare/vindr/split.csv")
    assert set(split["split"]) == {"train", "val", "test"}
    assert (results / "pretrain/barlowtwins/backbone.pth").is_file()
    summary = pd.read_csv(results / "linear_eval/summary.csv")
    assert len(summary) == 2 * 2
    det = pd.read_csv(results / "evaluation/summary.csv")
    assert len(det) == 2
    metrics = json.loads(next((results / "evaluation/torchvision").glob("*/metrics.json")).read_text())
    assert 0.0 <= metrics["mAP50"] <= 1.0


def test_a_complete_run_leaves_nothing_to_do(demo_run):
    assert scheduled(snakemake(demo_run, "-n")) == {}


def test_changing_a_detection_setting_reruns_only_detection_and_after(demo_run, tiny_config, tmp_path):
    config = dict(tiny_config, detection=dict(tiny_config["detection"], lr=0.02))
    jobs = scheduled(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs.get("train_detector_torchvision") == 2
    assert {"evaluate", "summarize_detection"} <= set(jobs)
    untouched = {"make_demo_data", "convert_dicom", "index_nih", "parse_annotations", "split_vindr",
                 "fuse_boxes", "pretrain_barlowtwins", "linear_eval", "summarize_linear_eval"}
    assert not untouched & set(jobs), jobs


def test_changing_the_wbf_threshold_reruns_fusion_and_downstream_only(demo_run, tiny_config, tmp_path):
    vindr = dict(tiny_config["vindr"], fusion={"iou_thr": 0.4})
    config = dict(tiny_config, vindr=vindr)
    jobs = scheduled(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs.get("fuse_boxes") == 1
    assert jobs.get("train_detector_torchvision") == 2
    untouched = {"make_demo_data", "convert_dicom", "index_nih", "parse_annotations", "split_vindr",
                 "pretrain_barlowtwins", "linear_eval"}
    assert not untouched & set(jobs), jobs


def test_adding_one_dicom_converts_only_that_file(demo_copy):
    train = demo_copy / "data/demo/vindr/train"
    source = sorted(train.glob("*.dicom"))[0]
    new_id = "f" * 32
    shutil.copy2(source, train / f"{new_id}.dicom")
    jobs = scheduled(snakemake(demo_copy, "-n"))
    assert jobs.get("convert_dicom") == 1
    assert "make_demo_data" not in jobs and "pretrain_barlowtwins" not in jobs
    snakemake(demo_copy, "results/prepare/vindr/metadata.csv")
    meta = pd.read_csv(demo_copy / "results/prepare/vindr/metadata.csv")
    assert new_id in set(meta["image_id"]) and len(meta) == 36 + 12 + 1
    log = (demo_copy / "results/logs/convert_dicom.log").read_text()
    assert re.search(r"converted 1\b", log), log[-2000:]


def test_deleting_a_checkpoint_reruns_only_what_needs_it(demo_copy):
    (demo_copy / "results/pretrain/barlowtwins/backbone.pth").unlink()
    jobs = scheduled(snakemake(demo_copy, "-n"))
    assert jobs.get("pretrain_barlowtwins") == 1
    assert jobs.get("linear_eval") == 2  # the barlowtwins arm at both fractions, not random's
    assert jobs.get("train_detector_torchvision") == 1  # barlowtwins arm only
    assert not {"convert_dicom", "fuse_boxes", "split_vindr", "index_nih"} & set(jobs), jobs
