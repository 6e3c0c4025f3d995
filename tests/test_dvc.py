"""DVC on top of Snakemake (issue 5): push/pull round trip, metrics diff, experiments, env pins.

The slow tests build a git repository from this checkout's files (tracked + untracked, not
ignored), drop the finished ``demo_run`` into it and record it with ``dvc commit`` (the stages'
commands are Snakemake targets, so running them again would only redo demo_run). The remote is
the default one in .dvc/config, a folder beside the checkout, here inside the test's tmp folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO
from cxrssl.errors import BadInputError
from cxrssl.tracking import collect_metrics, fraction_key, paths_under, write_metrics

# --- fast unit tests of cxrssl.tracking ----------------------------------------------------------


def _eval_metrics(path: Path, map50=0.25, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mAP50": map50, "mAP": 0.1, "mAP75": 0.05, "voc_mAP": 0.3, **extra}))
    return path


def _linear_metrics(path: Path, init="barlowtwins", fraction=0.01, auc=0.71) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"init": init, "fraction": fraction, "test_mean_auc": auc, "val_mean_auc": 0.7}))
    return path


def test_collect_metrics_nests_runs_under_dot_free_names(tmp_path):
    det = _eval_metrics(tmp_path / "evaluation/torchvision/barlowtwins_640px_seed0/metrics.json", map50=0.3071234567)
    nan = _eval_metrics(tmp_path / "evaluation/mmdet/random_224px_seed1/metrics.json", map50=None)
    lin = _linear_metrics(tmp_path / "linear_eval/barlowtwins/frac0.01/metrics.json")
    out = tmp_path / "metrics.json"
    write_metrics([det, nan], [lin], out)
    metrics = json.loads(out.read_text())
    assert metrics["detection"]["torchvision"]["barlowtwins_640px_seed0"] == {
        "mAP50": 0.307123, "mAP": 0.1, "mAP75": 0.05, "voc_mAP": 0.3}
    assert metrics["detection"]["mmdet"]["random_224px_seed1"]["mAP50"] is None
    assert metrics["linear_eval"] == {"barlowtwins": {"frac0_01": {"test_mean_auc": 0.71, "val_mean_auc": 0.7}}}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"mAP50": 0.1}', "missing ['mAP', 'mAP75', 'voc_mAP']"),
    ('{"mAP50": "high", "mAP": 0, "mAP75": 0, "voc_mAP": 0}', "mAP50 is not a number"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_detection_metrics_name_the_file(tmp_path, content, message):
    path = tmp_path / "evaluation/torchvision/random_64px_seed0/metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(BadInputError, match=re.escape(message)) as err:
        collect_metrics([path])
    assert err.value.item == str(path)


def test_detection_metrics_outside_a_run_folder_and_duplicates_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="not inside an evaluation run folder"):
        collect_metrics([_eval_metrics(tmp_path / "somewhere/metrics.json")])
    one = _linear_metrics(tmp_path / "a/metrics.json")
    two = _linear_metrics(tmp_path / "b/metrics.json")
    with pytest.raises(BadInputError, match="a second metrics file for linear-evaluation run barlowtwins/frac0_01"):
        collect_metrics([], [one, two])
    with pytest.raises(BadInputError, match="bad fraction"):
        collect_metrics([], [_linear_metrics(tmp_path / "c/metrics.json", fraction=0)])


@given(st.floats(min_value=1e-6, max_value=1.0, allow_nan=False))
def test_fraction_key_is_dot_free_and_round_trips(fraction):
    key = fraction_key(fraction)
    assert "." not in key and "e" not in key
    assert math.isclose(float(key.removeprefix("frac").replace("_", ".")), fraction, rel_tol=1e-9)


def test_paths_under_keeps_first_then_inside_paths_once():
    paths = ["results/prepare/a.csv", "results/prepareX/b.csv", "data/demo/m.json", "results/prepare/c.csv"]
    assert paths_under(paths, ["results/prepare"], first=["results/prepare/c.csv", "x"]) == [
        "results/prepare/c.csv", "x", "results/prepare/a.csv"]


# --- environments -----------------------------------------------------------------------------------


def _pip_pins(env_file: Path) -> list[str]:
    deps = yaml.safe_load(env_file.read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)


def test_conda_envs_pin_what_pyproject_pins():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _pip_pins(REPO / "envs/cxrssl.yaml") == project["dependencies"]
    mmdet = _pip_pins(REPO / "envs/mmdet.yaml")
    assert mmdet[: len(project["dependencies"])] == project["dependencies"]
    assert set(project["optional-dependencies"]["mmdet"]) <= set(mmdet)
    # opencv-python (pulled by mmdet) and -headless share cv2/: same version
    versions = {p.split("==")[0]: p.split("==")[1] for p in mmdet if "==" in p}
    assert versions["opencv-python"] == versions["opencv-python-headless"]
    for name in ("cxrssl", "mmdet"):
        assert os.access(REPO / f"envs/{name}.post-deploy.sh", os.X_OK)


# --- DVC round trip on the finished demo run ------------------------------------------------------


def _env(tmp: Path) -> dict:
    env = dict(os.environ, CXRSSL_PROGRESS="0", PYTHONHASHSEED="0", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
               GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.org",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.org")
    # DVC is run as its users run it: in an activated environment (its bin first on PATH), since
    # dvc.yaml stages call `snakemake`. The rules themselves do not rely on PATH (test_workflow).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


def _checkout_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.lexists(REPO / p)]


def _copy_checkout(dest: Path) -> None:
    for rel in _checkout_files():
        src, dst = REPO / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)


def _snakemake_dry_run(workdir: Path, env: dict) -> str:
    proc = _run([sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "--directory", str(workdir),
                 "-n", "--cores", "1"], workdir, env, timeout=600)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dvc_project(demo_run, tmp_path_factory):
    """A committed git+DVC project holding the finished tiny demo run, pushed to the default remote."""
    tmp = tmp_path_factory.mktemp("dvc")
    project = tmp / "project"
    _copy_checkout(project)
    shutil.copy2(demo_run / "config.yaml", project / "config.yaml")
    # real copies, not demo_copy's hard links: DVC takes a file with other links for a cache link and
    # relinks it, which renews its mtime and makes Snakemake retrain its consumers
    for name in ("data", "results", ".snakemake/metadata"):
        shutil.copytree(demo_run / name, project / name, symlinks=True, dirs_exist_ok=True)
    env = _env(tmp)
    _run(["git", "init", "-q"], project, env)
    _run(["git", "add", "-A"], project, env)
    _run(["git", "commit", "-q", "-m", "checkout"], project, env)
    # Nothing to recompute: record the existing outputs as the stages' results.
    _run(["dvc", "commit", "--force"], project, env)
    status = _run(["dvc", "status"], project, env).stdout
    assert "up to date" in status, status
    _run(["dvc", "push"], project, env)
    _run(["git", "add", "dvc.lock"], project, env)
    _run(["git", "commit", "-q", "-m", "demo run"], project, env)
    yield project, env
    shutil.rmtree(tmp, ignore_errors=True)  # the project, its cache, the remote and the clone: ~5 GB


@pytest.mark.slow
def test_pull_into_a_fresh_clone_needs_no_rerun(dvc_project, tmp_path):
    project, env = dvc_project
    # the default remote ../../cxrssl-dvc-storage is a folder beside the checkout
    assert any((project.parent / "cxrssl-dvc-storage").rglob("*")), "dvc push wrote nothing to the default remote"
    clone = project.parent / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "results/pretrain").exists()
    _run(["bash", "scripts/dvc_pull.sh"], clone, env)
    out = _snakemake_dry_run(clone, env)
    assert "Nothing to be done" in out, out[-5000:]
    checkpoints = sorted(p.relative_to(project) for p in (project / "results").rglob("*.pth"))
    assert Path("results/pretrain/barlowtwins/backbone.pth") in checkpoints
    assert len([p for p in checkpoints if p.name == "best.pth"]) == 2
    for rel in checkpoints:
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    assert "up to date" in _run(["dvc", "status"], clone, env).stdout


@pytest.mark.slow
def test_metrics_and_plots_show_the_headline_numbers(dvc_project):
    project, env = dvc_project
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], project, env).stdout)
    metrics = shown[""]["data"]["results/metrics.json"]["data"]
    assert set(metrics["detection"]["torchvision"]) == {"random_64px_seed0", "barlowtwins_64px_seed0"}
    assert set(metrics["linear_eval"]["barlowtwins"]) == {"frac0_5", "frac1_0"}
    shown = json.loads(_run(["dvc", "plots", "show", "--json"], project, env, timeout=300).stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    expected = {"pretraining_loss": "loss", "linear_eval_auc": "test_mean_auc", "detection_map50": "mAP50"}
    assert set(expected) <= set(plots), list(plots)
    for name, column in expected.items():
        rows = plots[name][0]["content"]["data"]["values"]
        assert rows and all(column in row for row in rows), (name, rows[:2])


@pytest.mark.slow
def test_exp_run_with_a_changed_setting_reruns_its_stage_only_and_diffs_metrics(dvc_project, demo_run):
    """`dvc exp run -S` on a detection-stage setting. The evaluation IoU keeps the test quick (only
    evaluation reruns); `-S config.yaml:detection.lr=0.02` takes the same path through config.yaml
    and Snakemake's params trigger (tests/test_workflow.py checks which jobs that reruns)."""
    project, env = dvc_project
    backbone = "results/pretrain/barlowtwins/backbone.pth"
    before = json.loads((project / "results/metrics.json").read_text())
    # "+": the tiny config.yaml does not spell out voc_iou (its default, 0.4, comes from the schema)
    out = _run(["dvc", "exp", "run", "-S", "config.yaml:+evaluation.voc_iou=0.5", "metrics"], project, env, timeout=1500)
    log = out.stdout + out.stderr
    assert "Running stage 'detection'" in log and "Running stage 'metrics'" in log, log[-5000:]
    assert "Running stage 'pretrain'" not in log and "Running stage 'linear_eval'" not in log, log[-5000:]
    # -S edited config.yaml, and Snakemake reran evaluation only
    assert yaml.safe_load((project / "config.yaml").read_text())["evaluation"]["voc_iou"] == 0.5
    assert "rule evaluate:" in log and "rule train_detector:" not in log, log[-5000:]
    # persist: true kept what did not change
    assert (project / backbone).read_bytes() == (demo_run / backbone).read_bytes()
    params = json.loads(_run(["dvc", "params", "diff", "--json"], project, env).stdout)
    assert params["config.yaml"]["evaluation.voc_iou"] == {"old": None, "new": 0.5}
    diff = json.loads(_run(["dvc", "metrics", "diff", "--all", "--json"], project, env).stdout)
    changes = diff["results/metrics.json"]
    for run in ("random_64px_seed0", "barlowtwins_64px_seed0"):
        for key in ("mAP50", "voc_mAP"):
            entry = changes[f"detection.torchvision.{run}.{key}"]
            assert entry["old"] == before["detection"]["torchvision"][run][key]
        assert changes[f"detection.torchvision.{run}.mAP50"]["new"] == changes[f"detection.torchvision.{run}.mAP50"]["old"]
    for init in ("random", "barlowtwins"):
        entry = changes[f"linear_eval.{init}.frac1_0.test_mean_auc"]
        assert entry["old"] == entry["new"] == before["linear_eval"][init]["frac1_0"]["test_mean_auc"]
    # the experiment is recorded with its params and metrics
    shown = _run(["dvc", "exp", "show", "--json"], project, env).stdout
    assert "voc_iou" in shown and "mAP50" in shown
