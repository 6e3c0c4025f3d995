"""Shared fixtures: a tiny demo configuration and one end-to-end run of the whole DAG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"

# A demo small enough for a test: every stage runs, on a handful of images, for an epoch or two.
TINY_CONFIG = {
    "seed": 0,
    "torch_threads": 1,
    "results_dir": "results",
    "on_bad_input": "skip",
    "demo": {"enabled": True, "root": "data/demo", "n_nih": 48, "n_nih_patients": 16,
             "n_vindr_train": 36, "n_vindr_test": 12, "image_size": 128},
    "nih": {"root": "data/demo/nih", "cache_size": 40},
    "vindr": {"root": "data/demo/vindr", "layout": "physionet", "convert": {"size": 128},
              "split": {"val_fraction": 0.25}, "fusion": {"iou_thr": 0.6}},
    "pretrain": {"methods": ["barlowtwins", "vicreg", "gmml"], "batch_size": 16, "epochs": 2, "warmup_epochs": 1,
                 "image_size": 32, "workers": 0, "checkpoint_every": 2,
                 "barlowtwins": {"arch": "resnet18", "init": "random", "projector": [64, 64, 64]},
                 "vicreg": {"arch": "resnet18", "init": "random", "hidden_dim": 64, "output_dim": 64},
                 "gmml": {"arch": "vit_tiny_patch8", "init": "random"},
                 "multimodal": {"reports_root": "data/demo/reports/mimic_cxr", "arch": "resnet18", "init": "random",
                                "output_stride": 16, "image_size": 32, "text_encoder": "scratch", "vocab_size": 200,
                                "text_hidden": 16, "text_layers": 1, "text_heads": 2, "text_intermediate": 32,
                                "max_tokens": 48, "max_sentences": 6, "embed_dim": 16, "batch_size": 8, "epochs": 1,
                                "lr": 0.001, "lr_text": 0.001, "workers": 0, "checkpoint_every": 2}},
    "linear_eval": {"inits": ["random", "barlowtwins", "gmml"], "fractions": [0.5, 1.0], "arch": "resnet18",
                    "epochs": 2, "batch_size": 16, "image_size": 32, "workers": 0, "bootstrap": 50},
    "detection": {"arch": "resnet18", "inits": ["random", "barlowtwins"], "resolutions": [64],
                  "epochs": 2, "batch_size": 4, "lr": 0.005, "warmup_iters": 4, "workers": 0,
                  "rpn_proposals": 100, "rois_per_image": 64},
    "evaluation": {"bootstrap": 20},
    "heatmaps": {"method": "eigen", "n_images": 1},
    # segmentation (issue 12): the demo's lung masks, a ResNet and a ViT init
    "segmentation": {"sources": ["montgomery=data/demo/lungs/MontgomerySet",
                                 "shenzhen=data/demo/lungs/ChinaSet_AllFiles"],
                     "inits": ["random", "gmml"], "arch": "resnet18", "image_size": 32, "width": 16,
                     "epochs": 1, "batch_size": 8, "lr": 0.001, "n_bootstrap": 20},
    # multimodal (pretrain.multimodal above) is not in pretrain.methods here: tests/test_multimodal_dag.py adds it
    "zeroshot": {"layouts": ["nih"], "nih_boxes": "data/demo/reports/localization/nih/BBox_List_2017.csv",
                 "nih_images": "data/demo/reports/localization/images", "val_fraction": 0.4, "bootstrap": 20},
}


#: The PATH of a fresh login shell: no virtual environment, conda env or scripts folder on it.
BARE_PATH = "/usr/local/bin:/usr/bin:/bin"


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a newcomer's plain shell: system PATH only, nothing activated.

    Snakemake itself is started with this test session's interpreter (as `.venv/bin/snakemake`
    would be); the rules must find that interpreter on their own, not through PATH.
    """
    drop = {"VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "PYTHONHOME"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = BARE_PATH
    env.update(extra)
    return env


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, check: bool = True,
              timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile in ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
           "--configfile", str(configfile or workdir / "config.yaml"), "--cores", "2",
           *args]
    env = bare_env(CXRSSL_PROGRESS="0", PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-8000:]}")
    return proc


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return yaml.safe_load(yaml.safe_dump(TINY_CONFIG))


def _link_checkpoint(src: str, dst: str) -> None:
    """Copy a file, but hard-link checkpoints (``*.pth``): they are most of a run's bytes (~1 GB of
    the tiny run) and are only ever replaced whole (written to a temporary file, then renamed) or
    deleted, which leaves the other link untouched. Everything else is a real copy."""
    if src.endswith(".pth"):
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copy2(src, dst)


def _checkpoint_stamps(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*.pth"))}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, tiny_config) -> Path:
    """The whole DAG run once on the tiny demo config; tests must not modify this folder."""
    workdir = tmp_path_factory.mktemp("demo_run")
    write_config(workdir / "config.yaml", tiny_config)
    snakemake(workdir)
    yield workdir
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture()
def demo_copy(demo_run, tmp_path) -> Path:
    """A private copy of the finished run to modify (mtimes, symlinks and Snakemake metadata kept;
    checkpoints hard-linked by ``_link_checkpoint``), removed after the test.

    Its checkpoints share their bytes with ``demo_run``: a test that rewrote one in place (instead of
    replacing it) would change the shared run under every later test, so that is checked here.
    """
    stamps = _checkpoint_stamps(demo_run)
    target = tmp_path / "run"
    shutil.copytree(demo_run, target, symlinks=True, copy_function=_link_checkpoint)
    yield target
    shutil.rmtree(target, ignore_errors=True)  # ~100 MB a copy, even when the test failed
    assert _checkpoint_stamps(demo_run) == stamps, "a checkpoint of demo_run was rewritten in place through a copy"


def pytest_report_header(config) -> str:
    """Free space where the tests write: the end-to-end tests need several GB (a full run, its copies)."""
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"cxrssl: {free:.1f} GiB free in {tempfile.gettempdir()} (the end-to-end tests need ~10 GiB)"
