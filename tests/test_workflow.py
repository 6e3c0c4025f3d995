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
    for method in ("barlowtwins", "vicreg", "gmml"):  # every method, each with its sidecar
        assert (results / f"pretrain/{method}/backbone.pth").is_file()
        assert json.loads((results / f"pretrain/{method}/backbone.json").read_text())["method"] == method
    summary = pd.read_csv(results / "linear_eval/summary.csv")
    assert len(summary) == 3 * 2
    assert set(summary.loc[summary["init"] == "gmml", "arch"]) == {"vit_tiny_patch8"}
    det = pd.read_csv(results / "evaluation/summary.csv")
    assert len(det) == 2
    metrics = json.loads(next((results / "evaluation/torchvision").glob("*/metrics.json")).read_text())
    assert 0.0 <= metrics["mAP50"] <= 1.0
    seg = pd.read_csv(results / "segmentation/summary.csv")  # issue 12: a ResNet and the gmml ViT
    assert seg["init"].tolist() == ["random", "gmml"] and seg["arch"].tolist() == ["resnet18", "vit_tiny_patch8"]


def test_a_complete_run_leaves_nothing_to_do(demo_run):
    assert scheduled(snakemake(demo_run, "-n")) == {}


def test_changing_a_detection_setting_reruns_only_detection_and_after(demo_run, tiny_config, tmp_path):
    config = dict(tiny_config, detection=dict(tiny_config["detection"], lr=0.02))
    jobs = scheduled(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs.get("train_detector") == 2
    assert {"evaluate", "summarize_detection"} <= set(jobs)
    untouched = {"make_demo_data", "convert_dicom", "index_nih", "parse_annotations", "split_vindr",
                 "fuse_boxes", "pretrain", "linear_eval", "summarize_linear_eval"}
    assert not untouched & set(jobs), jobs


def test_changing_one_methods_block_reruns_only_that_method(demo_run, tiny_config, tmp_path):
    pre = dict(tiny_config["pretrain"], gmml=dict(tiny_config["pretrain"]["gmml"], lr=0.001))
    jobs = scheduled(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", dict(tiny_config, pretrain=pre))))
    assert jobs.get("pretrain") == 1 and jobs.get("linear_eval") == 2  # gmml, and its arm at both fractions
    assert "train_detector_torchvision" not in jobs  # detection compares random and barlowtwins only
    assert jobs.get("segment") == 1  # segmentation's gmml arm (issue 12)


def test_changing_the_wbf_threshold_reruns_fusion_and_downstream_only(demo_run, tiny_config, tmp_path):
    vindr = dict(tiny_config["vindr"], fusion={"iou_thr": 0.4})
    config = dict(tiny_config, vindr=vindr)
    jobs = scheduled(snakemake(demo_run, "-n", configfile=write_config(tmp_path / "c.yaml", config)))
    assert jobs.get("fuse_boxes") == 1
    assert jobs.get("train_detector") == 2
    untouched = {"make_demo_data", "convert_dicom", "index_nih", "parse_annotations", "split_vindr",
                 "pretrain", "linear_eval"}
    assert not untouched & set(jobs), jobs


def test_adding_one_dicom_converts_only_that_file(demo_copy):
    train = demo_copy / "data/demo/vindr/train"
    source = sorted(train.glob("*.dicom"))[0]
    new_id = "f" * 32
    shutil.copy2(source, train / f"{new_id}.dicom")
    jobs = scheduled(snakemake(demo_copy, "-n"))
    assert jobs.get("convert_dicom") == 1
    assert "make_demo_data" not in jobs and "pretrain" not in jobs
    snakemake(demo_copy, "results/prepare/vindr/metadata.csv")
    meta = pd.read_csv(demo_copy / "results/prepare/vindr/metadata.csv")
    assert new_id in set(meta["image_id"]) and len(meta) == 36 + 12 + 1
    log = (demo_copy / "results/logs/convert_dicom.log").read_text()
    assert re.search(r"\(1 converted, 48 cached", log), log[-2000:]


def test_deleting_a_checkpoint_reruns_only_what_needs_it(demo_copy):
    (demo_copy / "results/pretrain/barlowtwins/backbone.pth").unlink()
    jobs = scheduled(snakemake(demo_copy, "-n"))
    assert jobs.get("pretrain") == 1
    assert jobs.get("linear_eval") == 2  # the barlowtwins arm at both fractions, not random's
    assert jobs.get("train_detector") == 1  # barlowtwins arm only
    assert not {"convert_dicom", "fuse_boxes", "split_vindr", "index_nih"} & set(jobs), jobs


def test_the_detector_learns_the_demo_lesions(demo_run, tmp_path):
    """Trained on the demo's fused boxes, Faster R-CNN finds the test lesions; untrained, it cannot.

    Uses the package directly on the prepared COCO files of the demo run (random init, so no
    pretraining is involved); the untrained detector's mAP50 on the same test set is the floor.
    """
    import torch

    from cxrssl.config import section_defaults
    from torch.utils.data import DataLoader

    from cxrssl.detection.dataset import CocoDetection, collate
    from cxrssl.detection.engine import predict_coco
    from cxrssl.detection.model import build_detector
    from cxrssl.detection.train import train_detector
    from cxrssl.evaluation import evaluate

    prep = demo_run / "results/prepare/vindr"
    settings = dict(section_defaults("detection"), arch="resnet18", epochs=14, batch_size=4, lr=0.005,
                    warmup_iters=20, workers=0, rpn_proposals=100, rois_per_image=64, amp=False)
    torch.set_num_threads(2)
    train_detector(prep / "coco_train.json", prep / "coco_val.json", prep / "coco_test.json", tmp_path / "run",
                   init="random", res=128, seed=0, settings=settings, device="cpu")
    trained = evaluate(prep / "coco_test.json", tmp_path / "run/predictions_test.json", bootstrap=0)

    untrained_model = build_detector("resnet18", "random", res=128, rpn_proposals=100).eval()
    loader = DataLoader(CocoDetection(prep / "coco_test.json"), batch_size=4, collate_fn=collate)
    untrained = evaluate(prep / "coco_test.json", predict_coco(untrained_model, loader, torch.device("cpu")),
                         bootstrap=0)
    # Deterministic on CPU: this tiny run (27 training images, 98 iterations) reaches 0.084; the full
    # demo reaches 0.3-0.7 (README). The untrained detector's chance hits on 12 images score 0.017.
    assert untrained["mAP50"] < 0.03
    assert trained["mAP50"] >= max(0.05, 3 * untrained["mAP50"]), (trained, untrained["mAP50"])


@pytest.mark.mmdet
def test_mmdet_engine_joins_the_same_dag_and_summary(demo_copy, tiny_config, tmp_path):
    pytest.importorskip("mmcv.ops", reason="mmcv with compiled ops is not installed (make mmcv)")
    # Only engines changes: the torchvision runs stay up to date (engines is a run-selecting setting).
    config = dict(tiny_config, detection=dict(tiny_config["detection"], engines=["mmdet"]))
    configfile = write_config(tmp_path / "both_engines.yaml", config)
    jobs = scheduled(snakemake(demo_copy, "-n", configfile=configfile))
    assert jobs.get("train_detector") == 2, jobs  # the two mmdet runs only
    snakemake(demo_copy, configfile=configfile)
    summary = pd.read_csv(demo_copy / "results/evaluation/summary.csv")
    assert sorted(set(summary["engine"])) == ["mmdet", "torchvision"]
    assert len(summary) == 4
    run = demo_copy / "results/detection/mmdet/barlowtwins_64px_seed0"
    assert json.loads((run / "predictions_test.json").read_text()) is not None
    assert (demo_copy / "results/heatmaps/mmdet/panel_64px_seed0.png").is_file()
    assert (demo_copy / "results/evaluation/mmdet/barlowtwins_64px_seed0/metrics.json").is_file()


def test_report_has_every_section(demo_copy, tmp_path):
    report = tmp_path / "report.html"
    snakemake(demo_copy, "--report", str(report))
    html = report.read_text(errors="replace")
    for category in ("Data", "Pretraining", "Linear evaluation", "Detection", "Heatmaps", "Segmentation"):
        assert f'"{category}"' in html, f"report lacks the {category!r} section"
    for output in ("data_summary.html", "loss.png", "auc_vs_fraction.png", "summary.csv",
                   "map50_by_resolution.png", "panel_64px_seed0.png", "dice_by_init.png"):
        assert output in html, f"report lacks {output}"
    assert "Barlow Twins" in html  # captions are rendered


def test_report_in_the_browser(demo_copy, tmp_path):
    """results/report.html opened in headless Chromium as a reader meets it: the first page shows the
    headline tables (every init of the linear evaluation and of detection, mAP50 with its CIs);
    every category lists its results and shows every figure; the page logs no error."""
    from browser import open_report

    report = demo_copy / "results/report.html"
    snakemake(demo_copy, "--report", str(report))
    seen, errors = open_report(report)
    assert errors == [], errors

    first = seen["first_page"]
    assert "Headline results" in first
    linear = pd.read_csv(demo_copy / "results/linear_eval/summary.csv")
    detection = pd.read_csv(demo_copy / "results/evaluation/summary.csv")
    assert "Linear evaluation: mean test ROC AUC" in first and "50 % labels" in first
    for _, row in linear.iterrows():
        assert f"{row['test_mean_auc']:.3f}" in first, row.to_dict()
    assert "95 % CI (BCa)" in first
    for _, row in detection.iterrows():
        assert f"{row['mAP50']:.3f}" in first and f"[{row['mAP50_bca_low']:.3f}, {row['mAP50_bca_high']:.3f}]" in first
    assert "barlowtwins − random" in first or "barlowtwins − imagenet" in first  # the paired differences

    categories = seen["categories"]
    assert {"Data", "Pretraining", "Linear evaluation", "Detection", "Heatmaps"} <= set(categories), list(categories)
    figures = 0
    for category, subcategories in categories.items():
        for subcategory, items in subcategories.items():
            assert items, (category, subcategory)
            for item in items:
                assert item["listed"], f"{category}/{subcategory}: {item['name']} is not listed:\n{item.get('menu')}"
                if item["rendered"] is not None:
                    assert item["rendered"], f"{category}/{subcategory}: {item['name']} ({item['mime']}) did not render"
                    figures += item["mime"].startswith("image/")
        assert any(i["rendered"] for items in subcategories.values() for i in items), f"{category} shows nothing"
    for name in ("loss.png", "auc_vs_fraction.png", "map50_by_resolution.png", "panel_64px_seed0.png"):
        assert any(i["name"] == name and i["rendered"] for sub in categories.values() for items in sub.values()
                   for i in items), f"{name} did not render"
    assert figures >= 8
