"""Heatmaps on a tiny Faster R-CNN + FPN (random weights): shape and range of the maps, the fast
Ablation-CAM against the grad-cam library's own recipe, the padding correction on non-square images,
the localisation scorer, image selection, per-run PNGs, localisation files, the panel and refusal of
malicious checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cxrssl.cam import FastAblationCAM, FPNReshape, compute_cam, make_panel, render_run, select_images, top_channels
from cxrssl.cam.heatmaps import explained_predictions, library_ablation_cam, scored_images
from cxrssl.classes import coco_categories
from cxrssl.errors import BadInputError
from cxrssl.evaluation.localization import box_mask, score_heatmap, summarize_scores
from payloads import check_payload_is_live, malicious_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


def tiny_detector(seed: int = 0) -> FasterRCNN:
    """Faster R-CNN + FPN as torchvision builds it (256-channel levels "0".."3","pool", which the
    library's AblationLayerFasterRCNN assumes), with light heads so that a thousand ablated copies
    run in seconds on a CPU."""
    torch.manual_seed(seed)
    backbone = BackboneWithFPN(resnet18(weights=None), {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               [64, 128, 256, 512], 256, extra_blocks=LastLevelMaxPool())
    return FasterRCNN(backbone, num_classes=None, min_size=SIZE, max_size=SIZE,
                      rpn_head=RPNHead(256, 3, conv_depth=0), rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                      box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=2, sampling_ratio=1),
                      box_head=TwoMLPHead(256 * 4, 32), box_predictor=FastRCNNPredictor(32, 15),
                      box_detections_per_img=20).eval()


def blob_image(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grey = 0.3 + 0.5 * torch.exp(-((xx - width * 0.3) ** 2 + (yy - height * 0.55) ** 2) / (0.02 * height * width))
    return grey.float().unsqueeze(0).expand(3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def model():
    return tiny_detector()


def test_map_shape_range_and_channels(model):
    image = blob_image(48, SIZE)  # not square: the map follows the input's shape
    result = compute_cam(model, image, ratio=0.1, batch_size=64, score_thr=0.5, top_k=3, min_grid=8)
    assert result.cam.shape == (48, SIZE)
    assert result.cam.dtype == np.float32
    assert 0.0 <= result.cam.min() and result.cam.max() <= 1.0 and result.cam.max() > 0.5
    assert result.method == "ablation" and result.n_channels_ablated == 128  # 10 % of 5 x 256
    assert 1 <= len(result.boxes) <= 3  # random weights: nothing reaches 0.5, the top 3 are explained
    eigen = compute_cam(model, image, method="eigen", min_grid=8)
    assert eigen.cam.shape == (48, SIZE) and eigen.method == "eigen" and eigen.n_channels_ablated == 0


# the library's channel scoring divides by the maximum of dead (all-zero) channels
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_fast_path_reproduces_library_mechanics(model):
    """Given the channels the library picks, the fast path gives the library's map exactly."""
    from pytorch_grad_cam.ablation_layer import AblationLayer

    from cxrssl.cam.ablation import FPNAblationLayer

    class LibraryChoice(FPNAblationLayer):
        activations_to_be_ablated = AblationLayer.activations_to_be_ablated

    image = blob_image()
    first = compute_cam(model, image, ratio=0.1)
    # 2 x 64 channels, on an 8x8 grid (at 64 px the library's own grid, the "pool" level, is 1x1)
    reference = library_ablation_cam(model, image, first.boxes, first.labels, ratio=0.05,
                                     reshape_transform=FPNReshape(8))
    assert np.ptp(reference) > 0.5
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    cam = FastAblationCAM(model, [model.backbone], reshape_transform=FPNReshape(8), ablation_layer=LibraryChoice(),
                          batch_size=50, ratio_channels_to_ablate=0.05)
    try:
        with torch.inference_mode():
            ours = cam(image.unsqueeze(0), targets=[FasterRCNNBoxScoreTarget(list(first.labels), first.boxes)])[0]
    finally:
        cam.release()
    assert cam.n_channels_ablated == 128
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # the model is left as it was: its backbone is back in place, no hooks remain
    assert type(model.backbone).__name__ == "BackboneWithFPN"
    assert not model.backbone._forward_hooks


def test_fast_path_agrees_with_library_default(model):
    """Top 25 % of the channels vs the library's full ablation (ratio 1.0) on the same grid."""
    image = blob_image()
    fast = compute_cam(model, image, ratio=0.25, batch_size=128, min_grid=8)
    reference = library_ablation_cam(model, image, fast.boxes, fast.labels, batch_size=128,
                                     reshape_transform=FPNReshape(8))
    correlation = np.corrcoef(fast.cam.ravel(), reference.ravel())[0, 1]
    assert correlation > 0.9, correlation


def test_top_channels_and_prediction_choice():
    acts = np.zeros((10, 2, 2), dtype=np.float32)
    acts[[3, 7, 1]] = np.array([5.0, 4.0, 3.0])[:, None, None]
    assert top_channels(acts, 0.2).tolist() == [3, 7]
    assert top_channels(acts, 1.0).tolist() == list(range(10))
    assert len(top_channels(acts, 0.01)) == 1
    output = {"boxes": torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 3, 3]], dtype=torch.float32),
              "labels": torch.tensor([1, 2, 3]), "scores": torch.tensor([0.2, 0.9, 0.6])}
    boxes, labels, scores = explained_predictions(output, 0.5, 1)
    assert labels.tolist() == [2, 3] and scores.tolist() == pytest.approx([0.9, 0.6])
    _, labels, _ = explained_predictions(output, 0.95, 2)
    assert labels.tolist() == [2, 3]  # none reaches 0.95: the top 2


