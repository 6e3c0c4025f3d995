"""VinDr-CXR train/val/test split (cxrssl.data.split): seeded, stratified, disjoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrssl.classes import VINDR_CLASSES, VINDR_NO_FINDING, VINDR_NO_FINDING_ID
from cxrssl.config import load_config
from cxrssl.data.split import run_split, split_vindr

ROOT = Path(__file__).resolve().parents[1]
RARE = 12  # class id given to only a few images


def make_dataset(n_train: int = 200, n_test: int = 40, seed: int = 0, rare_images: int = 8,
                 no_finding_share: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Annotation rows (3 readers per train image, 1 per test image) and matching metadata."""
    rng = np.random.default_rng(seed)
    rows, meta = [], []
    rare = set(rng.choice(n_train, size=rare_images, replace=False).tolist())
    for folder, n, readers in (("train", n_train, ["R1", "R2", "R3"]), ("test", n_test, ["R8"])):
        for k in range(n):
            image_id = f"{folder[:2]}{k:04d}"
            meta.append(dict(image_id=image_id, source_split=folder))
            common = [c for c in range(len(VINDR_CLASSES)) if c != RARE]
            classes = [] if rng.random() < no_finding_share else list(rng.choice(common, size=rng.integers(1, 3), replace=False))
            if folder == "train" and k in rare:
                classes.append(RARE)
            for reader in readers:
                if not classes:
                    rows.append(dict(image_id=image_id, rad_id=reader, class_name=VINDR_NO_FINDING,
                                     class_id=VINDR_NO_FINDING_ID, source_split=folder))
                for c in classes:
                    rows.append(dict(image_id=image_id, rad_id=reader, class_name=VINDR_CLASSES[c],
                                     class_id=int(c), source_split=folder))
    return pd.DataFrame(rows), pd.DataFrame(meta)


