"""Export and sharing (issue 14): TorchScript/ONNX detectors with parity checks, plain encoder state
dicts, model cards, and ``torch.hub.load`` from the checkout (``hubconf.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cxrssl.config import section_defaults
from cxrssl.demo.vindr import render_vindr
from cxrssl.detection.engines import make_meta
from cxrssl.detection.model import build_detector, build_meta
from cxrssl.detection.predict import prepare
from cxrssl.export import PARITY_TOLERANCE, compare, export, run_onnx
from cxrssl.io import atomic_write_json
from cxrssl.models.backbones import build_backbone, export_state_dict, get_spec, write_sidecar

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = 96


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def tiny_detector_checkpoint(path: Path, seed: int = 0) -> Path:
    """A torchvision-engine best.pth (resnet18, 64 px) with weights made here; the classifier is
    spread out so that scores and labels differ between boxes (an untrained head scores all alike)."""
    torch.manual_seed(seed)
    settings = dict(section_defaults("detection"), arch="resnet18", rpn_proposals=50, score_thr=0.05)
    model = build_detector("resnet18", "random", res=64, rpn_proposals=50, score_thr=0.05)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0, 1.0)
    arch = build_meta("resnet18", "random", 15, 64, 1, True, "batchnorm", 0.05, 50, 512)
    meta = make_meta("torchvision", arch="resnet18", init="random", init_name="random", res=64, seed=seed,
                     settings=settings, input_size=INPUT_SIZE, input_bit_depth=8, epoch=1, val_mAP50=0.25,
                     **{k: v for k, v in arch.items() if k not in ("arch", "init", "res", "num_classes", "classes")})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


def demo_pngs(folder: Path, n: int = 3) -> list[Path]:
    """Demo-like X-rays (the demo's own renderer) of several aspect ratios, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate([(300, 240), (256, 256), (200, 320)][:n]):
        grey, _ = render_vindr(h, w, ["Cardiomegaly", "Nodule/Mass"], np.random.default_rng(100 + i))
        path = folder / f"demo{i}.png"
        cv2.imwrite(str(path), np.round(grey * 255).astype(np.uint8))
        paths.append(path)
    return paths


def test_detector_exports_to_torchscript_and_onnx_with_parity(tmp_path):
    """The ONNX model under onnxruntime and the TorchScript model give PyTorch's boxes, scores and
    labels on demo images prepared as cxrssl-predict prepares them (tolerance: PARITY_TOLERANCE,
    boxes 0.01 px, scores 1e-4; measured on CPU: ONNX at most 7e-5 px and 5e-7, TorchScript identical)."""
    from cxrssl.detection.engines import load_detector

    run = tmp_path / "results/detection/torchvision/random_64px_seed0"
    checkpoint = tiny_detector_checkpoint(run / "best.pth")
    atomic_write_json({"mAP50": 0.31, "mAP50_ci": [0.2, 0.4], "per_class_AP50": {}},
                      tmp_path / "results/evaluation/torchvision/random_64px_seed0/metrics.json")
    out = tmp_path / "export"
    card = export(checkpoint, out)

    assert {p.name for p in out.iterdir()} == {"detector.onnx", "detector.torchscript.pt", "model_card.json",
                                              "model_card.md"}
    model, _ = load_detector(checkpoint)
    scripted = torch.jit.load(str(out / "detector.torchscript.pt"))
    import onnx

    graph = onnx.load(str(out / "detector.onnx"))
    onnx.checker.check_model(graph)
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    n_boxes = 0
    for path in demo_pngs(tmp_path / "images"):
        image = prepare(path, INPUT_SIZE, 8).tensor
        with torch.no_grad():
            reference = {k: v.numpy() for k, v in model([image])[0].items()}
            script_out = {k: v.numpy() for k, v in scripted([image])[0].items()}
        onnx_out = run_onnx(out / "detector.onnx", image)
        assert reference["boxes"].shape[0] > 5, "the test detector should find boxes on the demo images"
        assert len(set(reference["labels"].tolist())) > 1
        n_boxes += len(reference["scores"])
        for name, got in (("onnx", onnx_out), ("torchscript", script_out)):
            diff = compare(reference, got)
            assert diff["labels_equal"], (name, path.name, diff)
            assert diff["matched"] >= len(reference["scores"]) - 2, (name, diff)
            assert diff["boxes_px"] <= PARITY_TOLERANCE["boxes_px"], (name, diff)
            assert diff["scores"] <= PARITY_TOLERANCE["scores"], (name, diff)
    assert n_boxes > 20

    # the card: data, fingerprint, metrics of the run, code version, files with their digests
    saved = json.loads((out / "model_card.json").read_text())
    assert saved == json.loads(json.dumps(card)) | {"format": "cxrssl-model-card-1"}
    assert saved["kind"] == "detector" and saved["arch"] == "resnet18" and saved["input"]["longest_side"] == 96
    assert saved["metrics"] == {"mAP50": 0.31, "mAP50_ci": [0.2, 0.4]}
    assert len(saved["config_fingerprint"]) == 64
    assert saved["code_version"]["cxrssl"] and saved["code_version"]["git"]
    assert set(saved["files"]) == {"detector.onnx", "detector.torchscript.pt"}
    assert saved["parity"]["onnx"]["boxes_px"] <= PARITY_TOLERANCE["boxes_px"]
    md = (out / "model_card.md").read_text()
    assert "mAP50" in md and saved["config_fingerprint"] in md and "detector.onnx" in md


def test_compare_flags_a_moved_box_and_a_wrong_label():
    ref = {"boxes": np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32), "scores": np.array([0.9, 0.5]),
           "labels": np.array([1, 2])}
    assert compare(ref, ref)["labels_equal"] and compare(ref, ref)["boxes_px"] == 0
    moved = dict(ref, boxes=ref["boxes"] + np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    assert compare(ref, moved)["boxes_px"] == pytest.approx(1.0)
    # the lowest-scoring box may differ (top-k cut-off of two runtimes), any other may not
    assert compare(ref, dict(ref, boxes=ref["boxes"][:1], scores=ref["scores"][:1], labels=ref["labels"][:1]))[
        "labels_equal"]
    assert not compare(ref, dict(ref, boxes=ref["boxes"][1:], scores=ref["scores"][1:], labels=ref["labels"][1:]))[
        "labels_equal"]
    relabelled = dict(ref, labels=np.array([3, 2]))
    assert not compare(ref, relabelled)["labels_equal"]


def make_backbone(results: Path, method: str, arch: str, image_size: int = 32) -> Path:
    """A pretraining run folder as the pipeline writes it: backbone.pth + backbone.json (weights made here)."""
    torch.manual_seed(0)
    encoder = build_backbone(arch, "random", image_size=image_size)
    path = results / "pretrain" / method / "backbone.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_state_dict(encoder), path)
    write_sidecar(path, get_spec(arch), method=method, image_size=image_size, fingerprint="f" * 64)
    return path


@pytest.mark.parametrize("method,arch", [("barlowtwins", "resnet18"), ("gmml", "vit_tiny_patch8")])
def test_encoder_export_loads_into_the_library_model_unchanged(tmp_path, method, arch):
    import timm
    import torchvision

    results = tmp_path / "results"
    backbone = make_backbone(results, method, arch)
    atomic_write_json({"linear_eval": {method: {"frac1": {"test_mean_auc": 0.7}}}}, results / "metrics.json")
    card = export(backbone, tmp_path / "export")
    weights = tmp_path / "export" / f"{method}_{arch}.pth"
    state = torch.load(weights, weights_only=True)
    meta = json.loads((tmp_path / "export" / f"{method}_{arch}.json").read_text())
    if meta["library"] == "torchvision":
        model = getattr(torchvision.models, meta["model_name"])()
    else:
        model = timm.create_model(meta["model_name"], **meta["model_kwargs"])
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(("fc.", "head.")) for k in result.missing_keys)
    source = torch.load(backbone, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())
    assert card["metrics"] == {"linear_eval": {"frac1": {"test_mean_auc": 0.7}}}
    assert card["config_fingerprint"] == "f" * 64 and card["kind"] == "encoder"
    assert (tmp_path / "export" / "model_card.md").read_text().startswith(f"# Model card: {method}_{arch}")


