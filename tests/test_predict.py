"""cxrssl-predict: PNG and DICOM inputs -> submission CSV, COCO results and overlays, with boxes in
the ORIGINAL pixels of each file.

The coordinate tests use an oracle "detector" that boxes the bright square it sees in the model
input, so any error in the resize / rescale chain shows up as a box off the square drawn in the
original image. One test runs a real (untrained) checkpoint end to end through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch import nn

from cxrssl.classes import VINDR_CLASSES, coco_categories
from cxrssl.detection import predict
from cxrssl.detection.model import build_detector, build_meta
from cxrssl.errors import BadInputError
from payloads import check_payload_is_live, malicious_checkpoint

REPO = Path(__file__).resolve().parents[1]
LABEL = 5  # COCO id 5 = "Consolidation", class_id 4
INPUT_SIZE = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SquareOracle(nn.Module):
    """Boxes the bright square in each input image (model input pixels): the pixels above 0.6, when
    they fill their bounding box (scattered bright noise is no square: no box)."""

    def __init__(self):
        super().__init__()
        self.roi_heads = nn.Module()
        self.roi_heads.score_thresh = 0.001
        self.seen: list[tuple[int, int]] = []

    def forward(self, images):
        out = []
        for image in images:
            self.seen.append(tuple(image.shape[-2:]))
            ys, xs = torch.nonzero(image[0] > 0.6, as_tuple=True)
            area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1) if len(xs) else 0
            if len(xs) < 16 or len(xs) < 0.8 * area:
                out.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([LABEL])})
        return out


@pytest.fixture
def oracle(monkeypatch):
    model = SquareOracle()
    meta = {"engine": "torchvision", "arch": "resnet18", "init": "random", "res": 64, "input_size": INPUT_SIZE,
            "input_bit_depth": 8, "score_thr": 0.001, "settings": {}}
    monkeypatch.setattr(predict, "load_detector", lambda path, device, score_thr=None: (model, meta))
    return model


def xray(height: int, width: int, square: tuple[int, int, int, int] | None, seed: int, top: int = 255) -> np.ndarray:
    """Dark noisy image with a bright square (x0, y0, x1, y1) in original pixels."""
    rng = np.random.default_rng(seed)
    img = rng.uniform(0.1, 0.3, (height, width))
    if square:
        x0, y0, x1, y1 = square
        img[y0:y1, x0:x1] = 0.95
    return np.round(img * top)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A minimal uncompressed 12-bit radiograph without window tags (VOI = identity)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def boxes_of(submission: pd.DataFrame, image_id: str) -> list[list[float]]:
    parts = submission.set_index("image_id").loc[image_id, "PredictionString"].split()
    assert len(parts) % 6 == 0
    return [[float(v) for v in parts[i:i + 6]] for i in range(0, len(parts), 6)]


def test_png_and_dicom_boxes_come_back_in_original_pixels(oracle, tmp_path):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    cases = {  # image id -> (original height, width, square)
        "wide8": (300, 420, (100, 60, 180, 140)),
        "tall16": (500, 260, (30, 300, 130, 420)),
        "dicom2": (360, 300, (200, 40, 260, 120)),
        "dicom1": (256, 320, (20, 20, 90, 70)),
    }
    cv2.imwrite(str(inputs / "wide8.png"), xray(*cases["wide8"], seed=1).astype(np.uint8))
    cv2.imwrite(str(inputs / "nested" / "tall16.png"), xray(*cases["tall16"], seed=2, top=65535).astype(np.uint16))
    write_dicom(inputs / "dicom2.dicom", xray(*cases["dicom2"], seed=3, top=4095))
    # MONOCHROME1 stores dense tissue dark: the reader must invert it before the detector sees it
    write_dicom(inputs / "nested" / "dicom1.dcm", 4095 - xray(*cases["dicom1"], seed=4, top=4095), "MONOCHROME1")
    cv2.imwrite(str(inputs / "empty.png"), xray(200, 200, None, seed=5).astype(np.uint8))

    out = tmp_path / "out"
    submission = predict.predict_files("unused.pth", [inputs], out, overlay_max_size=256)

    assert all(max(shape) == INPUT_SIZE for shape in oracle.seen)  # fed at the training input size
    assert sorted(submission["image_id"]) == sorted([*cases, "empty"])
    assert (out / "submission.csv").read_text().splitlines()[0] == "image_id,PredictionString"
    for image_id, (height, width, square) in cases.items():
        [[class_id, score, *box], no_finding] = boxes_of(submission, image_id)
        assert class_id == LABEL - 1 and score == pytest.approx(0.9)
        tolerance = max(height, width) / INPUT_SIZE + 1  # one input pixel, plus rounding
        assert box == pytest.approx(list(square), abs=tolerance), image_id
        assert no_finding == [14, pytest.approx(0.1), 0, 0, 1, 1]  # p = 1 - best box score, on every image
    assert submission.set_index("image_id").loc["empty", "PredictionString"] == "14 1.0000 0 0 1 1"

    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == len(cases)
    by_name = {r["image_name"]: r for r in results}
    for image_id, (height, width, square) in cases.items():
        x, y, w, h = by_name[image_id]["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx(list(square), abs=max(height, width) / INPUT_SIZE + 1)
        assert by_name[image_id]["category_id"] == LABEL

    overlays = sorted(p.stem for p in (out / "overlays").glob("*.png"))
    assert overlays == sorted([*cases, "empty"])
    drawn = cv2.imread(str(out / "overlays" / "wide8.png"))
    assert max(drawn.shape[:2]) <= 256
    assert (np.abs(drawn[..., 0].astype(int) - drawn[..., 2].astype(int)) > 40).any()  # coloured box
    plain = cv2.imread(str(out / "overlays" / "empty.png"))
    assert (plain[..., 0] == plain[..., 2]).all()  # no box, no colour
    assert pd.read_csv(out / "quarantine.csv").empty


def test_unreadable_input_is_quarantined_or_stops(oracle, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "ok.png"), xray(100, 100, (10, 10, 40, 40), seed=0).astype(np.uint8))
    (inputs / "broken.dicom").write_bytes(b"not a dicom at all")
    with pytest.raises(BadInputError, match="broken.dicom"):
        predict.predict_files("unused.pth", [inputs], tmp_path / "fail")
    submission = predict.predict_files("unused.pth", [inputs], tmp_path / "skip", on_bad_input="skip")
    assert submission["image_id"].tolist() == ["ok"]
    quarantined = pd.read_csv(tmp_path / "skip" / "quarantine.csv")
    assert len(quarantined) == 1 and quarantined["item"].iloc[0].endswith("broken.dicom")


def test_duplicate_image_ids_and_missing_inputs_are_errors(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "same.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="same"):
        predict.collect_inputs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict.collect_inputs([tmp_path / "nowhere"])


def test_prediction_string_uses_zero_based_classes():
    text = predict.prediction_string(np.array([1, 14]), np.array([0.5, 0.25]),
                                     np.array([[1.2, 2.6, 30.0, 40.4], [0, 0, 5, 5]]))
    assert text == "0 0.5000 1 3 30 40 13 0.2500 0 0 5 5 14 0.5000 0 0 1 1"
    assert predict.prediction_string(np.zeros(0), np.zeros(0), np.zeros((0, 4))) == "14 1.0000 0 0 1 1"


def test_cli_with_a_real_checkpoint(tmp_path):
    """End to end through main(): a real checkpoint (untrained, so score_thr 0 to get boxes)."""
    torch.manual_seed(0)
    model = build_detector("resnet18", "random", res=64, rpn_proposals=50)
    meta = build_meta("resnet18", "random", 15, 64, 1, True, "batchnorm", 0.001, 50, 512)
    meta.update(input_size=96, input_bit_depth=8)
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 0, "val_mAP50": 0.0}, tmp_path / "best.pth")
    image = tmp_path / "case.png"
    cv2.imwrite(str(image), xray(300, 200, (50, 50, 120, 150), seed=0).astype(np.uint8))
    write_dicom(tmp_path / "case2.dcm", xray(180, 240, (50, 50, 120, 150), seed=1, top=4095))
    assert predict.main([str(image), str(tmp_path / "case2.dcm"), "--checkpoint", str(tmp_path / "best.pth"),
                         "--out-dir", str(tmp_path / "out"), "--score-thr", "0", "--device", "cpu",
                         "--batch-size", "2"]) == 0
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert submission["image_id"].tolist() == ["case", "case2"]
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert 0 < len(results) <= 200
    sizes = {"case": (200, 300), "case2": (240, 180)}
    for r in results:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_name"]]
        assert 0 <= x and 0 <= y and x + w <= width + 0.01 and y + h <= height + 0.01
        assert 1 <= r["category_id"] <= len(VINDR_CLASSES)
    for image_id, width, height in (("case", 200, 300), ("case2", 240, 180)):
        *entries, no_finding = boxes_of(submission, image_id)
        for class_id, _, x0, y0, x1, y1 in entries:
            assert 0 <= class_id <= 13 and 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        best = max(r["score"] for r in results if r["image_name"] == image_id)
        assert no_finding == [14, pytest.approx(1 - best, abs=1e-4), 0, 0, 1, 1]
    # the COCO results load against a ground truth with the same image ids and original sizes
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 200, "height": 300}, {"id": 2, "width": 240, "height": 180}],
                    "annotations": [], "categories": coco_categories()}
    coco.createIndex()
    assert len(coco.loadRes(results).getAnnIds()) == len(results)


def test_malicious_checkpoint_is_refused(tmp_path):
    check_payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "best.pth", marker)
    image = tmp_path / "case.png"
    cv2.imwrite(str(image), xray(64, 64, (10, 10, 30, 30), seed=0).astype(np.uint8))
    with pytest.raises(BadInputError, match="best.pth.*refused"):
        predict.main([str(image), "--checkpoint", str(evil), "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert not marker.exists() and not (tmp_path / "out" / "submission.csv").exists()


def test_predict_script_help():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--checkpoint", "--out-dir", "--score-thr", "--overlay-score-thr", "--on-bad-input"):
        assert flag in out
