"""Live tracking (cxrssl.tracking: dvclive, MLflow, TensorBoard) and the SSL kNN monitor (issue 14)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, TINY_CONFIG
from cxrssl import tracking
from cxrssl.classes import NIH_FINDINGS as NIH
from cxrssl.config import section_defaults
from cxrssl.ssl.monitor import knn_auc, knn_scores

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_tracking():
    before = tracking.current_settings()
    yield
    tracking.configure(before)


# --- the kNN monitor on synthetic embeddings -------------------------------------------------------

def _clusters(n_per: int, n_clusters: int, dim: int, noise: float, rng: np.random.Generator):
    """Well-separated clusters; cluster c has finding c (and finding c+1 for even c): multi-label."""
    centres = rng.normal(size=(n_clusters, dim)) * 10
    feats = np.concatenate([c + noise * rng.normal(size=(n_per, dim)) for c in centres])
    cluster = np.repeat(np.arange(n_clusters), n_per)
    labels = np.zeros((len(cluster), n_clusters + 1), np.float32)
    labels[np.arange(len(cluster)), cluster] = 1
    labels[np.arange(len(cluster)), cluster + 1] += (cluster % 2 == 0)
    return torch.tensor(feats, dtype=torch.float32), np.minimum(labels, 1)


def test_knn_monitor_is_perfect_on_separable_clusters():
    feats, labels = _clusters(60, 5, 16, 0.5, np.random.default_rng(1))
    order = np.random.default_rng(2).permutation(len(feats))
    bank, queries = feats[order[:200]], feats[order[200:]]
    bank_y, query_y = labels[order[:200]], labels[order[200:]]
    names = [f"f{j}" for j in range(labels.shape[1])]
    mean, aucs = knn_auc(bank, bank_y, queries, query_y, k=10, temperature=0.07, names=names)
    assert mean == 1.0 and all(v == 1.0 for v in aucs.values()), aucs


def test_knn_monitor_is_chance_on_random_embeddings():
    rng = np.random.default_rng(0)
    bank, queries = torch.randn(1000, 32), torch.randn(1000, 32)
    bank_y = (rng.random((1000, 6)) < 0.3).astype(np.float32)
    query_y = (rng.random((1000, 6)) < 0.3).astype(np.float32)
    mean, aucs = knn_auc(bank, bank_y, queries, query_y, k=20, temperature=0.07, names=list("abcdef"))
    assert abs(mean - 0.5) < 0.05, aucs


def test_knn_scores_are_the_temperature_weighted_mean_of_the_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([[1.0], [0.0], [1.0]])
    query = torch.tensor([[1.0, 1.0]])  # cos 0.707 to the first two, -0.707 to the third
    got = knn_scores(bank, labels, query, k=2, temperature=0.5)
    assert torch.allclose(got, torch.tensor([[0.5]]))  # equal similarity: equal weights
    got = knn_scores(bank, labels, query, k=3, temperature=0.5)
    w = np.exp(np.array([0.70710678, 0.70710678, -0.70710678]) / 0.5)
    assert torch.allclose(got, torch.tensor([[(w[0] + w[2]) / w.sum()]], dtype=torch.float32), atol=1e-6)


# --- the tracker back ends ----------------------------------------------------------------------

def _log_a_run(tmp_path: Path, backend: str, **extra) -> Path:
    run = tmp_path / "run"
    with tracking.start(run, "pretrain/demo", {"lr": 0.1, "block": {"arch": "resnet18"}},
                        settings={"backend": backend, "every_n_steps": 2, **extra}) as tracker:
        for step in range(1, 7):
            tracker.log_step({"loss": 1.0 / step, "lr": 0.1}, step)
        tracker.log_epoch({"knn_mean_auc": 0.75}, 6, prefix="monitor/")
        tracker.log_metric("monitor/undefined", float("nan"), 6)  # skipped, not an error
    return run


def test_dvclive_backend_writes_live_metrics_per_step(tmp_path):
    run = _log_a_run(tmp_path, "dvclive")
    live = run / "dvclive"
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["train"]["loss"] == pytest.approx(1 / 6) and summary["monitor"]["knn_mean_auc"] == 0.75
    loss = pd.read_csv(live / "plots/metrics/train/loss.tsv", sep="\t")
    assert loss["step"].tolist() == [1, 2, 4, 6]  # step 1, then every 2nd
    assert yaml.safe_load((live / "params.yaml").read_text())["block"]["arch"] == "resnet18"
    assert not (live / "dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()


def test_mlflow_backend_writes_a_file_store(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    _log_a_run(tmp_path, "mlflow", mlflow_uri=str(store))
    assert store.is_dir()
    assert list(store.glob("*/*/metrics/train/loss"))  # a file store: one folder per experiment and run
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name("pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 4, 6]
    assert run.data.metrics["monitor/knn_mean_auc"] == 0.75 and run.data.params["block/arch"] == "resnet18"


def test_tensorboard_backend_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _log_a_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 4, 6]
    assert events.Scalars("monitor/knn_mean_auc")[0].value == pytest.approx(0.75)


def test_none_backend_and_other_ranks_write_nothing(tmp_path):
    run = _log_a_run(tmp_path, "none")
    assert not run.exists()
    with tracking.start(tmp_path / "rank1", "pretrain/x", {"a": 1}, enabled=False,
                        settings={"backend": "dvclive"}) as tracker:
        tracker.log_epoch({"loss": 1.0}, 1)
    assert not (tmp_path / "rank1").exists()


def test_tracking_settings_are_checked():
    with pytest.raises(ValueError, match="backend"):
        tracking.configure({"backend": "wandb"})
    assert section_defaults("tracking")["backend"] == "dvclive"


# --- a tiny pretraining run: live metrics and the monitor ----------------------------------------

@pytest.fixture(scope="module")
def tiny_nih(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's NIH data at the tiny config's sizes, indexed and cached."""
    from cxrssl.data.nih import index_nih
    from cxrssl.demo.nih import make_nih

    folder = tmp_path_factory.mktemp("nih")
    demo, nih = TINY_CONFIG["demo"], TINY_CONFIG["nih"]
    make_nih(folder / "nih", n_images=demo["n_nih"], n_patients=demo["n_nih_patients"],
             image_size=demo["image_size"], seed=0)
    index_nih(folder / "nih", folder / "index.csv", folder / "cache.npy", folder / "quarantine.csv",
              nih["cache_size"])
    return folder / "index.csv", folder / "cache.npy"


