"""Detection metrics against hand-computed values: COCO AP, the VinBigData VOC 2010 metric and its
"No finding" class, the fixed-class-set bootstrap with percentile and BCa intervals (BCa checked
against scipy), paired differences between runs; the CLI and the run summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrssl.classes import VINDR_NO_FINDING
from cxrssl.errors import BadInputError
from cxrssl.evaluation import Run, evaluate, write_summary
from cxrssl.evaluation.metrics import (bca_interval, bootstrap_map, bootstrap_p_value, match_per_image,
                                       paired_difference)
from cxrssl.evaluation.vinbigdata import no_finding_score, voc_ap, voc_matches

REPO = Path(__file__).resolve().parents[1]


def make_gt(boxes: dict[int, list[tuple[int, list[float]]]], n_images: int, n_cats: int = 2) -> dict:
    """COCO GT: ``boxes`` maps image id -> [(category_id, [x, y, w, h]), ...]."""
    anns = []
    for image_id, items in boxes.items():
        for cat, bbox in items:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    return {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, n_images + 1)],
            "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in range(1, n_cats + 1)]}


def det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def test_hand_computed_ap50():
    # class 1: 2 GT boxes; predictions ranked TP (0.9), FP (0.8), TP (0.7).
    # Precision is 1 up to recall 0.5 and 2/3 at recall 1: 51 recall points at 1, 50 at 2/3.
    gt = make_gt({1: [(1, [10, 10, 20, 20])], 2: [(1, [50, 50, 20, 20])]}, n_images=2)
    results = [det(1, 1, [10, 10, 20, 20], 0.9), det(2, 1, [0, 0, 5, 5], 0.8), det(2, 1, [50, 50, 20, 20], 0.7)]
    m = evaluate(gt, results, bootstrap=0, no_finding=False)
    expected = (51 + 50 * 2 / 3) / 101
    assert m["per_class_AP50"]["class1"] == pytest.approx(expected, abs=1e-9)
    assert m["mAP50"] == pytest.approx(expected, abs=1e-9)
    # class 2 has no GT: AP n/a, excluded from the mean, reported
    assert m["per_class_AP50"]["class2"] is None
    assert m["classes_without_gt"] == ["class2"]
    # exact boxes: every IoU threshold behaves as at 0.5
    assert m["mAP"] == pytest.approx(expected, abs=1e-9)
    assert m["mAP50_ci"] == [None, None]


def test_perfect_and_empty_predictions():
    gt = make_gt({1: [(1, [10, 10, 20, 20]), (2, [40, 40, 30, 10])], 2: [(2, [5, 5, 50, 50])], 3: []},
                 n_images=3)
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    m = evaluate(gt, perfect, bootstrap=50, seed=1)
    for key in ("mAP", "mAP50", "mAP75", "voc_mAP", "voc_mAP40"):
        assert m[key] == pytest.approx(1.0), key
    assert m["mAP50_ci"] == [pytest.approx(1.0), pytest.approx(1.0)]
    # image 3 has no box: a "No finding" GT, and with no prediction there a "No finding" prediction
    assert m["per_class_voc_AP"][VINDR_NO_FINDING] == pytest.approx(1.0)

    empty = evaluate(gt, [], bootstrap=50, seed=1)
    assert empty["mAP50"] == 0.0 and empty["mAP"] == 0.0
    assert empty["per_class_AP50"] == {"class1": 0.0, "class2": 0.0}
    assert empty["mAP50_ci"] == [0.0, 0.0]
    assert empty["n_predictions"] == 0


def test_voc_iou_04_differs_from_coco_05():
    # A 20x20 GT and a prediction shifted so that IoU = 0.45 (intersection 18*... solved below).
    gt = make_gt({1: [(1, [0, 0, 20, 20])]}, n_images=1, n_cats=1)
    # shift in x by s: IoU = 20(20-s) / (20(20+s)) = (20-s)/(20+s) = 0.45 -> s = 11/1.45
    s = 11 / 1.45
    results = [det(1, 1, [s, 0, 20, 20], 0.8)]
    m = evaluate(gt, results, bootstrap=0, no_finding=False)
    assert m["mAP50"] == 0.0
    assert m["voc_mAP"] == pytest.approx(1.0)
    assert m["voc_iou"] == 0.4
    assert evaluate(gt, results, voc_iou=0.5, bootstrap=0, no_finding=False)["voc_mAP"] == 0.0


def test_no_finding_class():
    # image 1: box, confidently found; image 2: no box, the model predicts a weak box (0.2) there
    gt = make_gt({1: [(1, [10, 10, 30, 30])]}, n_images=2, n_cats=1)
    results = [det(1, 1, [10, 10, 30, 30], 0.95), det(2, 1, [60, 60, 10, 10], 0.2)]
    m = evaluate(gt, results, bootstrap=0, no_finding=True)
    # every image gets a "No finding" prediction with p = 1 - best box score: image 2's (0.8) is the
    # true one and ranks above image 1's false one (0.05)
    assert m["per_class_voc_AP"][VINDR_NO_FINDING] == pytest.approx(1.0)
    assert m["per_class_voc_AP"]["class1"] == pytest.approx(1.0)
    assert m["voc_mAP"] == pytest.approx(1.0)
    # the COCO metrics never see the extra class
    assert VINDR_NO_FINDING not in m["per_class_AP50"]
    # a confident false box on the empty image pushes its "No finding" (0.1) below image 1's (0.7)
    fooled = evaluate(gt, [det(1, 1, [10, 10, 30, 30], 0.3), det(2, 1, [60, 60, 10, 10], 0.9)], bootstrap=0)
    assert fooled["per_class_voc_AP"][VINDR_NO_FINDING] == pytest.approx(0.5)
    off = evaluate(gt, results, bootstrap=0, no_finding=False)
    assert VINDR_NO_FINDING not in off["per_class_voc_AP"] and off["voc_mAP"] == pytest.approx(1.0)
    assert no_finding_score([]) == 1.0 and no_finding_score([0.25, 0.5]) == 0.5


def test_vinbigdata_metric_is_voc2010_all_point_at_iou_above_04():
    # 3 GT boxes, one found at rank 1: all-point AP = recall 1/3 x precision 1; COCO's 101-point
    # sampling counts the 34 recall levels 0, 0.01, ..., 0.33
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (1, [30, 30, 10, 10]), (1, [60, 60, 10, 10])]}, n_images=1, n_cats=1)
    m = evaluate(gt, [det(1, 1, [0, 0, 10, 10], 0.9)], bootstrap=0, no_finding=False)
    assert m["voc_mAP"] == pytest.approx(1 / 3, abs=1e-12) and m["voc_mAP40"] == m["voc_mAP"]
    assert m["coco101_mAP"] == pytest.approx(34 / 101, abs=1e-12) and m["coco101_mAP40"] == m["coco101_mAP"]
    # IoU exactly 0.4 is no match for the competition (IoU > 0.4), a match for COCO (IoU >= 0.4)
    gt = make_gt({1: [(1, [0, 0, 10, 10])]}, n_images=1, n_cats=1)
    m = evaluate(gt, [det(1, 1, [0, 0, 10, 4], 0.9)], bootstrap=0, no_finding=False)
    assert (m["voc_mAP"], m["coco101_mAP"]) == (0.0, pytest.approx(1.0))
    # VOC matches a detection to its best-overlap GT box only, even when that one is taken
    gt = make_gt({1: [(1, [0, 0, 10, 10]), (1, [2, 0, 10, 10])]}, n_images=1, n_cats=1)
    results = [det(1, 1, [1, 0, 10, 10], 0.9), det(1, 1, [0, 0, 10, 10], 0.8)]
    m = evaluate(gt, results, bootstrap=0, no_finding=False)
    assert m["voc_mAP"] == pytest.approx(0.5) and m["coco101_mAP"] == pytest.approx(1.0)


def test_voc_ap_hand_computed():
    # ranked TP FP TP FP TP over 3 GT: envelope 1 up to recall 1/3, 2/3 up to 2/3, 0.6 up to 1
    tp = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert voc_ap(tp, ~tp, 3) == pytest.approx((1 + 2 / 3 + 0.6) / 3)
    assert np.isnan(voc_ap(tp, ~tp, 0))
    boxes = {1: np.array([[0.0, 0.0, 10.0, 10.0]])}
    tp, fp = voc_matches(boxes, [(1, np.array([0.0, 0, 10, 10]), 0.5), (1, np.array([0.0, 0, 10, 10]), 0.7)], 0.4)
    assert tp.tolist() == [True, False] and fp.tolist() == [False, True]  # the duplicate is a false positive


def _random_problem(seed: int, n_images: int = 12, n_cats: int = 3):
    rng = np.random.default_rng(seed)
    boxes, results = {}, []
    for i in range(1, n_images + 1):
        items = []
        for _ in range(rng.integers(0, 3)):
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(5, 30, 2)
            cat = int(rng.integers(1, n_cats + 1))
            items.append((cat, [float(x), float(y), float(w), float(h)]))
            if rng.random() < 0.7:
                results.append(det(i, cat, [float(x + rng.normal(0, 3)), float(y + rng.normal(0, 3)), float(w), float(h)],
                                   float(rng.random())))
        boxes[i] = items
        for _ in range(rng.integers(0, 3)):
            results.append(det(i, int(rng.integers(1, n_cats + 1)),
                               [float(v) for v in rng.uniform(0, 60, 2)] + [10.0, 10.0], float(rng.random())))
    return make_gt(boxes, n_images, n_cats), results


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000))
def test_weighted_accumulation_matches_cocoeval(seed):
    """The bootstrap's accumulation reproduces COCOeval: unit weights give mAP50, and weight 2 on an
    image equals COCOeval on a GT where that image is present twice."""
    gt, results = _random_problem(seed)
    m = evaluate(gt, results, bootstrap=0, no_finding=False)
    image_ids, matches = match_per_image(gt, results)
    point = bootstrap_map(matches, len(image_ids), 0, 0).point
    if m["mAP50"] is None:
        assert np.isnan(point)
    else:
        assert point == pytest.approx(m["mAP50"], abs=1e-12)
    # duplicate image 1 as image 1000 (same boxes, same predictions)
    dup = json.loads(json.dumps(gt))
    dup["images"].append({"id": 1000, "width": 100, "height": 100, "file_name": "dup.png"})
    dup["annotations"] += [dict(a, id=10_000 + a["id"], image_id=1000) for a in gt["annotations"] if a["image_id"] == 1]
    dup_results = results + [dict(r, image_id=1000) for r in results if r["image_id"] == 1]
    expected = evaluate(dup, dup_results, bootstrap=0, no_finding=False)["per_class_AP50"]
    weights = np.ones(len(image_ids), dtype=np.int64)
    weights[image_ids.index(1)] = 2
    from cxrssl.evaluation.metrics import weighted_ap

    for cat, name in ((c["id"], c["name"]) for c in gt["categories"]):
        got = weighted_ap(matches[cat], weights)
        if expected[name] is None:
            assert np.isnan(got)
        else:
            assert got == pytest.approx(expected[name], abs=1e-12)


def test_bootstrap_ci_contains_point_and_is_seeded():
    gt, results = _random_problem(7, n_images=40)
    a = evaluate(gt, results, bootstrap=200, seed=3, no_finding=False)
    b = evaluate(gt, results, bootstrap=200, seed=3, no_finding=False)
    c = evaluate(gt, results, bootstrap=200, seed=4, no_finding=False)
    low, high = a["mAP50_ci"]
    assert low <= a["mAP50"] <= high and low < high
    assert a["mAP50_ci"] == b["mAP50_ci"]
    assert a["mAP50_ci"] != c["mAP50_ci"]


def test_bootstrap_keeps_a_fixed_class_set():
    """A perfect common class and a rare class the model misses: every resample must average over
    both (mAP 0.5). Dropping the rare class from resamples without it (nanmean) gave 1.0 in about
    a third of them and pushed the interval up."""
    boxes = {i: [(1, [10, 10, 20, 20])] for i in range(1, 11)}
    boxes[11] = [(2, [50, 50, 20, 20])]  # the only box of class 2
    gt = make_gt(boxes, n_images=11)
    results = [det(i, 1, [10, 10, 20, 20], 0.9) for i in range(1, 11)] + [det(11, 2, [0, 0, 5, 5], 0.8)]
    m = evaluate(gt, results, bootstrap=200, seed=0, no_finding=False)
    assert m["mAP50"] == pytest.approx(0.5)
    assert m["bootstrap_classes"] == ["class1", "class2"] and len(m["mAP50_bootstrap"]) == 200
    assert m["mAP50_bootstrap"] == pytest.approx([0.5] * 200)
    assert m["mAP50_ci"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert m["bootstrap_rejected"] > 30  # about e^-1 of the draws lack image 11 and are redrawn
    # the jackknife leaves out image 11 nowhere (class 2 would vanish): that entry is undefined
    assert m["mAP50_jackknife"][10] is None and all(v == pytest.approx(0.5) for v in m["mAP50_jackknife"][:10])


def test_bca_interval_matches_scipy():
    from scipy.stats import bootstrap as scipy_bootstrap

    rng = np.random.default_rng(3)
    data = rng.exponential(size=30)  # skewed: BCa and percentile differ
    res = scipy_bootstrap((data,), np.mean, n_resamples=999, method="BCa", random_state=np.random.default_rng(1))
    jackknife = np.array([np.delete(data, i).mean() for i in range(len(data))])
    ours = bca_interval(res.bootstrap_distribution, jackknife, data.mean(), 0.95)
    assert ours == pytest.approx([res.confidence_interval.low, res.confidence_interval.high], rel=1e-12)
    percentile = scipy_bootstrap((data,), np.mean, n_resamples=999, method="percentile",
                                 random_state=np.random.default_rng(1)).confidence_interval
    assert ours != pytest.approx([percentile.low, percentile.high], rel=1e-3)


def test_paired_difference_over_the_same_resamples():
    rng = np.random.default_rng(5)
    boxes = {i: [(1 + i % 2, [float(v) for v in rng.uniform(0, 50, 2)] + [20.0, 20.0])] for i in range(1, 41)}
    gt = make_gt(boxes, n_images=40)
    results = [det(i, c, b, float(rng.uniform(0.5, 1))) for i, [(c, b)] in boxes.items()]
    # the same detections, but those of every third image moved off their boxes
    worse = [dict(r, bbox=[r["bbox"][0] + 40, *r["bbox"][1:]]) if r["image_id"] % 3 == 0 else r for r in results]
    a = evaluate(gt, results, bootstrap=300, seed=2, no_finding=False)
    b = evaluate(gt, worse, bootstrap=300, seed=2, no_finding=False)
    assert a["bootstrap_resamples_id"] == b["bootstrap_resamples_id"]  # same test set, same seed
    diff = paired_difference(a, b)
    assert diff["delta"] == pytest.approx(a["mAP50"] - b["mAP50"]) and diff["delta"] > 0.1
    low, high = diff["delta_ci"]
    assert 0 < low <= diff["delta"] <= high and diff["delta_ci_bca"][0] > 0
    assert diff["p_value"] == pytest.approx(2 / 301)  # no resample reverses the order
    same = paired_difference(a, a)
    assert same["delta"] == 0 and same["delta_ci"] == [0, 0] and same["p_value"] == 1.0
    other_seed = evaluate(gt, worse, bootstrap=300, seed=3, no_finding=False)
    with pytest.raises(ValueError, match="same resamples"):
        paired_difference(a, other_seed)
    assert bootstrap_p_value(np.array([-1.0, 1, 2, 3])) == pytest.approx(2 * 2 / 5)


def test_bad_inputs_name_the_entry(tmp_path):
    gt = make_gt({1: [(1, [0, 0, 10, 10])]}, n_images=1)
    with pytest.raises(BadInputError, match="entry 1: image_id 99"):
        evaluate(gt, [det(1, 1, [0, 0, 10, 10], 0.5), det(99, 1, [0, 0, 10, 10], 0.5)], bootstrap=0)
    with pytest.raises(BadInputError, match="entry 0: category_id 7"):
        evaluate(gt, [det(1, 7, [0, 0, 10, 10], 0.5)], bootstrap=0)
    with pytest.raises(BadInputError, match="bbox"):
        evaluate(gt, [det(1, 1, [0, 0, -1, 10], 0.5)], bootstrap=0)
    bad = tmp_path / "gt.json"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="gt.json: not valid JSON"):
        evaluate(bad, [], bootstrap=0)


def test_cli_standalone(tmp_path):
    gt = make_gt({1: [(1, [10, 10, 20, 20])], 2: [(1, [50, 50, 20, 20])]}, n_images=2)
    results = [det(1, 1, [10, 10, 20, 20], 0.9), det(2, 1, [0, 0, 5, 5], 0.8), det(2, 1, [50, 50, 20, 20], 0.7)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    script = REPO / "scripts" / "evaluate.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--voc-iou" in help_text and "--bootstrap" in help_text and "--seeds" not in help_text
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, str(script), "--gt", str(tmp_path / "gt.json"), "--results",
                           str(tmp_path / "res.json"), "--out", str(out), "--bootstrap", "20", "--no-finding", "false",
                           "--log", str(tmp_path / "eval.log")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    assert metrics["mAP50"] == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert metrics["bootstrap"] == 20 and metrics["no_finding"] is False
    assert "class1" in proc.stdout and "mAP50" in proc.stdout
    assert (tmp_path / "eval.log").read_text()


def _metrics_file(path: Path, map50: float, ci: tuple[float, float]) -> Path:
    path.write_text(json.dumps({"mAP50": map50, "mAP": map50 / 2, "mAP75": None, "mAP50_ci": list(ci),
                                "voc_mAP": map50 + 0.05, "voc_iou": 0.4,
                                "per_class_AP50": {"Cardiomegaly": map50, "ILD": None}}))
    return path


def _shifted(results: list[dict], every: int) -> list[dict]:
    """The same detections with those of every ``every``-th image moved off their boxes."""
    return [dict(r, bbox=[r["bbox"][0] + 40, *r["bbox"][1:]]) if r["image_id"] % every == 0 else r for r in results]


def test_summary_tables_differences_and_plot(tmp_path):
    from scipy.stats import t

    gt, results = _random_problem(11, n_images=40)
    metrics = {("imagenet", 0): evaluate(gt, _shifted(results, 3), bootstrap=100, seed=0),
               ("imagenet", 1): evaluate(gt, _shifted(results, 4), bootstrap=100, seed=0),
               ("barlowtwins", 0): evaluate(gt, results, bootstrap=100, seed=0),
               ("barlowtwins", 1): evaluate(gt, _shifted(results, 7), bootstrap=100, seed=0)}
    runs, locs = [], []
    for (init, seed), m in metrics.items():
        path = tmp_path / f"{init}_{seed}.json"
        path.write_text(json.dumps(m))
        runs.append(Run("torchvision", init, 224, seed, path))
        loc = tmp_path / f"loc_{init}_{seed}.json"
        energy = 0.6 if init == "barlowtwins" else 0.4
        loc.write_text(json.dumps({"n_images": 5, "summary": {
            k: {"mean": energy + 0.01 * seed, "ci": [energy - 0.1, energy + 0.1], "n": 5}
            for k in ("energy_in_box", "pointing_game", "iou", "dice", "cnr")}}))
        locs.append(Run("torchvision", init, 224, seed, loc))
    single = tmp_path / "single.json"
    single.write_text(json.dumps(metrics[("barlowtwins", 0)]))
    runs.append(Run("torchvision", "barlowtwins", 640, 0, single))
    summary = write_summary(runs, tmp_path / "s.csv", tmp_path / "s.md", tmp_path / "s.png", localization=locs,
                            baselines=["imagenet", "random"], out_differences=tmp_path / "d.csv")
    frame = pd.read_csv(tmp_path / "s.csv")
    assert len(frame) == len(summary) == 3
    first = frame.iloc[0]
    values = [metrics[("imagenet", s)]["mAP50"] for s in (0, 1)]
    assert (first["init"], first["res"], first["n_seeds"]) == ("imagenet", 224, 2)
    assert first["mAP50"] == pytest.approx(np.mean(values)) and first["mAP50_sd"] == pytest.approx(np.std(values, ddof=1))
    half = t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)  # the t-interval over seeds
    assert [first["mAP50_seed_t_low"], first["mAP50_seed_t_high"]] == pytest.approx([np.mean(values) - half,
                                                                                      np.mean(values) + half])
    seed_mean = np.mean([metrics[("imagenet", s)]["mAP50_bootstrap"] for s in (0, 1)], axis=0)
    assert [first["mAP50_ci_low"], first["mAP50_ci_high"]] == pytest.approx(np.percentile(seed_mean, [2.5, 97.5]))
    assert first["mAP50_bca_low"] <= first["mAP50"] <= first["mAP50_bca_high"]
    last = frame.iloc[2]  # one seed: the run's own intervals, no t-interval
    assert [last["mAP50_ci_low"], last["mAP50_ci_high"]] == pytest.approx(metrics[("barlowtwins", 0)]["mAP50_ci"])
    assert np.isnan(last["mAP50_seed_t_low"]) and np.isnan(last["loc_energy_in_box"])
    assert frame.iloc[1]["loc_energy_in_box"] == pytest.approx(0.605)
    diffs = pd.read_csv(tmp_path / "d.csv")
    (d,) = diffs.itertuples()  # barlowtwins - imagenet at 224 px ("random" is not among the inits)
    assert (d.init, d.baseline, d.n_seeds) == ("barlowtwins", "imagenet", 2)
    expected = np.mean([metrics[("barlowtwins", s)]["mAP50"] - metrics[("imagenet", s)]["mAP50"] for s in (0, 1)])
    assert d.delta_mAP50 == pytest.approx(expected) and d.delta_mAP50 > 0
    diff = np.mean([np.subtract(metrics[("barlowtwins", s)]["mAP50_bootstrap"], metrics[("imagenet", s)]["mAP50_bootstrap"])
                    for s in (0, 1)], axis=0)
    assert [d.delta_ci_low, d.delta_ci_high] == pytest.approx(np.percentile(diff, [2.5, 97.5]))
    assert 0 < d.p_value <= 1 and d.n_resamples == 100 and np.isfinite(d.delta_seed_t_low)
    md = (tmp_path / "s.md").read_text()
    assert "Paired mAP50 differences" in md and "barlowtwins − imagenet" in md and "Heatmap localisation" in md
    assert "VinBigData mAP@0.4" in md and "95% CI (BCa)" in md
    assert (tmp_path / "s.png").stat().st_size > 1000
    # metrics files without bootstrap arrays still summarise (intervals n/a)
    plain = write_summary([Run("torchvision", "x", 1, 0, _metrics_file(tmp_path / "p.json", 0.3, (0.2, 0.4)))],
                          tmp_path / "p.csv", tmp_path / "p.md", tmp_path / "p.png")
    assert np.isnan(plain.iloc[0]["mAP50_ci_low"])
    with pytest.raises(BadInputError, match="missing"):
        (tmp_path / "bad.json").write_text("{}")
        write_summary([Run("torchvision", "x", 1, 0, tmp_path / "bad.json")], tmp_path / "x.csv",
                      tmp_path / "x.md", tmp_path / "x.png")


def test_data_summary(tmp_path):
    from cxrssl.report import write_data_summary

    pd.DataFrame({"image_id": ["a", "b", "c", "d"], "source_split": ["train", "train", "train", "test"],
                  "photometric": ["MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "MONOCHROME2"],
                  "bits_stored": [12, 14, 12, 16], "transfer_syntax": ["1.2.840.10008.1.2.1"] * 4}
                 ).to_csv(tmp_path / "meta.csv", index=False)
    pd.DataFrame({"image_id": ["a", "b", "c", "d"], "split": ["train", "train", "val", "test"]}
                 ).to_csv(tmp_path / "split.csv", index=False)
    pd.DataFrame({"image_id": ["a", "a", "d"], "split": ["train", "train", "test"],
                  "class_name": ["Cardiomegaly", "Nodule/Mass", "Cardiomegaly"]}).to_csv(tmp_path / "fused.csv", index=False)
    pd.DataFrame({"image_index": ["1.png", "2.png", "3.png"], "patient_id": ["p1", "p1", "p2"],
                  "official_split": ["train_val", "train_val", "test"], "Atelectasis": [1, 0, 0],
                  "Hernia": [1, 0, 1]}).to_csv(tmp_path / "nih.csv", index=False)
    pd.DataFrame({"stage": ["convert"], "item": ["x.dicom"], "reason": ["no PixelData"]}
                 ).to_csv(tmp_path / "q1.csv", index=False)
    pd.DataFrame(columns=["stage", "item", "reason"]).to_csv(tmp_path / "q2.csv", index=False)
    tables = write_data_summary(tmp_path / "meta.csv", tmp_path / "split.csv", tmp_path / "fused.csv",
                                tmp_path / "nih.csv", [tmp_path / "q1.csv", tmp_path / "q2.csv"],
                                tmp_path / "out.html", tmp_path / "counts.csv", tmp_path / "q.csv")
    splits = tables["vindr_splits"]
    assert splits.loc["train"].tolist() == [2, 1, 1, 2]  # images, with boxes, without, boxes
    assert splits.loc["total", "images"] == 4 and list(splits.index) == ["train", "val", "test", "total"]
    assert tables["vindr_boxes"].loc["Cardiomegaly"].tolist() == [1, 0, 1, 2]
    assert tables["nih_splits"].loc["train_val"].tolist() == [2, 1]
    assert tables["nih_findings"].loc["(no finding)", "train_val"] == 1
    page = (tmp_path / "out.html").read_text()
    assert "Nodule/Mass" in page and "no PixelData" in page and "Quarantined items (1)" in page
    counts = pd.read_csv(tmp_path / "counts.csv")
    assert {"dataset", "table", "name", "split", "count"} <= set(counts.columns)
    assert pd.read_csv(tmp_path / "q.csv")["reason"].tolist() == ["no PixelData"]
    pd.DataFrame({"image_id": ["a"], "split": ["train"], "class_name": ["Nodule_Mass"]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(BadInputError, match="Nodule_Mass"):
        write_data_summary(tmp_path / "meta.csv", tmp_path / "split.csv", tmp_path / "bad.csv", tmp_path / "nih.csv",
                           [], tmp_path / "o.html", tmp_path / "c.csv", tmp_path / "qq.csv")
