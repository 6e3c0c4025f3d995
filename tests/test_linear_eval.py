"""Linear evaluation: splits, nested subsets, AUC, epoch selection on val, script end to end."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from cxrssl.classes import NIH_FINDINGS
from cxrssl.config import section_defaults
from cxrssl.errors import BadInputError
from cxrssl.linear_eval import (assign_splits, collect_metrics, label_subset, load_nih_index, mean_auc,
                                open_cache, per_finding_auc, run_linear_eval, select_epoch)
from cxrssl.linear_eval.train import Classifier
from cxrssl.models.backbone import backbone_state_dict, build_resnet

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # cache side: 4 x 4 cells of 8 px, one cell per finding
# Small inputs keep every run to seconds on a shared 2-core machine.
FAST = {"epochs": 4, "batch_size": 16, "lr": 0.2, "image_size": 16, "workers": 0, "val_fraction": 0.25}


def fast_settings(**overrides) -> dict:
    values = {k: v for k, v in section_defaults("linear_eval").items() if k not in ("inits", "fractions")}
    values.update(FAST)
    values.update(overrides)
    return values


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise; finding j brightens cell j of a 4 x 4 grid (a signal a frozen random net can pick up)."""
    images = rng.normal(60, 20, (len(labels), SIZE, SIZE))
    for j in range(labels.shape[1]):
        r, c = divmod(j, 4)
        images[labels[:, j] == 1, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 120
    return np.clip(images, 0, 255).astype(np.uint8)


def synthetic_index(n_patients: int, images_per_patient: int, n_test_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_patients * images_per_patient
    labels = (rng.random((n, len(NIH_FINDINGS))) < 0.35).astype(np.int8)
    patients = np.repeat(np.arange(n_patients), images_per_patient)
    frame = pd.DataFrame({
        "image_index": [f"{i:08d}_000.png" for i in range(n)],
        "patient_id": patients.astype(str),
        "official_split": np.where(patients < n_test_patients, "test", "train_val"),
        "path": [f"images/{i:08d}_000.png" for i in range(n)],
    })
    frame[list(NIH_FINDINGS)] = labels
    frame["cache_row"] = np.arange(n)
    return frame


def write_dataset(folder: Path, index: pd.DataFrame, images: np.ndarray) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    index.to_csv(folder / "index.csv", index=False)
    np.save(folder / "cache.npy", images)
    return folder / "index.csv", folder / "cache.npy"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machine is shared: one intra-op thread is faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> tuple[Path, Path]:
    """48 patients x 3 images (12 test patients) with a learnable per-finding signal."""
    index = synthetic_index(48, 3, 12)
    images = synthetic_images(index[list(NIH_FINDINGS)].to_numpy(), np.random.default_rng(1))
    return write_dataset(tmp_path_factory.mktemp("nih"), index, images)


# --- splits and subsets ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 300),
       fractions=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=5))
def test_label_subsets_are_nested_seeded_and_non_empty(seed, n, fractions):
    patients = [f"p{i}" for i in range(n)]
    subsets = [set(label_subset(patients, f, seed)) for f in sorted(fractions)]
    for small, large in zip(subsets, subsets[1:]):
        assert small <= large
    assert all(1 <= len(s) <= n and s <= set(patients) for s in subsets)
    assert subsets[-1] == set(label_subset(list(reversed(patients)), max(fractions), seed))
    assert set(label_subset(patients, 1.0, seed)) == set(patients)


def test_label_subset_size_and_seed_dependence():
    patients = [str(i) for i in range(1000)]
    assert len(label_subset(patients, 0.01, 0)) == 10
    assert len(label_subset(patients, 0.0001, 0)) == 1
    assert set(label_subset(patients, 0.1, 0)) != set(label_subset(patients, 0.1, 1))
    with pytest.raises(ValueError, match="fraction"):
        label_subset(patients, 0.0, 0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), val_fraction=st.floats(0.01, 0.99),
       n_patients=st.integers(3, 40), per_patient=st.integers(1, 4))