def tiny_pretrain_settings(method: str = "barlowtwins", **over) -> dict:
    s = section_defaults("pretrain")
    tiny = {k: v for k, v in TINY_CONFIG["pretrain"].items() if k != "methods"}
    for key, value in tiny.items():
        s[key] = {**s[key], **value} if isinstance(value, dict) else value
    s.update({"monitor_every_epochs": 1, **over})
    return s


@pytest.fixture(scope="module")
def tiny_run(tiny_nih, tmp_path_factory) -> Path:
    from cxrssl.ssl.train import pretrain

    index, cache = tiny_nih
    run = tmp_path_factory.mktemp("project") / "results" / "pretrain" / "barlowtwins"
    tracking.configure({"backend": "dvclive", "every_n_steps": 1})
    try:
        pretrain(index, cache, run, tiny_pretrain_settings(), seed=0, device="cpu", threads=1)
    finally:
        tracking.configure({"backend": "none"})
    return run


def test_tiny_pretraining_logs_live_metrics_and_the_monitor(tiny_run):
    metrics = pd.read_csv(tiny_run / "metrics.csv")
    monitor = pd.read_csv(tiny_run / "monitor.csv")
    s = tiny_pretrain_settings()
    per_epoch = len(metrics) // s["epochs"]
    # the monitor ran after every epoch, gave AUCs in [0, 1] over findings that have both classes
    assert monitor["epoch"].tolist() == list(range(1, s["epochs"] + 1))
    assert monitor["step"].tolist() == [per_epoch * e for e in monitor["epoch"]]
    assert monitor["knn_mean_auc"].between(0, 1).all() and (monitor["n_findings"] > 0).all()
    live = tiny_run / "dvclive"
    loss = pd.read_csv(live / "plots/metrics/train/loss.tsv", sep="\t")
    assert loss["step"].tolist() == metrics["step"].tolist()
    np.testing.assert_allclose(loss["loss"], metrics["loss"], rtol=1e-6)  # the same numbers, not recomputed
    knn = pd.read_csv(live / "plots/metrics/monitor/knn_mean_auc.tsv", sep="\t")
    assert knn["step"].tolist() == monitor["step"].tolist()
    np.testing.assert_allclose(knn["knn_mean_auc"], monitor["knn_mean_auc"], rtol=1e-6)
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == int(metrics["step"].iloc[-1])
    assert yaml.safe_load((live / "params.yaml").read_text())["method"] == "barlowtwins"


