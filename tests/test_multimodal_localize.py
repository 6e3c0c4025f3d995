"""Localisation scores on hand-checked maps, threshold choice, baselines, bootstrap, box files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrssl.errors import BadInputError, Quarantine
from cxrssl.multimodal.localize import (RSNA_FINDING, bootstrap_ci, box_mask, centre_map, choose_threshold,
                                        evaluate_maps, localisation_items, random_map, read_ms_cxr,
                                        read_nih_boxes, read_rsna_labels, score_map, split_images)


def test_box_mask_counts_pixels_whose_centre_is_inside():
    m = box_mask([[2, 2, 4, 4]], (10, 10))
    assert m.sum() == 16 and m[2:6, 2:6].all()
    # x 1.6..3.4 covers centres 2.5 only... and 1.5? no (1.5 < 1.6); y 0..2 covers 0.5, 1.5
    m = box_mask([[1.6, 0.0, 1.8, 2.0]], (5, 5))
    assert np.argwhere(m).tolist() == [[0, 2], [1, 2]]
    assert box_mask([[3, 3, 4, 4], [0, 0, 1, 1]], (5, 5)).sum() == 4 + 1  # union, clipped at the edge


def test_scores_of_a_hand_checked_map():
    # 10 x 10 map, box rows/cols 2..5 (16 px). Inside: 1.0 except (2, 2) = 0.5. Outside: 0 except
    # (0, 0) = 0.2 and (9, 9) = 0.6. Scaled (min 0, max 1): the same values.
    m = np.zeros((10, 10))
    m[2:6, 2:6] = 1.0
    m[2, 2], m[0, 0], m[9, 9] = 0.5, 0.2, 0.6
    box = [[2, 2, 4, 4]]
    s = score_map(m, box, threshold=0.55)
    # predicted: 15 inside pixels + (9, 9) = 16; intersection 15; union 16 + 16 - 15 = 17
    assert s["iou"] == pytest.approx(15 / 17) and s["dice"] == pytest.approx(2 * 15 / 32)
    assert s["pointing_game"] == 1.0  # the maxima (2, 3).. are inside
    assert s["energy_in_box"] == pytest.approx(15.5 / 16.3)  # mass 15 + 0.5 inside, 0.2 + 0.6 outside
    inside = np.array([1.0] * 15 + [0.5])
    outside = np.array([0.0] * 82 + [0.2, 0.6])
    cnr = abs(inside.mean() - outside.mean()) / np.sqrt(inside.var() + outside.var())
    assert s["cnr"] == pytest.approx(cnr)
    s = score_map(m, box, threshold=0.45)  # now (2, 2) joins: 16 inside + (9, 9)
    assert s["iou"] == pytest.approx(16 / 17) and s["dice"] == pytest.approx(32 / 33)
    m[9, 9] = 2.0  # the maximum moves outside the box
    assert score_map(m, box, 0.5)["pointing_game"] == 0.0


def test_pointing_on_a_plateau_hits_with_any_maximal_pixel():
    # a corner cell of a 2 x 2 grid upsampled bilinearly: its value fills the corner quadrant
    # [0..2] x [0..2]; a box on any pixel of that plateau holds a maximum (the CAM scorer's rule)
    from cxrssl.multimodal.image import region_map

    m = region_map(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), (2, 2), (8, 8))[0].numpy()
    assert np.isclose(m[:2, :2], 1).all() and m[2, 2] < 1
    assert score_map(m, [[1, 1, 1, 1]], 0.5)["pointing_game"] == 1.0
    assert score_map(m, [[0, 0, 1, 1]], 0.5)["pointing_game"] == 1.0
    assert score_map(m, [[3, 3, 5, 5]], 0.5)["pointing_game"] == 0.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_similarity_maps_and_cams_share_one_scorer(seed, t):
    # a similarity map (cosine, signed, [x, y, w, h] boxes) scores as the CAM scorer scores the
    # min-max scaled map with the same boxes as [x0, y0, x1, y1]
    from cxrssl.evaluation.localization import score_heatmap
    from cxrssl.multimodal.localize import normalise

    rng = np.random.default_rng(seed)
    m = rng.uniform(-1, 1, (16, 20))
    x, y = rng.integers(0, 10, 2)
    w, h = rng.integers(2, 8, 2)
    ours = score_map(m, [[x, y, w, h]], t)
    cam = score_heatmap(normalise(m), [[x, y, x + w, y + h]], threshold=t)
    assert ours.keys() == cam.keys()
    for k in ours:
        assert ours[k] == pytest.approx(cam[k], nan_ok=True), k


def test_scores_of_a_gradient_map():
    m = np.tile(np.arange(10, dtype=float), (10, 1))  # columns 0..9, scaled to c / 9
    s = score_map(m, [[5, 0, 5, 10]], threshold=5 / 9)  # box = right half; predicted c >= 5: the same
    assert s["iou"] == pytest.approx(1.0) and s["pointing_game"] == 1.0
    s = score_map(m, [[5, 0, 5, 10]], threshold=7 / 9 - 1e-9)  # c >= 7: 30 of the box's 50 pixels
    assert s["iou"] == pytest.approx(30 / 50) and s["dice"] == pytest.approx(60 / 80)


def test_constant_map_and_empty_box():
    s = score_map(np.ones((4, 4)), [[0, 0, 2, 2]], 0.5)
    assert s["iou"] == 0.0 and s["pointing_game"] == 0.0  # scaled to 0 everywhere: nothing above threshold
    assert np.isnan(s["cnr"]) and np.isnan(s["energy_in_box"])  # undefined: left out of the means
    with pytest.raises(ValueError):
        score_map(np.ones((4, 4)), [[10, 10, 2, 2]], 0.5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100), st.floats(-50, 50), st.floats(0.05, 0.95))
def test_scores_do_not_depend_on_the_maps_scale_or_offset(seed, scale, offset, t):
    rng = np.random.default_rng(seed)
    m = rng.random((12, 12))
    box = [[3, 2, 5, 6]]
    a, b = score_map(m, box, t), score_map(m * scale + offset, box, t)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-6)


def test_choose_threshold_on_validation_items():
    m = np.tile(np.arange(10, dtype=float), (10, 1))
    assert choose_threshold([m, m], [[[5, 0, 5, 10]], [[5, 0, 5, 10]]], grid=[0.3, 5 / 9, 0.8]) == pytest.approx(5 / 9)
    assert choose_threshold([m], [[[8, 0, 2, 10]]], grid=[0.3, 5 / 9, 0.8]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        choose_threshold([], [])


def test_baselines():
    rng = np.random.default_rng(0)
    r = random_map((64, 64), (4, 4), rng)
    assert r.shape == (64, 64) and 0 <= r.min() and r.max() <= 1
    assert np.abs(np.diff(r, axis=1)).max() < 0.2  # smooth: bilinear from a 4 x 4 grid
    assert np.array_equal(r, random_map((64, 64), (4, 4), np.random.default_rng(0)))
    c = centre_map((64, 80))
    assert np.unravel_index(np.argmax(c), c.shape) in {(31, 39), (31, 40), (32, 39), (32, 40)}
    assert c[0, 0] < 0.02


def test_bootstrap_resamples_images_not_items():
    # image a has two items (0, 0), image b one item (1): whole-image resampling gives only
    # the means 0 (a, a), 1/3 (a, b) and 1 (b, b).
    scores = pd.DataFrame({"image_id": ["a", "a", "b"], "iou": [0.0, 0.0, 1.0]})
    lo, hi = bootstrap_ci(scores, "iou", n=2000, seed=0, level=0.5)
    assert lo == pytest.approx(1 / 3) and hi == pytest.approx(1 / 3)
    lo, hi = bootstrap_ci(scores, "iou", n=2000, seed=0, level=0.95)
    assert lo == 0.0 and hi == 1.0
    const = pd.DataFrame({"image_id": list("abcd"), "iou": [0.5] * 4})
    assert bootstrap_ci(const, "iou", 100, 0) == (0.5, 0.5)


def test_evaluate_maps_threshold_from_val_only():
    good = np.zeros((10, 10))
    good[0:5, 0:5] = 1
    items = pd.DataFrame({"image_id": ["v1", "t1", "t2"], "finding": "Nodule",
                          "boxes": [[[0, 0, 5, 5]], [[0, 0, 5, 5]], [[0, 0, 5, 5]]], "split": ["val", "test", "test"]})
    inverted = 1 - good
    scores, summary = evaluate_maps(items, {"good": [good, good, good], "mixed": [good, inverted, good]}, n_boot=50)
    table = summary.set_index(["source", "metric"])
    assert table.loc[("good", "iou"), "mean"] == 1.0 and table.loc[("good", "pointing_game"), "n_items"] == 2
    assert table.loc[("mixed", "pointing_game"), "mean"] == 0.5
    assert set(scores["image_id"]) == {"t1", "t2"}  # val items are never scored
    with pytest.raises(ValueError, match="val items"):
        evaluate_maps(items.assign(split="test"), {"good": [good] * 3})


def test_split_images_patient_disjoint():
    ids = [f"{p:08d}_{k:03d}.png" for p in range(10) for k in range(3)]
    split = split_images(ids, 0.3, seed=1, patient_of=lambda i: i[:8])
    per_patient = pd.Series(split).groupby(lambda i: i[:8]).nunique()
    assert (per_patient == 1).all() and sum(v == "val" for v in split.values()) == 9
    assert split == split_images(list(reversed(ids)), 0.3, seed=1, patient_of=lambda i: i[:8])


NIH_TEXT = ("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
            "00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661,,,\n"
            "00014716_007.png,Infiltrate,686.101694915254,131.543209876543,185.491525423729,313.491525423729,,,\n"
            "00014716_007.png,Infiltrate,10,20,30,40,,,\n"
            "00029817_009.png,Nodule,x,1,2,3,,,\n"
            "00029817_010.png,Mass,1,1,0,3\n")


def test_read_nih_boxes_real_layout(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(NIH_TEXT)
    q = Quarantine("skip")
    boxes = read_nih_boxes(path, q)
    assert boxes["finding"].tolist() == ["Atelectasis", "Infiltrate", "Infiltrate"]  # spelled as in the file
    assert boxes.iloc[0][["x", "y", "w", "h"]].tolist() == pytest.approx([225.084745762712, 547.019216763771,
                                                                         86.7796610169491, 79.1864406779661])
    assert [item.split(":")[-1] for item, _ in q.items] == ["row 4", "row 5"]
    items = localisation_items(boxes)
    assert len(items) == 2 and len(items.set_index("image_id").loc["00014716_007.png", "boxes"]) == 2
    with pytest.raises(BadInputError, match=r"row 4.*not four numbers"):
        read_nih_boxes(path, Quarantine("fail"))
    (tmp_path / "other.csv").write_text("image,label,x,y,w,h\n")
    with pytest.raises(BadInputError, match="header"):
        read_nih_boxes(tmp_path / "other.csv", Quarantine("skip"))


def test_read_rsna_labels(tmp_path):
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text("patientId,x,y,width,height,Target\n"
                    "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n"
                    "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1\n"
                    "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1\n"
                    "00704310-78a8-4b38-8475-49f4573b2dbb,,,,,2\n"
                    "00aecb01-a116-45a2-956c-08d2fa55433f,10,10,5,5,0\n")
    q = Quarantine("skip")
    boxes, ids = read_rsna_labels(path, q)
    assert len(boxes) == 2 and (boxes["finding"] == RSNA_FINDING).all()
    assert ids == ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4"]
    assert [r for _, r in q.items][0].startswith("patientId") and "Target 0 with a box" in q.items[1][1]


def test_read_ms_cxr_keeps_each_sentence_with_its_boxes(tmp_path):
    path = tmp_path / "MS_CXR_Local_Alignment_v1.1.0.csv"
    path.write_text(
        "dicom_id,category_name,label_text,path,x,y,w,h,image_width,image_height,split\n"
        "d1,Pneumonia,Right lower lobe pneumonia,files/p1/p1/s1/d1.jpg,10,20,30,40,100,100,train\n"
        "d1,Pneumonia,Right lower lobe pneumonia,files/p1/p1/s1/d1.jpg,50,20,30,40,100,100,train\n"
        "d1,Pneumonia,Left basal opacity,files/p1/p1/s1/d1.jpg,60,60,10,10,100,100,train\n"
        "d2,Cardiomegaly,,files/p2/p2/s2/d2.jpg,1,1,1,1,100,100,test\n")
    q = Quarantine("skip")
    frame = read_ms_cxr(path, q)
    assert len(frame) == 3 and len(q) == 1 and "empty" in q.items[0][1]
    items = localisation_items(frame)
    assert items["sentence"].tolist() == ["Left basal opacity", "Right lower lobe pneumonia"]
    assert len(items.iloc[1]["boxes"]) == 2


def test_cluster_bootstrap_of_the_shared_summary():
    from cxrssl.evaluation.localization import METRICS, summarize_scores

    rng = np.random.default_rng(3)
    rows = [{m: float(v) for m, v in zip(METRICS, rng.random(len(METRICS)))} for _ in range(9)]
    # every row its own image: the same resamples as without groups
    assert summarize_scores(rows, 200, 1, groups=[str(k) for k in range(9)]) == summarize_scores(rows, 200, 1)
    # two images: only the means of (a, a), (a, b), (b, b) can come out
    rows = [{m: 0.0 for m in METRICS}, {m: 0.0 for m in METRICS}, {m: 1.0 for m in METRICS}]
    out = summarize_scores(rows, 2000, 0, level=0.5, groups=["a", "a", "b"])
    assert out["iou"]["ci"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)] and out["iou"]["mean"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="group labels"):
        summarize_scores(rows, 10, 0, groups=["a"])


def test_comparison_table_puts_cams_and_similarity_maps_side_by_side():
    from cxrssl.evaluation.localization import METRICS, comparison_markdown, comparison_rows

    cell = {m: {"mean": 0.5, "ci": [0.4, 0.6], "n": 3} for m in METRICS}
    zs = {"queries": {"prompt": {"random": {"threshold": 0.5, "scores": {**cell, "cnr": {"mean": None, "ci": [None, None]}}},
                                 "model_global": {"threshold": 0.2, "scores": cell},
                                 "model": {"threshold": 0.3, "scores": cell}}}}
    rows = comparison_rows([({"engine": "torchvision", "init": "multimodal", "res": 128, "seed": 0},
                             {"engine": "torchvision", "summary": cell})], [("nih", zs)])
    assert [(r["maps"], r["method"], r["boxes"]) for r in rows] == [
        ("CAM (torchvision)", "multimodal", "VinDr-CXR test"), ("image-text similarity", "multimodal", "nih"),
        ("image-text similarity", "multimodal (global space)", "nih"), ("baseline", "random baseline", "nih")]
    md = comparison_markdown(rows)
    assert md.count("\n") == 6 and "0.500 [0.400, 0.600]" in md and "n/a [n/a, n/a]" in md


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 24), st.integers(2, 24), st.booleans())
def test_iou_at_every_threshold_equals_the_scorer_at_each(seed, h, w, plateaus):
    """The threshold search counts IoUs from sorted values; they must be score_heatmap's, one by one."""
    from cxrssl.evaluation.localization import iou_at_thresholds, score_heatmap

    rng = np.random.default_rng(seed)
    heat = rng.random((h, w))
    if plateaus:  # ties at the cut, a zero map region, the peak repeated
        heat = np.round(heat * 4) / 4
    x0, y0 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
    boxes = [[x0, y0, rng.uniform(x0 + 0.6, w), rng.uniform(y0 + 0.6, h)]]
    grid = np.round(np.arange(0.05, 1.0, 0.05), 2)
    expected = [score_heatmap(heat, boxes, threshold=float(t)) for t in grid]
    if expected[0] is None:  # no pixel centre inside the box
        return
    np.testing.assert_allclose(iou_at_thresholds(heat, boxes, grid), [e["iou"] for e in expected], rtol=0, atol=1e-12)
    np.testing.assert_allclose(iou_at_thresholds(np.zeros((h, w)), boxes, grid),
                               [score_heatmap(np.zeros((h, w)), boxes, threshold=float(t))["iou"] for t in grid])