def test_splits_are_patient_disjoint_and_keep_the_official_test(seed, val_fraction, n_patients, per_patient):
    index = synthetic_index(n_patients, per_patient, n_test_patients=1, seed=seed % 1000)
    split = assign_splits(index, val_fraction, seed)
    assert set(split) == {"train", "val", "test"}
    assert (split == "test").equals(index["official_split"] == "test")
    groups = [set(index.loc[split == s, "patient_id"]) for s in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    shuffled = index.sample(frac=1.0, random_state=seed % 1000)
    assert assign_splits(shuffled, val_fraction, seed).reindex(index.index).equals(split)


# --- metrics and selection -------------------------------------------------------------------------
def test_auc_matches_sklearn_on_a_hand_example(caplog):
    y_true = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]])
    y_score = np.array([[0.1, 0.3, 0.9], [0.4, 0.2, 0.8], [0.35, 0.1, 0.7], [0.8, 0.5, 0.6]])
    names = ["a", "only_positive", "inverted"]
    with caplog.at_level(logging.WARNING):
        aucs = per_finding_auc(y_true, y_score, names, split="val")
    assert aucs["a"] == pytest.approx(0.75) == roc_auc_score(y_true[:, 0], y_score[:, 0])
    # positives 0.8, 0.6 vs negatives 0.9, 0.7: one of four pairs ranked right
    assert aucs["inverted"] == pytest.approx(0.25) == roc_auc_score(y_true[:, 2], y_score[:, 2])
    assert math.isnan(aucs["only_positive"])
    assert "only_positive" in caplog.text and "val" in caplog.text
    assert mean_auc(aucs) == pytest.approx(0.5)
    assert math.isnan(mean_auc({"x": math.nan}))
    with pytest.raises(ValueError, match="non-finite"):
        per_finding_auc(y_true, np.full(y_true.shape, np.nan), names)


def test_select_epoch_takes_the_best_validation_epoch():
    assert select_epoch([0.6, 0.7, 0.65]) == 2
    assert select_epoch([0.7, math.nan, 0.7]) == 1  # earliest on ties, NaN ignored
    with pytest.raises(ValueError, match="validation"):
        select_epoch([math.nan, math.nan])


def test_frozen_classifier_keeps_backbone_and_batchnorm_fixed():
    torch.manual_seed(0)
    backbone = build_resnet("resnet18")
    backbone.fc = torch.nn.Identity()
    model = Classifier(backbone, 512, 14, frozen=True).train()
    assert not model.backbone.training and model.head.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None


def test_epoch_is_selected_on_validation_never_on_test(tmp_path):
    """Test images are the validation images with flipped labels: test AUC = 1 - val AUC per epoch,
    so the best test epoch is the worst validation epoch. The selected epoch must follow val."""
    base = synthetic_index(40, 3, n_test_patients=0)
    images = synthetic_images(base[list(NIH_FINDINGS)].to_numpy(), np.random.default_rng(2))
    val = base[assign_splits(base, FAST["val_fraction"], 0) == "val"].copy()
    val["patient_id"] = "T" + val["patient_id"]
    val["official_split"] = "test"
    val[list(NIH_FINDINGS)] = 1 - val[list(NIH_FINDINGS)]
    index_path, cache_path = write_dataset(tmp_path / "data", pd.concat([base, val], ignore_index=True), images)

    test_by_epoch = {}

    def record(epoch, predict):
        y, scores = predict("test")
        test_by_epoch[epoch] = mean_auc(per_finding_auc(y, scores, list(NIH_FINDINGS), warn=False))

    metrics = run_linear_eval(index_path=index_path, cache_path=cache_path, init="random", fraction=1.0,
                              arch="resnet18", out_dir=tmp_path / "run", seed=0,
                              settings=fast_settings(epochs=6, lr=0.2), epoch_callback=record)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["val_mean_auc"].nunique() > 1
    best_test_epoch = max(test_by_epoch, key=test_by_epoch.get)
    assert metrics["selected_epoch"] == select_epoch(history["val_mean_auc"]) != best_test_epoch
    assert metrics["test_mean_auc"] == pytest.approx(test_by_epoch[metrics["selected_epoch"]], abs=1e-6)
    assert metrics["test_mean_auc"] < max(test_by_epoch.values())
    assert metrics["val_mean_auc"] == pytest.approx(history["val_mean_auc"].max(), abs=1e-6)


# --- runs ------------------------------------------------------------------------------------------
def test_runs_are_deterministic_and_write_the_split(learnable, tmp_path):
    index_path, cache_path = learnable
    kwargs = dict(index_path=index_path, cache_path=cache_path, init="random", fraction=0.5,
                  arch="resnet18", seed=3, settings=fast_settings(epochs=2))
    first = run_linear_eval(out_dir=tmp_path / "a", **kwargs)
    second = run_linear_eval(out_dir=tmp_path / "b", **kwargs)
    assert first == second
    assert (tmp_path / "a" / "history.csv").read_text() == (tmp_path / "b" / "history.csv").read_text()
    split = pd.read_csv(tmp_path / "a" / "split.csv", dtype={"patient_id": str})
    labelled = split[split["labelled"]]
    assert set(labelled["split"]) == {"train"}
    assert labelled["patient_id"].nunique() == first["n_train_patients"] == round(
        0.5 * split.loc[split["split"] == "train", "patient_id"].nunique())
    assert len(labelled) == first["n_train_images"]