def test_monitor_does_not_change_the_trained_weights(tiny_nih, tiny_run, tmp_path):
    from cxrssl.runtime import load_checkpoint
    from cxrssl.ssl.train import pretrain

    index, cache = tiny_nih
    pretrain(index, cache, tmp_path / "off", tiny_pretrain_settings(monitor_every_epochs=0), seed=0,
             device="cpu", threads=1)
    on = load_checkpoint(tiny_run / "backbone.pth", "test")
    off = load_checkpoint(tmp_path / "off" / "backbone.pth", "test")
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert pd.read_csv(tmp_path / "off" / "monitor.csv").empty
    assert not (tmp_path / "off" / "dvclive").exists()  # tracking off in this process


def _dvc_env(tmp: Path) -> dict:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the activated env
    return env


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_dvc_exp_show_and_plots_list_the_live_metrics(tiny_run, tmp_path):
    """The repository's dvc.yaml declares the live folders; DVC then lists what a run logged."""
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())
    live = "results/pretrain/barlowtwins/dvclive"
    metrics = [m for m in declared["metrics"] if m.startswith(live)]
    plots = [p for p in declared["plots"] if isinstance(p, dict) and any(str(k).startswith(live) for k in p)]
    assert metrics and plots, "dvc.yaml declares no live pretraining metrics/plots"
    project = tmp_path / "project"
    shutil.copytree(tiny_run, project / "results/pretrain/barlowtwins")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"metrics": metrics, "plots": plots}))
    env = _dvc_env(tmp_path)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "run"]):
        _run(cmd, project, env)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], project, env))
    workspace = next(e for e in shown if e["rev"] == "workspace")
    data = workspace["data"]["metrics"][f"{live}/metrics.json"]["data"]
    assert data["train"]["loss"] > 0 and 0 <= data["monitor"]["knn_mean_auc"] <= 1
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], project, env))
    assert not shown.get("errors"), shown["errors"]
    loss = [row for plot in shown["data"][f"{live}/plots/metrics/train/loss.tsv"]
            for row in plot["content"]["data"]["values"]]
    assert sorted(int(row["step"]) for row in loss) == pd.read_csv(tiny_run / "metrics.csv")["step"].tolist()


# --- the tiny demo DAG --------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_run_monitors_every_method_and_tracks_live(demo_run):
    for method in TINY_CONFIG["pretrain"]["methods"]:
        run = demo_run / "results" / "pretrain" / method
        monitor = pd.read_csv(run / "monitor.csv")
        assert len(monitor) >= 1 and monitor["knn_mean_auc"].between(0, 1).all(), method
        assert (run / "dvclive" / "metrics.json").is_file(), method
    for folder in ("linear_eval", "detection"):
        assert list((demo_run / "results" / folder).rglob("dvclive/metrics.json")), folder


# --- the other training loops log what they write to their own logs ----------------------------