def kaggle_dataset(**kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kaggle layout: annotations only for the train folder; test folder images unlabelled."""
    annotations, metadata = make_dataset(**kw)
    return annotations[annotations["source_split"] == "train"], metadata


def split(annotations, metadata, layout="physionet", val=0.2, test=0.1, keep=True, seed=0):
    return split_vindr(annotations, metadata, layout, val, test, keep, seed)


def as_dict(frame: pd.DataFrame) -> dict[str, str]:
    return dict(zip(frame["image_id"], frame["split"]))


def test_deterministic_and_order_independent():
    annotations, metadata = make_dataset()
    first = split(annotations, metadata)
    again = split(annotations.sample(frac=1, random_state=3), metadata.sample(frac=1, random_state=4))
    pd.testing.assert_frame_equal(first, again)
    assert list(first.columns) == ["image_id", "split"]
    assert first["image_id"].is_monotonic_increasing


def test_different_seed_gives_different_split():
    annotations, metadata = make_dataset()
    a, b = as_dict(split(annotations, metadata, seed=0)), as_dict(split(annotations, metadata, seed=1))
    assert a.keys() == b.keys()
    assert {i for i, s in a.items() if s == "val"} != {i for i, s in b.items() if s == "val"}


def test_physionet_official_test_and_proportions():
    annotations, metadata = make_dataset(n_train=200, n_test=40)
    out = as_dict(split(annotations, metadata, val=0.2))
    folder = dict(zip(metadata["image_id"], metadata["source_split"]))
    assert len(out) == 240
    assert all((s == "test") == (folder[i] == "test") for i, s in out.items())
    n_val = sum(s == "val" for s in out.values())
    assert 30 <= n_val <= 50  # 20 % of 200, approximately (the algorithm balances labels first)


def test_rare_class_lands_in_train_and_val():
    annotations, metadata = make_dataset(n_train=200, rare_images=8)
    rare_images = set(annotations.loc[annotations["class_id"] == RARE, "image_id"])
    for seed in range(5):
        out = as_dict(split(annotations, metadata, val=0.2, seed=seed))
        splits = [out[i] for i in rare_images]
        assert 1 <= splits.count("val") <= 4 and splits.count("train") >= 4, (seed, splits)


def test_kaggle_carve_out():
    annotations, metadata = kaggle_dataset(n_train=300, n_test=30)
    out = as_dict(split(annotations, metadata, layout="kaggle", val=0.1, test=0.1))
    # the Kaggle test folder has no labels: none of its images is split
    assert set(out) == set(metadata.loc[metadata["source_split"] == "train", "image_id"])
    counts = pd.Series(out).value_counts()
    assert 20 <= counts["test"] <= 40 and 20 <= counts["val"] <= 40  # 10 % each of all 300
    assert counts["train"] == 300 - counts["test"] - counts["val"]
    rare_images = set(annotations.loc[annotations["class_id"] == RARE, "image_id"])
    assert {"train", "test"} <= {out[i] for i in rare_images}
    # the carve-out is deterministic
    assert out == as_dict(split(annotations, metadata, layout="kaggle", val=0.1, test=0.1))


def test_keep_no_finding_false_drops_images_without_boxes():
    annotations, metadata = make_dataset()
    boxed = set(annotations.loc[annotations["class_id"] != VINDR_NO_FINDING_ID, "image_id"])
    out = as_dict(split(annotations, metadata, keep=False))
    assert set(out) == boxed
    assert {"train", "val", "test"} == set(out.values())


def test_only_converted_and_annotated_images_are_split():
    annotations, metadata = make_dataset(n_train=60, n_test=10)
    dropped = metadata["image_id"].iloc[:5].tolist()  # e.g. quarantined DICOMs
    extra = pd.DataFrame([dict(image_id="zz_unlabelled", source_split="train")])
    out = as_dict(split(annotations, pd.concat([metadata.iloc[5:], extra])))
    assert not set(dropped) & set(out) and "zz_unlabelled" not in out
    assert len(out) == 65


def test_folder_disagreement_is_an_error():
    annotations, metadata = make_dataset(n_train=20, n_test=5)
    metadata.loc[0, "source_split"] = "test"
    with pytest.raises(ValueError, match=r"different folder.*tr0000"):
        split(annotations, metadata)


def test_too_few_images_is_a_clear_error():
    annotations, metadata = make_dataset(n_train=1, n_test=2, rare_images=0)
    with pytest.raises(ValueError, match="at least 2"):
        split(annotations, metadata)


@settings(max_examples=15, deadline=None)
@given(n_train=st.integers(10, 80), seed=st.integers(0, 2**31 - 1), val=st.floats(0.05, 0.5),
       test=st.floats(0.05, 0.4), layout=st.sampled_from(["physionet", "kaggle"]), keep=st.booleans())
def test_every_image_in_exactly_one_split(n_train, seed, val, test, layout, keep):
    make = kaggle_dataset if layout == "kaggle" else make_dataset
    annotations, metadata = make(n_train=n_train, n_test=6, seed=seed % 1000, rare_images=3, no_finding_share=0.3)
    if not keep and annotations.loc[annotations["class_id"] != VINDR_NO_FINDING_ID, "image_id"].nunique() < 3:
        return
    out = split(annotations, metadata, layout=layout, val=val, test=test, keep=keep, seed=seed)
    assert not out["image_id"].duplicated().any()
    assert set(out["split"]) <= {"train", "val", "test"}
    assert (out["split"] == "val").sum() >= 1 and (out["split"] == "train").sum() >= 1
    labelled = set(annotations["image_id"])
    assert set(out["image_id"]) <= labelled


def test_run_split_and_script(tmp_path):
    annotations, metadata = make_dataset(n_train=50, n_test=10)
    annotations.to_csv(tmp_path / "annotations.csv", index=False)
    metadata.assign(png=lambda m: "images/" + m["image_id"] + ".png").to_csv(tmp_path / "metadata.csv", index=False)
    out = run_split(tmp_path / "annotations.csv", tmp_path / "metadata.csv", tmp_path / "a/split.csv",
                    "physionet", 0.2, 0.1, True, 7)
    script = ROOT / "scripts/split_vindr.py"
    assert "--val-fraction" in subprocess.run([sys.executable, script, "--help"], capture_output=True,
                                              text=True, check=True).stdout
    subprocess.run([sys.executable, script, "--annotations", tmp_path / "annotations.csv",
                    "--metadata", tmp_path / "metadata.csv", "--output", tmp_path / "b/split.csv",
                    "--layout", "physionet", "--val-fraction", "0.2", "--keep-no-finding", "true",
                    "--seed", "7", "--log", tmp_path / "log.txt"], check=True, capture_output=True)
    assert (tmp_path / "a/split.csv").read_bytes() == (tmp_path / "b/split.csv").read_bytes()
    assert len(out) == 60


def _kaggle_like(n_images: int, n_abnormal: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A Kaggle-layout table of ``n_images`` train-folder images, ``n_abnormal`` with boxes."""
    rng = np.random.default_rng(seed)
    ids = [f"k{i:05d}" for i in range(n_images)]
    abnormal = set(rng.choice(n_images, n_abnormal, replace=False).tolist())
    image_col, class_col = [], []
    for i, image_id in enumerate(ids):
        classes = sorted(set(rng.integers(0, 14, rng.integers(1, 4)).tolist())) if i in abnormal else [VINDR_NO_FINDING_ID]
        image_col += [image_id] * len(classes)
        class_col += classes
    annotations = pd.DataFrame({"image_id": image_col, "class_id": class_col, "source_split": "train"})
    return annotations, pd.DataFrame({"image_id": ids, "source_split": "train"})


def test_paper_preset_is_the_original_protocol():
    """config/paper.yaml: Kaggle train folder only, abnormal images only in every split, 70/15/15
    (the original 659 / 660 val / test of 4,394), and both engines train on images with boxes only."""
    paper = load_config(ROOT / "config" / "paper.yaml")
    s = paper["vindr"]["split"]
    assert paper["vindr"]["layout"] == "kaggle" and s["keep_no_finding"] is False
    assert paper["detection"]["train_on_empty"] is False  # the one setting both engines read
    annotations, metadata = _kaggle_like(15_000, 4_394)
    out = split_vindr(annotations, metadata, "kaggle", s["val_fraction"], s["test_fraction"], s["keep_no_finding"],
                      paper["seed"])
    counts = out["split"].value_counts()
    # iterative stratification balances labels first: sizes within 2 % of 659 and 660
    assert abs(counts["val"] - 659) <= 13 and abs(counts["test"] - 660) <= 13 and counts.sum() == 4_394
    boxed = set(annotations.loc[annotations["class_id"] != VINDR_NO_FINDING_ID, "image_id"])
    assert set(out["image_id"]) == boxed  # abnormal-only train, val and test


def test_full_preset_keeps_every_image_and_the_official_test_set():
    full = load_config(ROOT / "config" / "full.yaml")
    s = full["vindr"]["split"]
    assert full["vindr"]["layout"] == "physionet" and s["keep_no_finding"] is True
    assert full["detection"]["train_on_empty"] is True
    annotations, metadata = make_dataset(n_train=200, n_test=40, no_finding_share=0.7)
    out = as_dict(split_vindr(annotations, metadata, "physionet", s["val_fraction"], s["test_fraction"],
                              s["keep_no_finding"], full["seed"]))
    assert len(out) == 240 and sum(v == "test" for v in out.values()) == 40  # PhysioNet's test folder, whole
    paper = load_config(ROOT / "config" / "paper.yaml")
    same = ("pretrain", "linear_eval")
    assert all(paper[k] == full[k] for k in same)  # the two presets differ in the protocol only
    for key in ("lr", "epochs", "batch_size", "frozen_stages", "norm_eval", "inits", "resolutions"):
        assert paper["detection"][key] == full["detection"][key], key


def test_schema_says_what_the_defaults_are():
    from cxrssl.config import load_schema, validate_config

    text = load_schema()["description"]
    assert "Defaults are the BarlowTwins-CXR paper's settings" not in text and "config/paper.yaml" in text
    defaults = validate_config({})
    assert defaults["vindr"]["split"]["keep_no_finding"] is True and defaults["detection"]["train_on_empty"] is True