def test_finetune_with_augmentation_runs_through_the_image_loader(learnable, tmp_path):
    index_path, cache_path = learnable
    metrics = run_linear_eval(index_path=index_path, cache_path=cache_path, init="random", fraction=0.2,
                              arch="resnet18", out_dir=tmp_path, seed=0,
                              settings=fast_settings(mode="finetune", augment=True, epochs=2, lr=0.01,
                                                     batch_size=8))
    assert metrics["mode"] == "finetune" and 1 <= metrics["selected_epoch"] <= 2
    assert 0.0 <= metrics["test_mean_auc"] <= 1.0
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2


def test_validation_without_any_defined_finding_is_refused(tmp_path):
    index = synthetic_index(12, 1, n_test_patients=4)
    index[list(NIH_FINDINGS)] = 0
    index.loc[index["official_split"] == "test", "Effusion"] = [0, 1, 0, 1]
    images = synthetic_images(index[list(NIH_FINDINGS)].to_numpy(), np.random.default_rng(0))
    index_path, cache_path = write_dataset(tmp_path, index, images)
    with pytest.raises(ValueError, match="val_fraction"):
        run_linear_eval(index_path=index_path, cache_path=cache_path, init="random", fraction=1.0,
                        arch="resnet18", out_dir=tmp_path / "run", seed=0, settings=fast_settings())