def test_torch_hub_loads_every_entry_from_the_checkout(tmp_path):
    """``torch.hub.load(<checkout>, "<method>_<arch>", source="local", weights=...)`` for encoders
    and ``"detector"`` for a detection checkpoint; the list names every method x supported arch."""
    from cxrssl.models.backbones import BACKBONES
    from cxrssl.ssl.registry import methods

    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)  # what torch.hub does with a local repo (torch.hub.list reads GitHub only)
    entries = {name for name in dir(hub) if callable(getattr(hub, name)) and not name.startswith("_")}
    assert {"torch", "torchvision", "timm"} == set(hub.dependencies)
    expected = {f"{name}_{arch}" for name, cls in methods().items() for arch, spec in BACKBONES.items()
                if spec.family in cls.families}
    assert expected <= entries and "detector" in entries
    assert "gmml_resnet50" not in entries  # GMML trains ViTs only

    backbone = make_backbone(tmp_path / "results", "vicreg", "resnet18")
    encoder = torch.hub.load(str(REPO), "vicreg_resnet18", source="local", weights=str(backbone))
    source = torch.load(backbone, weights_only=True)
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in source.items())
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    vit = torch.hub.load(str(REPO), "gmml_vit_tiny_patch8", source="local",
                         weights=str(make_backbone(tmp_path / "r2", "gmml", "vit_tiny_patch8")))
    assert vit(torch.rand(1, 3, 32, 32)).shape == (1, 192)
    with pytest.raises(ValueError, match="resnet50"):  # a checkpoint of another arch is refused
        torch.hub.load(str(REPO), "vicreg_resnet50", source="local", weights=str(backbone))
    untrained = torch.hub.load(str(REPO), "barlowtwins_resnet18", source="local")
    assert untrained(torch.rand(1, 3, 32, 32)).shape == (1, 512)

    checkpoint = tiny_detector_checkpoint(tmp_path / "det/best.pth")
    detector = torch.hub.load(str(REPO), "detector", source="local", weights=str(checkpoint))
    assert not detector.training
    out = detector([torch.rand(3, 96, 80)])[0]
    assert set(out) == {"boxes", "labels", "scores"}