def _coco_fixture(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for n, (vindr_id, n_boxes) in enumerate([("c", 1), ("a", 2), ("b", 2), ("d", 0)], start=1):
        cv2.imwrite(str(folder / f"{vindr_id}.png"), rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8))
        images.append({"id": n, "file_name": f"{vindr_id}.png", "width": SIZE, "height": SIZE, "vindr_id": vindr_id})
        for k in range(n_boxes):
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": 4 + k, "bbox": [5, 8, 30, 20],
                         "area": 600, "iscrowd": 0})
    path = folder / "coco_test.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": coco_categories()}))
    return path


class BrightnessFPN(torch.nn.Module):
    """A stand-in FPN whose every level is the (normalised, padded) input's bright part pooled to the
    level's stride: the CAM of such features must sit where the bright square is."""

    def forward(self, x):
        bright = torch.relu(x.mean(1, keepdim=True))
        levels = {}
        for name, stride in (("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)):
            pooled = torch.nn.functional.avg_pool2d(bright, stride, ceil_mode=True)
            levels[name] = pooled * torch.linspace(1.0, 2.0, 256).view(1, -1, 1, 1)
        return levels


def _row_centroid(cam: np.ndarray) -> float:
    rows = cam.sum(axis=1)
    return float((rows * (np.arange(len(rows)) + 0.5)).sum() / rows.sum())


def test_heatmap_of_a_non_square_image_sits_on_the_lesion():
    """The detector pads 40x96 -> 26x64 resized to 32x64: its feature grid covers 32 rows of which the
    image fills 26. Stretching the grid over the image (grad-cam's way) moves the map up by ~5 px."""
    from cxrssl.detection.model import build_detector

    torch.manual_seed(0)
    model = build_detector("resnet18", "random", res=SIZE, score_thr=0.0, rpn_proposals=20).eval()
    model.backbone = BrightnessFPN()
    image = torch.full((3, 40, 96), 0.2)
    image[:, 24:34, 40:52] = 0.95  # the "lesion": rows 24..34, centre 29
    assert model.input_geometry(40, 96) == (26, 64, 32, 64)
    result = compute_cam(model, image, method="eigen", min_grid=8)
    assert result.cam.shape == (40, 96)
    assert abs(_row_centroid(result.cam) - 29.0) < 1.5
    mask = box_mask((40, 96), [(40, 24, 52, 34)])
    assert score_heatmap(result.cam, [(40, 24, 52, 34)])["pointing_game"] == 1.0
    assert result.cam[mask].mean() > 4 * result.cam[~mask].mean()
    # without the correction (no geometry: the library's stretching) the map is off by several pixels
    from cxrssl.cam.ablation import PaddedEigenCAM

    cam = PaddedEigenCAM(model, [model.backbone], reshape_transform=FPNReshape(8))
    try:
        stretched = cam(image.unsqueeze(0), targets=[lambda output: 0.0])[0]  # EigenCAM needs no target
    finally:
        cam.activations_and_grads.release()
    assert _row_centroid(stretched) < 29.0 - 3.0


def test_localization_scores_hand_computed():
    heat = np.full((10, 10), 0.25)
    heat[2:6, 2:6] = 1.0  # 16 pixels of 1 inside the box, 84 of 0.25 outside
    heat[8, 8] = 0.5
    box = [(2, 2, 6, 6)]
    scores = score_heatmap(heat, box, threshold=0.5)
    assert scores["energy_in_box"] == pytest.approx(16 / (16 + 83 * 0.25 + 0.5))
    assert scores["pointing_game"] == 1.0
    # thresholded at 0.5: the box and the lone pixel (0.5 >= 0.5)
    assert scores["iou"] == pytest.approx(16 / 17) and scores["dice"] == pytest.approx(32 / 33)
    inside, outside = heat[2:6, 2:6].ravel(), np.delete(heat.ravel(), [r * 10 + c for r in range(2, 6) for c in range(2, 6)])
    assert scores["cnr"] == pytest.approx(abs(inside.mean() - outside.mean()) / np.sqrt(inside.var() + outside.var()))
    # pixels whose centre is inside: columns 0..2 (centres 0.5, 1.5, 2.5), row 1 only (0.5 < 0.6, 2.5 > 2.4)
    assert box_mask((4, 4), [(0.4, 0.6, 2.6, 2.4)]).tolist()[1] == [True, True, True, False]
    assert box_mask((4, 4), [(0.4, 0.6, 2.6, 2.4)]).sum() == 3
    off = np.zeros((10, 10))
    off[8, 2] = 1.0  # the maximum 2 px below the box
    assert score_heatmap(off, box)["pointing_game"] == 0.0
    assert score_heatmap(off, box, tolerance=3)["pointing_game"] == 1.0
    assert score_heatmap(off, [(0, 0, 10, 10)])["energy_in_box"] == 1.0
    assert score_heatmap(heat, []) is None  # an image without boxes is not scored
    flat = score_heatmap(np.ones((10, 10)), box)
    assert flat["energy_in_box"] == pytest.approx(0.16) and np.isnan(flat["cnr"])  # a flat map: the box's area


def test_localization_summary_bootstraps_images():
    rng = np.random.default_rng(0)
    rows = [{"energy_in_box": float(v), "pointing_game": float(v > 0.5), "iou": None, "dice": 0.5, "cnr": 1.0}
            for v in rng.uniform(size=30)]
    summary = summarize_scores(rows, n_resamples=300, seed=1)
    energy = summary["energy_in_box"]
    assert energy["mean"] == pytest.approx(np.mean([r["energy_in_box"] for r in rows])) and energy["n"] == 30
    assert energy["ci"][0] < energy["mean"] < energy["ci"][1]
    assert summary["iou"] == {"mean": None, "ci": [None, None], "n": 0}
    assert summarize_scores(rows, 300, 1) == summary and summarize_scores(rows, 300, 2) != summary
    assert summarize_scores(rows[:1], 300, 1)["energy_in_box"]["ci"] == [None, None]


def test_select_images(tmp_path):
    coco = json.loads(_coco_fixture(tmp_path).read_text())
    assert [im["vindr_id"] for im in select_images(coco, 3)] == ["a", "b", "c"]  # most boxes, then id
    assert [im["vindr_id"] for im in select_images(coco, 2, ["d", "c"])] == ["d", "c"]
    with pytest.raises(ValueError, match="only 4 images"):
        select_images(coco, 5)
    with pytest.raises(ValueError, match=r"\['zz'\]"):
        select_images(coco, 1, ["zz"])
    drawn = select_images(coco, 1)
    assert [im["vindr_id"] for im in scored_images(coco, drawn, 0)] == ["a"]
    assert [im["vindr_id"] for im in scored_images(coco, drawn, 9)] == ["a", "b", "c"]  # "d" has no box


def _checkpoint(path: Path) -> Path:
    """A checkpoint in the detection stage's format (build args in ``meta``)."""
    from cxrssl.detection.model import build_detector, build_meta

    torch.manual_seed(0)
    model = build_detector("resnet18", "random", res=SIZE, score_thr=0.05)
    meta = build_meta("resnet18", "random", 15, SIZE, 1, True, "batchnorm", 0.05)
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


def test_render_run_and_panel(tmp_path):
    coco = _coco_fixture(tmp_path / "data")
    ckpt = _checkpoint(tmp_path / "best.pth")
    settings = {"method": "eigen", "n_images": 2, "images": [], "target_layer": "backbone",
                "ratio_channels_to_ablate": 0.1, "batch_size": 8, "score_thr": 0.5, "top_k": 2, "device": "cpu",
                "min_grid": 4, "n_scored": 3, "loc_threshold": 0.5, "loc_bootstrap": 50}
    columns = []
    for init in ("random", "barlowtwins"):
        out = tmp_path / init
        manifest = render_run("torchvision", ckpt, coco, out, settings, label=init)
        assert [e["key"] for e in manifest["images"]] == ["a", "b"]
        assert (out / "heatmap_00.png").stat().st_size > 1000 and (out / "heatmap_01.png").is_file()
        assert json.loads((out / "heatmaps.json").read_text())["images"][0]["method"] == "eigen"
        assert not (out / "heatmap_02.png").exists()  # the third image is scored, not drawn
        loc = json.loads((out / "localization.json").read_text())
        assert loc["n_images"] == 3 and [r["key"] for r in loc["images"]] == ["a", "b", "c"]
        assert [r["drawn"] for r in loc["images"]] == [True, True, False]
        assert 0 <= loc["summary"]["energy_in_box"]["mean"] <= 1 and loc["summary"]["pointing_game"]["n"] == 3
        columns.append((init, out / "heatmaps.json"))
    panel = tmp_path / "panel.png"
    make_panel(columns, panel, title="torchvision 64 px")
    grid = cv2.imread(str(panel))
    assert grid is not None and grid.shape[1] > grid.shape[0] * 0.8  # 2 rows x 2 columns

    # the script runs standalone (and builds the same panel)
    script = REPO / "scripts" / "heatmaps.py"
    assert "--ratio-channels-to-ablate" in subprocess.run([sys.executable, str(script), "run", "--help"],
                                                          capture_output=True, text=True, check=True).stdout
    proc = subprocess.run([sys.executable, str(script), "panel", "--column", "random", str(columns[0][1]),
                           "--column", "barlowtwins", str(columns[1][1]), "--out", str(tmp_path / "p2.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p2.png").is_file()


def test_malicious_checkpoint_is_refused(tmp_path):
    check_payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "best.pth", marker)
    settings = {"method": "eigen", "n_images": 1, "images": [], "target_layer": "backbone",
                "ratio_channels_to_ablate": 0.1, "batch_size": 8, "score_thr": 0.5, "top_k": 2, "device": "cpu",
                "min_grid": 4}
    with pytest.raises(BadInputError, match="best.pth.*refused"):
        render_run("torchvision", evil, _coco_fixture(tmp_path / "data"), tmp_path / "out", settings)
    assert not marker.exists()


def test_panel_rejects_different_images(tmp_path):
    for name, keys in (("x", ["a"]), ("y", ["b"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "heatmaps.json").write_text(json.dumps({"images": [{"key": k, "png": "h.png"} for k in keys]}))
    with pytest.raises(ValueError, match="different images"):
        make_panel([("x", tmp_path / "x" / "heatmaps.json"), ("y", tmp_path / "y" / "heatmaps.json")],
                   tmp_path / "p.png")