# --- bad inputs ------------------------------------------------------------------------------------
def test_bad_index_and_cache_are_named(tmp_path):
    index = synthetic_index(4, 2, 1)
    path = tmp_path / "index.csv"
    index.drop(columns=["cache_row"]).to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"index\.csv: missing columns \['cache_row'\]"):
        load_nih_index(path)
    bad = index.copy()
    bad.loc[3, "Hernia"] = 2
    bad.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"0 or 1: line 5 \(00000003_000.png\)"):
        load_nih_index(path)
    index.to_csv(path, index=False)
    with pytest.raises(BadInputError, match="cache_row must be a non-negative integer below 5: line 7"):
        load_nih_index(path, n_cache_rows=5)
    leaky = index.copy()
    leaky.loc[0, "patient_id"] = leaky.loc[7, "patient_id"]
    leaky.to_csv(path, index=False)
    with pytest.raises(BadInputError, match="both the train_val and the test list"):
        load_nih_index(path)
    np.save(tmp_path / "cache.npy", np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(BadInputError, match=r"cache\.npy: expected a uint8"):
        open_cache(tmp_path / "cache.npy")


# --- scripts ---------------------------------------------------------------------------------------
def run_script(*args: str) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CXRSSL_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_scripts_end_to_end_learn_the_signal_and_summarise(learnable, tmp_path):
    index_path, cache_path = learnable
    torch.manual_seed(7)
    checkpoint = tmp_path / "backbone.pth"
    torch.save(backbone_state_dict(build_resnet("resnet18")), checkpoint)  # the pretraining contract
    out, log = tmp_path / "barlowtwins" / "frac1.0", tmp_path / "run.log"
    run_script("scripts/linear_eval.py", "--epochs", "5", "--batch-size", "16", "--lr", "0.2",
               "--image-size", "16", "--workers", "0", "--val-fraction", "0.25", "--arch", "resnet18",
               "--index", str(index_path), "--cache", str(cache_path), "--seed", "0", "--init", str(checkpoint),
               "--init-name", "barlowtwins", "--fraction", "1.0", "--out-dir", str(out), "--log", str(log))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"] == "barlowtwins" and metrics["fraction"] == 1.0
    assert set(metrics["test_auc"]) == set(NIH_FINDINGS)
    assert metrics["test_mean_auc"] > 0.65, metrics  # the bright cells are learnt from frozen features
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3, 4, 5]
    assert {"train_loss", "val_mean_auc"} <= set(history.columns)
    assert "selected epoch" in log.read_text()

    # a second arm at a lower fraction, then the summary script over both
    low = tmp_path / "random" / "frac0.3"
    run_linear_eval(index_path=index_path, cache_path=cache_path, init="random", fraction=0.3, arch="resnet18",
                    out_dir=low, seed=0, settings=fast_settings(epochs=2))
    metrics_paths = [str(low / "metrics.json"), str(out / "metrics.json")]
    summary, plot = tmp_path / "summary.csv", tmp_path / "auc.png"
    run_script("scripts/summarize_linear_eval.py", "--metrics", *metrics_paths, "--summary", str(summary),
               "--plot", str(plot))
    table = pd.read_csv(summary)
    assert list(table[["init", "fraction"]].itertuples(index=False, name=None)) == [
        ("random", 0.3), ("barlowtwins", 1.0)]
    assert list(table.columns) == list(collect_metrics(metrics_paths).columns)
    assert table.loc[1, "test_mean_auc"] == pytest.approx(metrics["test_mean_auc"])
    assert table.loc[1, "Hernia"] == pytest.approx(metrics["test_auc"]["Hernia"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- loader workers under spawn (issue 10.8) --------------------------------------------------------
def test_dataset_does_not_pickle_the_cache_into_spawned_workers(tmp_path):
    """Under spawn/forkserver each worker gets the dataset pickled: the memory map must not travel."""
    import pickle

    from torch.utils.data import DataLoader

    from cxrssl.linear_eval.data import CacheImages, image_transform

    big = np.lib.format.open_memmap(tmp_path / "cache.npy", mode="w+", dtype=np.uint8, shape=(512, 128, 128))
    big[:] = 7
    big.flush()
    cache = open_cache(tmp_path / "cache.npy")
    labels = np.zeros((512, len(NIH_FINDINGS)), np.float32)
    for source in (tmp_path / "cache.npy", cache):  # a path, or the map itself (its file is remembered)
        dataset = CacheImages(source, np.arange(512), labels, image_transform(16, augment=False))
        assert len(pickle.dumps(dataset)) < 100_000  # the cache is 8 MB, labels and rows 30 kB
    loader = DataLoader(dataset, batch_size=256, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (256, 3, 16, 16)
    torch.testing.assert_close(batches[1][0][0, 0, 0, 0], torch.tensor((7 / 255 - 0.485) / 0.229))


# --- ViT backbones ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A 'pretrained' tiny ViT at 16 px with its sidecar (what GMML pretraining writes)."""
    from cxrssl.models.backbones import build_backbone, export_state_dict, get_spec, write_sidecar

    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("vit") / "backbone.pth"
    torch.save(export_state_dict(build_backbone("vit_tiny_patch8", "random", image_size=16)), path)
    write_sidecar(path, get_spec("vit_tiny_patch8"), method="gmml", image_size=16, fingerprint="0" * 64)
    return path


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_linear_probe_on_a_vit_uses_its_pooled_tokens(learnable, vit_checkpoint, tmp_path, pool):
    from cxrssl.linear_eval.train import extract_features
    from cxrssl.models.backbones import PooledFeatures

    index_path, cache_path = learnable
    metrics = run_linear_eval(index_path=index_path, cache_path=cache_path, init=str(vit_checkpoint), fraction=1.0,
                              arch="resnet18", out_dir=tmp_path, seed=0,
                              settings=fast_settings(image_size=24, epochs=2, vit_pool=pool))
    assert metrics["arch"] == "vit_tiny_patch8"  # from the sidecar, not the resnet18 default
    assert 0 <= metrics["test_mean_auc"] <= 1
    # the features are the mean of the patch tokens (or the CLS token) after the final norm
    from cxrssl.models.backbones import build_backbone

    encoder = build_backbone("vit_tiny_patch8", str(vit_checkpoint), image_size=24).eval()
    x = torch.randn(3, 3, 24, 24)
    tokens = encoder.forward_features(x)
    expected = tokens[:, 1:].mean(1) if pool == "mean" else tokens[:, 0]
    torch.testing.assert_close(PooledFeatures(encoder, pool)(x), expected)
    loader = [(x, None)]
    torch.testing.assert_close(extract_features(PooledFeatures(encoder, pool), loader, torch.device("cpu")), expected)


def test_vit_finetune_with_layer_decay(learnable, vit_checkpoint, tmp_path):
    from cxrssl.linear_eval.train import Classifier, param_groups
    from cxrssl.models.backbones import build_backbone, feature_extractor

    index_path, cache_path = learnable
    s = fast_settings(mode="finetune", optimizer="adamw", layer_decay=0.5, lr=1e-3, weight_decay=0.05, epochs=2,
                      image_size=16)
    metrics = run_linear_eval(index_path=index_path, cache_path=cache_path, init=str(vit_checkpoint), fraction=1.0,
                              out_dir=tmp_path, seed=0, settings=s)
    assert metrics["mode"] == "finetune" and metrics["arch"] == "vit_tiny_patch8"
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["lr"].iloc[0] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 2)), rel=1e-6)
    # the groups: deeper blocks learn faster, the head at the full rate, no decay on 1-D and pos_embed
    model = Classifier(feature_extractor(build_backbone("vit_tiny_patch8", "random", image_size=16)), 192, 14, False)
    groups = param_groups(model, model, s)
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    enc = model.backbone.encoder
    assert rate[id(enc.blocks[0].mlp.fc1.weight)][0] < rate[id(enc.blocks[2].mlp.fc1.weight)][0] < 1e-3
    assert rate[id(model.head.weight)] == (1e-3, 0.05) and rate[id(model.head.bias)] == (1e-3, 0.0)
    assert rate[id(enc.pos_embed)][1] == 0.0 and rate[id(enc.norm.weight)][1] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = param_groups(model, model, dict(s, layer_decay=1.0))
    assert {g["lr"] for g in plain} == {1e-3} and {g["weight_decay"] for g in plain} == {0.0, 0.05}
    sgd = param_groups(model, model, dict(s, layer_decay=1.0, optimizer="sgd"))
    assert len(sgd) == 1  # the paper's protocol: one group


