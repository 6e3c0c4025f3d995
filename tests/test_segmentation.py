"""Lung segmentation: Dice/IoU on hand-checked masks, both release layouts with quarantine, the
patient-disjoint split, the demo's masks, the segmenter on a ResNet and a ViT init, the summary and
a tiny DAG run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrssl.config import section_defaults
from cxrssl.demo.generate import make_demo_dataset
from cxrssl.segmentation.data import parse_source, parse_sources, read_mask, split_patients
from cxrssl.segmentation.model import build_segmenter
from cxrssl.segmentation.summary import summarize
from cxrssl.segmentation.train import bootstrap_mean, dice_iou, train_segmentation
from cxrssl.models.backbones import build_backbone, export_state_dict, get_spec, write_sidecar
from conftest import snakemake, write_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dice_and_iou_on_hand_checked_masks():
    a = np.zeros((4, 4), bool)
    a[0:2, 0:2] = True  # 4 pixels
    b = np.zeros((4, 4), bool)
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    assert dice_iou(a, b) == (pytest.approx(2 * 1 / 8), pytest.approx(1 / 7))
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(a, ~a) == (0.0, 0.0)
    assert dice_iou(np.zeros((3, 3)), np.zeros((3, 3))) == (1.0, 1.0)  # nothing to find, nothing found
    c = np.zeros((4, 4), bool)
    c[0:2, 0:3] = True  # 6 pixels holding all of a
    assert dice_iou(a, c) == (pytest.approx(8 / 10), pytest.approx(4 / 6))
    mean, ci = bootstrap_mean([0.5, 0.7, 0.9], 500, seed=0)
    assert mean == pytest.approx(0.7) and 0.5 <= ci[0] <= 0.7 <= ci[1] <= 0.9
    assert bootstrap_mean([0.5], 500, 0) == (0.5, [None, None])


def _png(path, arr, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).convert(mode).save(path)


def _lungs(h=20, w=24):
    left, right = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
    right[4:16, 2:10] = 255  # patient's right lung, image left
    left[4:16, 14:22] = 255
    return left, right


def test_montgomery_layout_and_its_quarantine(tmp_path):
    root = tmp_path / "MontgomerySet"
    left, right = _lungs()
    for name in ("MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0", "MCUCXR_0004_0", "MCUCXR_0005_1"):
        _png(root / "CXR_png" / f"{name}.png", np.full((20, 24), 100), mode="RGBA" if name.endswith("2_1") else "L")
    for name in ("MCUCXR_0001_0", "MCUCXR_0002_1"):
        _png(root / "ManualMask/leftMask" / f"{name}.png", left)
        _png(root / "ManualMask/rightMask" / f"{name}.png", right // 255)  # a 0/1 mask reads alike
    _png(root / "ManualMask/leftMask/MCUCXR_0003_0.png", left)  # rightMask missing
    _png(root / "ManualMask/leftMask/MCUCXR_0004_0.png", left[:10])  # another size
    _png(root / "ManualMask/rightMask/MCUCXR_0004_0.png", right)
    _png(root / "ManualMask/leftMask/MCUCXR_0005_1.png", np.zeros((20, 24)))  # empty
    _png(root / "ManualMask/rightMask/MCUCXR_0005_1.png", np.zeros((20, 24)))
    _png(root / "ManualMask/rightMask/MCUCXR_0009_0.png", right)  # no image
    frame, bad = parse_source("montgomery", root)
    assert frame["name"].tolist() == ["MCUCXR_0001_0", "MCUCXR_0002_1"]
    assert frame["patient"].tolist() == ["montgomery:MCUCXR_0001", "montgomery:MCUCXR_0002"]
    mask = read_mask(frame["masks"][1])
    assert mask.sum() == 2 * 12 * 8 and mask[10, 5] and mask[10, 18] and not mask[10, 12]
    reasons = dict(zip(bad["file"].map(lambda f: f.rsplit("/", 1)[-1]), bad["reason"]))
    assert reasons["MCUCXR_0003_0.png"] == "missing mask ManualMask/rightMask/MCUCXR_0003_0.png"
    assert reasons["MCUCXR_0004_0.png"] == "mask ManualMask/leftMask/MCUCXR_0004_0.png is 24x10, the image 24x20"
    assert reasons["MCUCXR_0005_1.png"] == "empty mask"
    assert reasons["MCUCXR_0009_0.png"] == "mask without an image in CXR_png"
    assert len(bad) == 4


def test_shenzhen_layout_and_its_quarantine(tmp_path):
    root = tmp_path / "ChinaSet_AllFiles"
    left, right = _lungs()
    for name in ("CHNCXR_0001_0", "CHNCXR_0002_1", "CHNCXR_0003_0"):
        _png(root / "CXR_png" / f"{name}.png", np.full((20, 24), 90))
    _png(root / "mask/CHNCXR_0001_0_mask.png", np.maximum(left, right))
    _png(root / "mask/CHNCXR_0002_1_mask.png", right)
    frame, bad = parse_source("shenzhen", root, "sz")
    assert frame["name"].tolist() == ["CHNCXR_0001_0", "CHNCXR_0002_1"] and set(frame["source"]) == {"sz"}
    assert read_mask(frame["masks"][0]).sum() == 2 * 96
    assert bad["reason"].tolist() == ["missing mask mask/CHNCXR_0003_0_mask.png"]
    with pytest.raises(Exception, match="no CXR_png folder"):
        parse_source("shenzhen", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown lung-mask layout"):
        parse_source("jsrt", root)


def test_split_is_patient_disjoint_seeded_and_has_every_part():
    frame = pd.DataFrame({"patient": [f"p{i // 2}" for i in range(40)]})  # two images per patient
    split = split_patients(frame, 0.1, 0.2, seed=3)
    assert split.equals(split_patients(frame, 0.1, 0.2, seed=3))
    assert not split.equals(split_patients(frame, 0.1, 0.2, seed=4))
    per_patient = pd.DataFrame({"patient": frame["patient"], "split": split}).groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    counts = pd.DataFrame({"patient": frame["patient"], "split": split}).drop_duplicates().value_counts("split")
    assert counts.to_dict() == {"train": 14, "test": 4, "val": 2}
    assert set(split_patients(frame.head(6), 0.1, 0.1, 0)) == {"train", "val", "test"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = make_demo_dataset(root, n_nih=24, n_nih_patients=12, n_vindr_train=4, n_vindr_test=2, image_size=128)
    return root, summary


def test_demo_writes_lung_masks_in_both_layouts_over_the_lungs(demo):
    root, summary = demo
    assert summary["lungs"] == {"montgomery": 6, "shenzhen": 6, "shenzhen_without_mask": 1}
    frame, bad = parse_sources([{"layout": "montgomery", "root": root / "lungs/MontgomerySet"},
                                {"layout": "shenzhen", "root": root / "lungs/ChinaSet_AllFiles"}])
    assert len(frame) == 11 and len(bad) == 1
    assert bad["reason"][0].startswith("missing mask mask/CHNCXR_0012_")
    assert frame["patient"].nunique() == 11  # one image per patient, as in the releases
    mont = root / "lungs/MontgomerySet"
    name = sorted((mont / "CXR_png").glob("*.png"))[0].name
    image = np.asarray(Image.open(mont / "CXR_png" / name), float)
    left = np.asarray(Image.open(mont / "ManualMask/leftMask" / name)) > 0
    right = np.asarray(Image.open(mont / "ManualMask/rightMask" / name)) > 0
    assert set(np.unique(np.asarray(Image.open(mont / "ManualMask/leftMask" / name)))) == {0, 255}
    # the patient's left lung is on the image's right; the lungs (air) are darker than the body
    assert np.argwhere(left)[:, 1].mean() > 64 > np.argwhere(right)[:, 1].mean()
    lungs = left | right
    body = np.zeros_like(lungs)
    body[20:110, 20:108] = True
    assert image[lungs].mean() < image[body & ~lungs].mean() - 20
    # the NIH image it was made from is the same picture
    patient = int(name.split("_")[1])
    nih = next((root / "nih").glob(f"images_*/images/{patient:08d}_000.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(nih).convert("L")), image.astype(np.uint8))


def _settings(**overrides):
    s = section_defaults("segmentation")
    s.update(arch="resnet18", image_size=64, width=16, epochs=6, batch_size=4, lr=0.002, n_bootstrap=50)
    s.update(overrides)
    return s


@pytest.fixture(scope="module")
def vit_init(tmp_path_factory):
    path = tmp_path_factory.mktemp("gmml") / "backbone.pth"
    torch.manual_seed(1)
    torch.save(export_state_dict(build_backbone("vit_tiny_patch8", "random", image_size=32)), path)
    write_sidecar(path, get_spec("vit_tiny_patch8"), method="gmml", image_size=32, fingerprint="0" * 64)
    return path


def test_segmenter_on_a_resnet_and_on_a_vit_init(vit_init):
    model, arch = build_segmenter("resnet18", "random", 64, 16)
    assert arch == "resnet18" and model(torch.rand(2, 3, 64, 64)).shape == (2, 64, 64)
    model, arch = build_segmenter("resnet18", str(vit_init), 64, 16)  # the sidecar's arch wins
    assert arch == "vit_tiny_patch8"
    assert model(torch.rand(1, 3, 64, 96)).shape == (1, 64, 96)
    stored = torch.load(vit_init, weights_only=True)
    torch.testing.assert_close(model.levels.body.vit.pos_embed, stored["pos_embed"])  # 4 x 4 grid kept


def test_training_learns_the_demo_lungs_and_the_summary_compares_inits(demo, vit_init, tmp_path):
    root, _ = demo
    frame, _ = parse_sources([{"layout": "montgomery", "root": root / "lungs/MontgomerySet"},
                              {"layout": "shenzhen", "root": root / "lungs/ChinaSet_AllFiles"}])
    frame["split"] = split_patients(frame, 0.2, 0.3, seed=0)
    metrics = {}
    for name, init in (("random", "random"), ("gmml", str(vit_init))):
        out = tmp_path / name
        metrics[name] = train_segmentation(frame, out, init=init, init_name=name, settings=_settings(), seed=0)
        written = json.loads((out / "metrics.json").read_text())
        per_image = pd.read_csv(out / "per_image.csv")
        assert written["dice"] == pytest.approx(per_image["dice"].mean())
        assert len(per_image) == written["n_test"] == (frame["split"] == "test").sum()
        assert (out / "examples.png").stat().st_size > 1000
        assert len(pd.read_csv(out / "train_log.csv")) == 6
    assert metrics["random"]["arch"] == "resnet18" and metrics["gmml"]["arch"] == "vit_tiny_patch8"
    # better than calling every pixel lung (what an untrained net's first answers come to)
    test = frame[frame["split"] == "test"]
    everything = np.mean([dice_iou(np.ones_like(m), m)[0] for m in map(read_mask, test["masks"])])
    print({k: m["dice"] for k, m in metrics.items()}, everything)
    assert metrics["random"]["dice"] > max(0.7, everything + 0.15), metrics["random"]
    assert metrics["gmml"]["dice"] > everything + 0.1, metrics["gmml"]
    table = summarize([tmp_path / "random/metrics.json", tmp_path / "gmml/metrics.json"], tmp_path / "s.csv",
                      tmp_path / "s.md", tmp_path / "s.png")
    assert table["init"].tolist() == ["random", "gmml"]
    assert pd.read_csv(tmp_path / "s.csv")["dice"].tolist() == pytest.approx(table["dice"].tolist())
    assert "| gmml | vit_tiny_patch8 |" in (tmp_path / "s.md").read_text()
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_dag_runs_segmentation_for_each_init(tmp_path, tiny_config):
    config = dict(tiny_config)
    config["segmentation"] = dict(config["segmentation"], inits=["random", "random-vit_tiny_patch8"])
    write_config(tmp_path / "config.yaml", config)
    snakemake(tmp_path, "results/segmentation/summary.csv", "results/segmentation/dice_by_init.png")
    summary = pd.read_csv(tmp_path / "results/segmentation/summary.csv")
    assert summary["init"].tolist() == ["random", "random-vit_tiny_patch8"]
    assert summary["arch"].tolist() == ["resnet18", "vit_tiny_patch8"]
    assert summary["dice"].between(0, 1).all() and (summary["n_test"] > 0).all()
    quarantine = pd.read_csv(tmp_path / "results/segmentation/quarantine.csv")
    assert quarantine["reason"].str.startswith("missing mask").all() and len(quarantine) == 1
    split = pd.read_csv(tmp_path / "results/segmentation/split.csv")
    assert split.groupby("patient")["split"].nunique().max() == 1
    # a dry run of the full demo DAG schedules one segmentation run per init of the tiny config
    dry = snakemake(tmp_path, "-n", "--forceall", "results/segmentation/summary.csv")
    assert "segment" in dry.stdout + dry.stderr
