"""The multimodal method in the DAG on the tiny demo: report pairs -> pretrain_multimodal -> its
backbone as a linear-evaluation init, and zero-shot localisation with baselines and CIs; detection
takes the same backbone through init_checkpoint() (dry run)."""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
import torch
import torchvision

from conftest import TINY_CONFIG, snakemake, write_config
from test_workflow import scheduled

pytestmark = pytest.mark.slow

ZS = "results/zeroshot/multimodal/nih"


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mm_dag")
    config = copy.deepcopy(TINY_CONFIG)
    config["pretrain"]["methods"] = ["multimodal"]
    config["linear_eval"].update(inits=["multimodal"], fractions=[1.0])
    config["detection"]["inits"] = ["multimodal"]
    write_config(workdir / "config.yaml", config)
    snakemake(workdir, f"{ZS}/localization.json", "results/linear_eval/multimodal/frac1.0/metrics.json")
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


def test_pairs_pretraining_and_backbone_contract(mm_run):
    from cxrssl.models.backbones import read_sidecar

    pairs = pd.read_csv(mm_run / "results/prepare/reports/pairs.csv")
    assert set(pairs["split"]) >= {"train", "val", "test"}
    assert pairs.groupby("patient_id")["split"].nunique().max() == 1  # patient-disjoint
    assert len(pd.read_csv(mm_run / "results/prepare/reports/quarantine.csv")) == 2  # the demo's two bad reports
    run = mm_run / "results/pretrain/multimodal"
    meta = read_sidecar(run / "backbone.pth")  # the registry's sidecar, checked
    assert (meta["method"], meta["arch"], meta["library"]) == ("multimodal", "resnet18", "torchvision")
    result = torchvision.models.resnet18().load_state_dict(torch.load(run / "backbone.pth", weights_only=True),
                                                          strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    assert len(pd.read_csv(run / "metrics.csv")) >= 1 and (run / "loss.png").is_file()
    assert (mm_run / "results/logs/pretrain/multimodal.log").is_file()  # its own rule, not `pretrain`
    settings = json.loads((run / "model.json").read_text())["settings"]
    assert settings["image_size"] == TINY_CONFIG["pretrain"]["multimodal"]["image_size"]
    # the backbone was a linear-evaluation init like any method's
    metrics = json.loads((mm_run / "results/linear_eval/multimodal/frac1.0/metrics.json").read_text())
    assert metrics


def test_zero_shot_scores_baselines_and_cis(mm_run):
    loc = json.loads((mm_run / ZS / "localization.json").read_text())
    assert loc["boxes"] == "nih" and loc["threshold_chosen_on"] == "val"
    assert loc["val_items"] > 0 and loc["test_items"] > 0
    sources = loc["queries"]["prompt"]
    assert set(sources) == {"model", "model_global", "random", "centre"}
    for source in sources.values():
        assert 0.05 <= source["threshold"] <= 0.95
        for metric in ("energy_in_box", "pointing_game", "iou", "dice", "cnr"):
            score = source["scores"][metric]
            assert score["ci"][0] <= score["mean"] <= score["ci"][1], metric
    assert loc["summary"] == sources["model"]["scores"]  # what the comparison table reads
    assert loc["global_space"] == sources["model_global"]["scores"] and set(loc["baselines"]) == {"random", "centre"}
    scores = pd.read_csv(mm_run / ZS / "scores.csv")
    assert scores.groupby("source").size().nunique() == 1  # every source on the same test items
    items = json.loads((mm_run / ZS / "items.json").read_text())
    assert set(scores["image_id"]) and len(set(scores["image_id"])) <= items["images"]
    assert (mm_run / ZS / "panel.png").stat().st_size > 5000


def test_detection_takes_the_multimodal_backbone(mm_run):
    dry = snakemake(mm_run, "-n", "results/detection/torchvision/multimodal_64px_seed0/best.pth")
    jobs = scheduled(dry)
    assert jobs.get("train_detector") == 1 and "pretrain_multimodal" not in jobs and "pretrain" not in jobs
    assert "results/pretrain/multimodal/backbone.pth" in dry.stdout + dry.stderr


def test_localization_comparison_table(mm_run, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    md, csv = tmp_path / "c.md", tmp_path / "c.csv"
    subprocess.run([sys.executable, str(REPO / "scripts/summarize_localization.py"), "--zeroshot", "nih",
                    str(mm_run / ZS / "localization.json"), "--csv", str(csv), "--markdown", str(md)], check=True)
    table = pd.read_csv(csv)
    assert list(table["method"]) == ["multimodal", "multimodal (global space)", "centre baseline", "random baseline"]
    assert "| image-text similarity | multimodal | nih | prompt |" in md.read_text()
    assert "| image-text similarity | multimodal (global space) | nih | prompt |" in md.read_text()


def test_multimodal_init_from_another_method_is_a_dependency(tmp_path):
    """pretrain.multimodal.init naming a method: its backbone.pth is an input of pretrain_multimodal and
    reaches the script as --init (dry run); a method that does not run, or of another arch, is refused."""
    config = copy.deepcopy(TINY_CONFIG)
    config["pretrain"]["methods"] = ["barlowtwins", "multimodal"]
    config["pretrain"]["multimodal"]["init"] = "barlowtwins"
    write_config(tmp_path / "config.yaml", config)
    dry = snakemake(tmp_path, "-n", "-p", "results/pretrain/multimodal/backbone.pth")
    jobs = scheduled(dry)
    assert jobs.get("pretrain") == 1 and jobs.get("pretrain_multimodal") == 1
    shell = [line for line in (dry.stdout + dry.stderr).splitlines() if "pretrain_multimodal.py" in line]
    assert shell and all(line.rstrip().endswith("--log-file results/logs/pretrain/multimodal.log") for line in shell)
    assert shell[0].count("--init ") == 1 and "--init results/pretrain/barlowtwins/backbone.pth" in shell[0]
    for methods, arch, words in ((["multimodal"], "resnet18", "which pretrain.methods does not run"),
                                 (["barlowtwins", "multimodal"], "resnet34", "differs from pretrain.multimodal.arch")):
        bad = copy.deepcopy(config)
        bad["pretrain"]["methods"] = methods
        bad["pretrain"]["multimodal"]["arch"] = arch
        write_config(tmp_path / "bad.yaml", bad)
        proc = snakemake(tmp_path, "-n", configfile=tmp_path / "bad.yaml", check=False)
        assert proc.returncode != 0 and "pretrain.multimodal.init" in proc.stdout + proc.stderr
        assert words in proc.stdout + proc.stderr
