"""Weighted boxes fusion of the VinDr readers and COCO export (cxrssl.data.fusion)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ensemble_boxes import weighted_boxes_fusion
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

import cxrssl.data.fusion as fusion
from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, coco_categories
from cxrssl.data.fusion import FUSED_COLUMNS, build_coco, fuse_boxes, run_fusion
from cxrssl.errors import BadInputError, Quarantine

ROOT = Path(__file__).resolve().parents[1]
NAN = math.nan


def box(image_id, rad_id, cid, x0, y0, x1, y1, source_split="train"):
    return dict(image_id=image_id, rad_id=rad_id, class_name=VINDR_CLASSES[cid], class_id=cid,
                x_min=x0, y_min=y0, x_max=x1, y_max=y1, source_split=source_split)


def no_finding(image_id, rad_id, source_split="train"):
    return dict(image_id=image_id, rad_id=rad_id, class_name=VINDR_NO_FINDING, class_id=14,
                x_min=NAN, y_min=NAN, x_max=NAN, y_max=NAN, source_split=source_split)


def metadata_for(sizes: dict[str, tuple[int, int]], factor: float = 0.25) -> pd.DataFrame:
    """sizes: image_id -> (orig_width, orig_height); converted images are ``factor`` times smaller."""
    rows = []
    for image_id, (w, h) in sizes.items():
        rows.append(dict(image_id=image_id, source_split="train", png=f"images_256px_8bit/{image_id}.png",
                         orig_height=h, orig_width=w, height=round(h * factor), width=round(w * factor),
                         scale=factor))
    return pd.DataFrame(rows)


def fuse(rows, sizes, split=None, policy="fail", **kw):
    annotations = pd.DataFrame(rows)
    split = split or {i: "train" for i in sizes}
    split_df = pd.DataFrame({"image_id": list(split), "split": list(split.values())})
    params = dict(iou_thr=0.6, skip_box_thr=0.0001, conf_type="avg") | kw
    quarantine = Quarantine(policy)
    return fuse_boxes(annotations, metadata_for(sizes), split_df, quarantine=quarantine, **params), quarantine


def test_three_jittered_readers_fuse_to_their_average():
    rows = [box("a", "R1", 3, 100, 100, 200, 200), box("a", "R2", 3, 104, 96, 204, 196),
            box("a", "R3", 3, 96, 104, 196, 204)]
    out, _ = fuse(rows, {"a": (1000, 800)})
    assert list(out.columns) == FUSED_COLUMNS
    assert len(out) == 1
    row = out.iloc[0]
    assert [row.x_min, row.y_min, row.x_max, row.y_max] == pytest.approx([100, 100, 200, 200], abs=1e-3)
    assert row.score == pytest.approx(1.0) and row.n_readers == 3
    assert row.class_name == "Cardiomegaly" and row.split == "train"


def test_disjoint_boxes_stay_separate_and_score_by_reader_share():
    rows = [box("a", "R1", 0, 10, 10, 60, 60), box("a", "R2", 0, 500, 500, 600, 600), no_finding("a", "R3"),
            box("a", "R1", 5, 10, 10, 60, 60)]  # same place, other class: never fused across classes
    out, _ = fuse(rows, {"a": (1000, 1000)})
    assert len(out) == 3
    assert out["n_readers"].tolist() == [1, 1, 1]
    assert out["score"].tolist() == pytest.approx([1 / 3] * 3)  # one of three readers drew each
    assert out["class_id"].tolist() == [0, 0, 5]


def test_same_reader_twice_counts_once():
    rows = [box("a", "R1", 2, 100, 100, 200, 200), box("a", "R1", 2, 102, 101, 201, 203),
            box("a", "R2", 2, 98, 99, 199, 200)]
    out, _ = fuse(rows, {"a": (1000, 1000)})
    assert len(out) == 1 and out.loc[0, "n_readers"] == 2


def test_pixel_coordinates_are_normalised_not_clipped():
    # Pixel boxes passed straight to WBF are clipped to 1 and vanish; here they must survive intact.
    rows = [box("a", "R1", 1, 1500, 2000, 2500, 2600), box("a", "R2", 1, 1510, 2010, 2510, 2610)]
    with pytest.warns(UserWarning) as caught:
        raw, _, _ = weighted_boxes_fusion([[[1500, 2000, 2500, 2600]], [[1510, 2010, 2510, 2610]]],
                                          [[1.0], [1.0]], [[1], [1]])
    assert len(raw) == 0  # the pitfall this module avoids
    assert any("Zero area box skipped" in str(w.message) for w in caught)
    out, _ = fuse(rows, {"a": (3000, 2800)})
    assert len(out) == 1
    assert out.loc[0, ["x_min", "y_min", "x_max", "y_max"]].tolist() == pytest.approx([1505, 2005, 2505, 2605], abs=1e-2)
    assert out.loc[0, "n_readers"] == 2


def test_single_reader_is_pass_through_with_duplicates_merged():
    rows = [box("t", "R8", 4, 100, 100, 300, 300, "test"), box("t", "R8", 4, 100, 100, 300, 300, "test"),
            box("t", "R8", 4, 110, 110, 310, 310, "test")]  # overlapping but distinct: kept
    out, _ = fuse(rows, {"t": (1000, 1000)}, split={"t": "test"})
    assert len(out) == 2
    assert out["score"].tolist() == [1.0, 1.0] and out["n_readers"].tolist() == [1, 1]
    assert out["x_min"].tolist() == [100, 110]


def test_small_overshoot_clipped_large_quarantined():
    rows = [box("a", "R1", 0, 10, 10, 1005, 500),   # 0.5 % past the right border: clipped
            box("a", "R2", 0, 10, 10, 1000, 500),
            box("a", "R1", 6, 10, 10, 100, 900)]    # 12.5 % past the bottom: quarantined
    with pytest.raises(BadInputError, match=r"annotations.csv:row 3 \(line 4\).*outside the 1000x800 image"):
        fuse(rows, {"a": (1000, 800)})
    out, quarantine = fuse(rows, {"a": (1000, 800)}, policy="skip")
    assert len(quarantine) == 1
    assert out["class_id"].tolist() == [0]
    assert out.loc[0, "x_max"] == pytest.approx(1000)


def test_images_outside_split_are_ignored_and_missing_metadata_is_an_error():
    rows = [box("a", "R1", 0, 1, 1, 50, 50), box("b", "R1", 0, 1, 1, 50, 50)]
    out, _ = fuse(rows, {"a": (100, 100), "b": (100, 100)}, split={"a": "val"})
    assert out["image_id"].tolist() == ["a"] and out["split"].tolist() == ["val"]
    annotations = pd.DataFrame(rows)
    with pytest.raises(ValueError, match="not in the metadata"):
        fuse_boxes(annotations, metadata_for({"a": (100, 100)}), pd.DataFrame({"image_id": ["b"], "split": ["train"]}),
                   0.6, 0.0001, "avg")


def test_bad_conf_type_rejected_before_ensemble_boxes_exits():
    with pytest.raises(ValueError, match="conf_type"):
        fuse([box("a", "R1", 0, 1, 1, 5, 5), box("a", "R2", 0, 1, 1, 5, 5)], {"a": (10, 10)}, conf_type="mean")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["R1", "R2", "R3"]), st.integers(0, 13),
                          st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.01, 0.1), st.floats(0.01, 0.1)),
                min_size=1, max_size=12),
       st.sampled_from(["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]))
def test_fused_boxes_stay_inside_image_and_readers_bounded(spec, conf_type):
    width, height = 2000, 1500
    rows = [box("a", r, c, x * width, y * height, (x + w) * width, (y + h) * height) for r, c, x, y, w, h in spec]
    out, _ = fuse(rows, {"a": (width, height)}, conf_type=conf_type)
    assert 1 <= len(out) <= len(rows)
    assert (out["x_min"] >= 0).all() and (out["x_max"] <= width).all() and (out["y_max"] <= height).all()
    assert (out["x_max"] > out["x_min"]).all() and (out["y_max"] > out["y_min"]).all()
    readers = {c: len({r for r, cc, *_ in spec if cc == c}) for c in range(14)}
    assert all(1 <= n <= readers[c] for c, n in zip(out["class_id"], out["n_readers"]))
    assert set(out["class_id"]) == {c for _, c, *_ in spec}  # no class lost


# ------------------------------------------------------------------ COCO files


def write_inputs(folder: Path) -> dict:
    rows = [box("a", "R1", 8, 100, 200, 300, 400), box("a", "R2", 8, 100, 200, 300, 400), no_finding("a", "R3"),
            no_finding("b", "R1"), no_finding("b", "R2"), no_finding("b", "R3"),
            box("c", "R1", 13, 40, 40, 400, 800), box("c", "R2", 13, 40, 40, 400, 800), box("c", "R3", 13, 40, 40, 400, 800),
            box("t", "R8", 10, 0, 0, 1000, 640, "test")]
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "annotations.csv", index=False)
    metadata_for({"a": (1000, 800), "b": (1200, 1200), "c": (800, 1000), "t": (1000, 800)}).to_csv(
        folder / "metadata.csv", index=False)
    pd.DataFrame({"image_id": ["a", "b", "c", "t"], "split": ["train", "train", "val", "test"]}).to_csv(
        folder / "split.csv", index=False)
    return dict(annotations_csv=folder / "annotations.csv", metadata_csv=folder / "metadata.csv",
                split_csv=folder / "split.csv", fused_csv=folder / "fused_boxes.csv",
                coco_json={s: folder / f"coco_{s}.json" for s in ("train", "val", "test")},
                iou_thr=0.6, skip_box_thr=0.0001, conf_type="avg", quarantine=Quarantine("fail"),
                quarantine_csv=folder / "quarantine_fusion.csv", counts_csv=folder / "counts.csv",
                counts_png=folder / "counts.png")


def test_coco_json_loads_and_is_scaled(tmp_path):
    paths = write_inputs(tmp_path)
    run_fusion(**paths)
    coco = COCO(str(paths["coco_json"]["train"]))
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["id"], i["vindr_id"], i["width"], i["height"]) for i in images] == [(1, "a", 250, 200), (2, "b", 300, 300)]
    assert images[0]["file_name"] == "images_256px_8bit/a.png"
    assert coco.getAnnIds(imgIds=[2]) == []  # an image without boxes is still listed
    (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert ann["bbox"] == pytest.approx([25, 50, 50, 50])  # original (100,200)-(300,400) / 4
    assert ann["category_id"] == VINDR_CLASSES.index("Nodule/Mass") + 1
    assert coco.loadCats(ann["category_id"])[0]["name"] == "Nodule/Mass"
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(VINDR_CLASSES)
    val = COCO(str(paths["coco_json"]["val"]))
    assert val.loadAnns(val.getAnnIds())[0]["bbox"] == pytest.approx([10, 10, 90, 190])
    test = json.loads(paths["coco_json"]["test"].read_text())
    assert test["images"][0]["vindr_id"] == "t" and len(test["annotations"]) == 1
    counts = pd.read_csv(paths["counts_csv"]).set_index("class_name")
    assert counts.loc["Nodule/Mass", "train"] == 1 and counts.loc["(images)", "train"] == 2
    assert counts.loc["(images with boxes)", "train"] == 1
    assert paths["counts_png"].read_bytes()[:4] == b"\x89PNG"
    assert pd.read_csv(paths["quarantine_csv"]).empty


def test_file_name_relative_to_json_folder(tmp_path):
    paths = write_inputs(tmp_path / "prep")
    paths["coco_json"] = {s: tmp_path / "elsewhere" / f"coco_{s}.json" for s in ("train", "val", "test")}
    run_fusion(**paths)
    image = json.loads(paths["coco_json"]["train"].read_text())["images"][0]
    assert (paths["coco_json"]["train"].parent / image["file_name"]).resolve() == \
        (tmp_path / "prep/images_256px_8bit/a.png").resolve()


def test_renamed_class_is_caught(monkeypatch):
    fused = pd.DataFrame(columns=FUSED_COLUMNS)
    meta = metadata_for({"a": (100, 100)})
    renamed = [dict(c, name="Nodule_Mass") if c["name"] == "Nodule/Mass" else c for c in coco_categories()]
    monkeypatch.setattr(fusion, "coco_categories", lambda: renamed)
    with pytest.raises(ValueError, match=r"class table differs.*Nodule/Mass"):
        build_coco(fused, meta, ["a"], "train")
    monkeypatch.undo()
    bad = pd.DataFrame([dict(image_id="a", split="train", class_name="Nodule_Mass", class_id=8, x_min=1, y_min=1,
                             x_max=5, y_max=5, score=1.0, n_readers=1)])
    with pytest.raises(ValueError, match="class_id 8 is called 'Nodule_Mass'"):
        build_coco(bad, meta, ["a"], "train")


def test_outputs_are_byte_for_byte_deterministic(tmp_path):
    first, second = write_inputs(tmp_path / "one"), write_inputs(tmp_path / "two")
    run_fusion(**first)
    run_fusion(**second)
    for key in ("fused_csv", "counts_csv"):
        assert first[key].read_bytes() == second[key].read_bytes()
    for split in ("train", "val", "test"):
        assert first["coco_json"][split].read_bytes() == second["coco_json"][split].read_bytes()


def test_script_runs(tmp_path):
    paths = write_inputs(tmp_path)
    script = ROOT / "scripts/fuse_boxes.py"
    assert "--iou-thr" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                                         check=True).stdout
    subprocess.run([sys.executable, script, "--iou-thr", "0.5", "--annotations", paths["annotations_csv"],
                    "--metadata", paths["metadata_csv"], "--split", paths["split_csv"], "--fused",
                    tmp_path / "out/fused.csv", "--coco-train", tmp_path / "out/coco_train.json",
                    "--coco-val", tmp_path / "out/coco_val.json", "--coco-test", tmp_path / "out/coco_test.json",
                    "--quarantine", tmp_path / "out/q.csv", "--log", tmp_path / "log.txt"],
                   check=True, capture_output=True)
    fused = pd.read_csv(tmp_path / "out/fused.csv")
    assert fused["n_readers"].tolist() == [2, 3, 1]
    assert np.allclose(fused["score"], [2 / 3, 1.0, 1.0])


# ------------------------------------------------------------------ hostile rows (issue 11)


def test_repeated_reader_rows_do_not_inflate_scores():
    """One of three readers drew the box: 1/3, however often the row is repeated (was 2/3, then 1.0)."""
    rows = [box("a", "R1", 3, 100, 100, 200, 200), no_finding("a", "R2"), no_finding("a", "R3")]
    for copies in (1, 2, 3):
        out, _ = fuse(rows + [rows[0]] * (copies - 1), {"a": (1000, 1000)})
        assert len(out) == 1 and out.loc[0, "n_readers"] == 1
        assert out.loc[0, "score"] == pytest.approx(1 / 3), copies


def test_one_reader_with_two_overlapping_boxes_counts_once_in_the_score():
    rows = [box("a", "R1", 3, 100, 100, 200, 200), box("a", "R1", 3, 103, 101, 202, 199),
            no_finding("a", "R2"), no_finding("a", "R3")]
    out, _ = fuse(rows, {"a": (1000, 1000)})
    assert len(out) == 1 and out.loc[0, "n_readers"] == 1 and out.loc[0, "score"] == pytest.approx(1 / 3)


def test_a_box_clipped_to_a_sliver_is_quarantined():
    rows = [box("a", "R1", 0, 999.5, 10, 1005, 500), box("a", "R2", 0, 10, 10, 300, 500)]  # 0.5 px left inside
    with pytest.raises(BadInputError, match=r"row 1 \(line 2\).*less than 1 px wide or high inside the image"):
        fuse(rows, {"a": (1000, 800)})