# --- intervals, paired differences, BatchNorm recalibration ------------------------------------------
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 40), ties=st.booleans())
def test_weighted_auc_equals_sklearn_with_sample_weights(seed, n, ties):
    from cxrssl.linear_eval.metrics import weighted_auc

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.integers(0, 4, n).astype(float) if ties else rng.random(n)
    weights = rng.integers(0, 4, (5, n)).astype(float)
    weights[:, :2] = 1  # both classes under every row
    got = weighted_auc(y, scores, weights)
    want = [roc_auc_score(y, scores, sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_patient_resamples_draw_whole_patients_keep_every_finding_and_are_shared():
    from cxrssl.linear_eval.metrics import patient_resamples

    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(30)], 3)
    y = (rng.random((90, 3)) < 0.2).astype(int)
    y[:, 2] = 0  # a finding with one class only: not part of the fixed set
    counts = patient_resamples(patients, y, 200, seed=5)
    assert counts.shape == (200, 90)
    assert (counts.reshape(200, 30, 3) == counts.reshape(200, 30, 3)[:, :, :1]).all()  # a patient's images together
    assert (counts.sum(axis=1) == 90).all()
    pos = counts @ y[:, :2]
    assert ((pos > 0) & (pos < 90)).all()
    np.testing.assert_array_equal(counts, patient_resamples(patients, y, 200, seed=5))
    assert not np.array_equal(counts, patient_resamples(patients, y, 200, seed=6))