def _live_series(live: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(live / "plots" / "metrics" / f"{name}.tsv", sep="\t")


def test_linear_evaluation_logs_its_history_live(tmp_path):
    from test_linear_eval import fast_settings, synthetic_images, synthetic_index, write_dataset

    from cxrssl.linear_eval import run_linear_eval

    index = synthetic_index(48, 3, 12)
    images = synthetic_images(index[list(NIH)].to_numpy(), np.random.default_rng(0))
    index_path, cache_path = write_dataset(tmp_path / "data", index, images)
    tracking.configure({"backend": "dvclive", "every_n_steps": 1})
    metrics = run_linear_eval(index_path=index_path, cache_path=cache_path, init="random", fraction=1.0,
                              arch="resnet18", seed=0, settings=fast_settings(epochs=2), out_dir=tmp_path / "run")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    live = tmp_path / "run" / "dvclive"
    for column in ("train_loss", "val_loss", "val_mean_auc", "lr"):
        series = _live_series(live, column)
        assert series["step"].tolist() == history["epoch"].tolist(), column
        np.testing.assert_allclose(series[column], history[column], rtol=1e-6)
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["final"]["test_mean_auc"] == pytest.approx(metrics["test_mean_auc"])
    assert len(_live_series(live, "train/loss")) > len(history)  # every step


def test_torchvision_detection_logs_its_train_log_live(tmp_path):
    from test_detection import make_split, tiny_settings

    from cxrssl.detection import train

    data = {split: make_split(tmp_path / "coco", split, n, seed) for split, n, seed in
            (("train", 8, 0), ("val", 4, 1), ("test", 2, 2))}
    tracking.configure({"backend": "dvclive", "every_n_steps": 1})
    train.train_detector(data["train"], data["val"], data["test"], tmp_path / "run", init="random", res=64, seed=0,
                         settings=tiny_settings(epochs=2), device="cpu")
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    live = tmp_path / "run" / "dvclive"
    loss = _live_series(live, "train/loss")
    assert loss["step"].tolist() == log["iter"].tolist()
    np.testing.assert_allclose(loss["loss"], log["loss"], rtol=1e-6)
    per_epoch = log.dropna(subset=["val_mAP50"])
    val = _live_series(live, "val_mAP50")
    assert val["step"].tolist() == per_epoch["iter"].tolist()
    np.testing.assert_allclose(val["val_mAP50"], per_epoch["val_mAP50"], rtol=1e-6)


@pytest.mark.mmdet
def test_mmdet_detection_logs_its_train_log_live(tmp_path):
    from test_mmdet import _require_mmdet, make_coco, params

    engine = _require_mmdet()
    jsons = make_coco(tmp_path / "data", sizes=(2, 2, 2))
    tracking.configure({"backend": "dvclive", "every_n_steps": 1})
    engine.train(jsons["train"], jsons["val"], jsons["test"], tmp_path / "run", init="random", res=64, seed=0,
                 settings=params(arch="resnet18", epochs=2, batch_size=2, warmup_iters=1, workers=0, score_thr=0.0))
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    live = tmp_path / "run" / "dvclive"
    loss = _live_series(live, "train/loss")
    assert loss["step"].tolist() == log["iter"].tolist()
    np.testing.assert_allclose(loss["loss"], log["loss"], rtol=1e-6)
    per_epoch = log.dropna(subset=["val_mAP50"])
    assert _live_series(live, "val_mAP50")["step"].tolist() == per_epoch["iter"].tolist()


@pytest.mark.slow
def test_changing_the_tracking_backend_reruns_nothing(demo_run, tiny_config, tmp_path):
    from conftest import snakemake, write_config

    config = dict(tiny_config, tracking={"backend": "mlflow", "every_n_steps": 5})
    out = snakemake(demo_run, "-n", configfile=write_config(tmp_path / "mlflow.yaml", config))
    assert "Nothing to be done" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]


def test_multimodal_pretraining_logs_its_metrics_live(tmp_path):
    from test_multimodal import tiny_settings

    from cxrssl.demo.nih import make_nih
    from cxrssl.demo.reports import make_reports
    from cxrssl.errors import Quarantine
    from cxrssl.multimodal.reports import load_reports, patient_split, write_pairs
    from cxrssl.multimodal.train import pretrain_multimodal

    records = []
    make_nih(tmp_path / "nih", n_images=30, n_patients=10, image_size=64, seed=3, on_image=records.append)
    make_reports(tmp_path / "reports", records, seed=3)
    mimic = tmp_path / "reports" / "mimic_cxr"
    write_pairs(patient_split(load_reports("mimic", mimic, Quarantine("skip")), 0.15, 0.0, seed=0),
                tmp_path / "pairs.csv")
    tracking.configure({"backend": "dvclive", "every_n_steps": 1})
    path = pretrain_multimodal(tmp_path / "pairs.csv", mimic, tmp_path / "run", tiny_settings(), seed=4,
                               device="cpu", threads=1)
    metrics = pd.read_csv(path.parent / "metrics.csv")
    loss = _live_series(tmp_path / "run" / "dvclive", "train/loss")
    assert loss["step"].tolist() == metrics["step"].tolist()
    np.testing.assert_allclose(loss["loss"], metrics["loss"], rtol=1e-6)
    val = pd.read_csv(path.parent / "val.csv")
    np.testing.assert_allclose(_live_series(tmp_path / "run" / "dvclive", "val/loss")["loss"], val["loss"], rtol=1e-6)