def test_summary_gives_intervals_and_a_paired_difference_that_finds_the_better_init(tmp_path):
    from cxrssl.linear_eval.summary import summarize

    rng = np.random.default_rng(0)
    n = 120
    patients = np.repeat([str(i) for i in range(40)], 3)
    y = (rng.random((n, len(NIH_FINDINGS))) < 0.3).astype(int)
    paths = []
    for init, noise in (("random", 3.0), ("barlowtwins", 0.7)):
        for fraction in (0.1, 1.0):
            run = tmp_path / init / f"frac{fraction}"
            run.mkdir(parents=True)
            scores = y + rng.normal(0, noise, y.shape)
            aucs = {name: float(roc_auc_score(y[:, j], scores[:, j])) for j, name in enumerate(NIH_FINDINGS)}
            (run / "metrics.json").write_text(json.dumps({
                "init": init, "fraction": fraction, "arch": "resnet18", "n_train_patients": 10, "n_train_images": 30,
                "selected_epoch": 1, "val_mean_auc": 0.5, "test_mean_auc": float(np.mean(list(aucs.values()))),
                "test_auc": aucs}))
            frame = pd.DataFrame({"image_index": [f"{i}.png" for i in range(n)], "patient_id": patients})
            for j, name in enumerate(NIH_FINDINGS):
                frame[f"true_{name}"] = y[:, j]
            for j, name in enumerate(NIH_FINDINGS):
                frame[f"score_{name}"] = scores[:, j]
            frame.to_csv(run / "predictions_test.csv", index=False)
            paths.append(run / "metrics.json")
    table = summarize(paths, tmp_path / "s.csv", tmp_path / "p.png", tmp_path / "d.csv", tmp_path / "s.md",
                      n_resamples=300, seed=0, baselines=["random"])
    assert (table["test_mean_auc_ci_low"] < table["test_mean_auc"]).all()
    assert (table["test_mean_auc"] < table["test_mean_auc_ci_high"]).all()
    diff = pd.read_csv(tmp_path / "d.csv")
    assert list(diff["init"]) == ["barlowtwins", "barlowtwins"] and list(diff["baseline"]) == ["random"] * 2
    assert (diff["ci_low"] > 0).all() and (diff["p_value"] < 0.01).all()
    md = (tmp_path / "s.md").read_text()
    assert "| barlowtwins - random | 10 % |" in md and "[" in md
    # the same scores for both inits: the paired difference is exactly 0 in every resample
    for fraction in (0.1, 1.0):
        src = tmp_path / "barlowtwins" / f"frac{fraction}"
        dst = tmp_path / "random" / f"frac{fraction}"
        (dst / "predictions_test.csv").write_text((src / "predictions_test.csv").read_text())
        data = json.loads((src / "metrics.json").read_text())
        data["init"] = "random"
        (dst / "metrics.json").write_text(json.dumps(data))
    summarize(paths, tmp_path / "s.csv", tmp_path / "p.png", tmp_path / "d.csv", n_resamples=100, baselines=["random"])
    same = pd.read_csv(tmp_path / "d.csv")
    assert (same[["difference", "ci_low", "ci_high"]] == 0).all().all() and (same["p_value"] == 1).all()


def test_runs_on_other_test_images_are_not_compared(tmp_path):
    from cxrssl.linear_eval.summary import bootstrap_runs

    paths = []
    for init, first in (("a", 0), ("b", 1)):
        run = tmp_path / init
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"init": init, "fraction": 1.0}))
        frame = pd.DataFrame({"image_index": [f"{i}.png" for i in range(first, first + 6)],
                              "patient_id": [str(i) for i in range(6)]})
        for name in NIH_FINDINGS:
            frame[f"true_{name}"] = [0, 1] * 3
            frame[f"score_{name}"] = np.linspace(0, 1, 6)
        frame.to_csv(run / "predictions_test.csv", index=False)
        paths.append(run / "metrics.json")
    with pytest.raises(BadInputError, match="share the test split"):
        bootstrap_runs(pd.DataFrame(), paths, 10, 0)


def test_batchnorm_recalibration_takes_the_statistics_of_the_training_images():
    from torch.utils.data import DataLoader, TensorDataset

    from cxrssl.linear_eval.train import recalibrate_batchnorm

    torch.manual_seed(0)
    net = build_resnet("resnet18")
    x = torch.randn(24, 3, 32, 32) * 3 + 5
    loader = DataLoader(TensorDataset(x, torch.zeros(24)), batch_size=8)  # equal batches: the mean of batch means is the mean
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_batchnorm(net, loader, torch.device("cpu")) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    first = net.bn1
    with torch.no_grad():
        h = net.conv1(x)
    torch.testing.assert_close(first.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    for k, v in net.state_dict().items():  # weights untouched, only statistics
        if k in weights:
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_recalibrate_bn_setting_changes_a_random_probe_and_writes_test_predictions(learnable, tmp_path):
    index_path, cache_path = learnable
    common = dict(index_path=index_path, cache_path=cache_path, init="random", fraction=1.0, arch="resnet18", seed=0)
    plain = run_linear_eval(out_dir=tmp_path / "plain", settings=fast_settings(epochs=2), **common)
    recal = run_linear_eval(out_dir=tmp_path / "recal", settings=fast_settings(epochs=2, recalibrate_bn=True), **common)
    assert plain["fingerprint"] != recal["fingerprint"] and plain["test_mean_auc"] != recal["test_mean_auc"]
    predictions = pd.read_csv(tmp_path / "recal" / "predictions_test.csv", dtype={"patient_id": str})
    assert len(predictions) == recal["n_test_images"]
    y = predictions[[f"true_{n}" for n in NIH_FINDINGS]].to_numpy()
    s = predictions[[f"score_{n}" for n in NIH_FINDINGS]].to_numpy()
    j = NIH_FINDINGS.index("Hernia")
    assert roc_auc_score(y[:, j], s[:, j]) == pytest.approx(recal["test_auc"]["Hernia"], abs=1e-6)
