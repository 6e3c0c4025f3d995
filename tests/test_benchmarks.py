"""benchmarks/gpu.sh --dry: the GPU slot's script runs end to end on CPU and prints its one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

KEYS = {"dry", "gpus", "stages", "barlowtwins_images_per_s_loader", "barlowtwins_images_per_s_in_memory",
        "barlowtwins_loader_vs_in_memory", "gmml_images_per_s_loader", "gmml_images_per_s_in_memory",
        "input_path_loader_pairs_per_s_pipeline", "input_path_loader_pairs_per_s_reference", "input_path_loader_ratio",
        "detection_torchvision_iteration_s", "detection_stock_torchvision_iteration_s", "mmdet",
        "ablation_cam_s_per_image", "ddp_images_per_s", "goal_barlowtwins_rate", "goal_loader_not_bottleneck",
        "failed_stages"}
STAGES = {"barlowtwins", "gmml", "input_path", "detection", "ablation_cam"}


def test_gpu_sh_dry_runs_every_stage_and_prints_one_json_object(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_SH_OUT=str(tmp_path / "gpu.json"), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), "--dry"], capture_output=True, text=True,
                          env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # stdout is the JSON object and nothing else
    assert KEYS <= set(out), KEYS - set(out)
    assert out["dry"] is True and out["failed_stages"] == [], proc.stderr[-3000:]
    assert {k for k, v in out["stages"].items() if v["status"] == "ok"} == STAGES
    assert out["stages"]["ddp"]["status"].startswith("skipped")
    for key in ("barlowtwins_images_per_s_loader", "barlowtwins_images_per_s_in_memory", "gmml_images_per_s_loader",
                "input_path_loader_pairs_per_s_pipeline", "detection_torchvision_iteration_s",
                "ablation_cam_s_per_image"):
        assert isinstance(out[key], float) and out[key] > 0, key
    assert out["barlowtwins_loader_vs_in_memory"] == (out["barlowtwins_images_per_s_loader"]
                                                      / out["barlowtwins_images_per_s_in_memory"])
    assert out["goal_barlowtwins_rate"]["target_images_per_s"] == 1770
    assert out["goal_barlowtwins_rate"]["met"] is None  # a dry run decides no goal
    assert json.loads((tmp_path / "gpu.json").read_text()) == out
    assert not list(tmp_path.glob("cxrssl_gpu_sh.*"))  # its work folder is removed


def test_gpu_sh_stage_time_limit_reports_a_hung_stage(tmp_path):
    """A stage past its limit is killed and reported; the script still prints its JSON."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$1\" in *pretrain_throughput.py) exec sleep 30;; esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    script = (REPO / "benchmarks/gpu.sh").read_text().replace("=240", "=2")
    assert script.count("=2\n") + script.count("=2;") == 7
    (tmp_path / "benchmarks").mkdir()  # a copy without the Python benchmarks: the other stages fail fast
    (tmp_path / "benchmarks" / "gpu.sh").write_text(script)
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks/gpu.sh"), "--dry"], capture_output=True, text=True,
                          env=env, timeout=600)
    out = json.loads(proc.stdout)
    assert out["stages"]["barlowtwins"]["status"] == "timeout after 2 s"
    assert "barlowtwins" in out["failed_stages"]
    assert out["barlowtwins_images_per_s_loader"] is None
    assert out["stages"]["detection"]["status"].startswith("failed (exit")
    assert out["stages"]["detection"]["log_tail"]


def test_nih_scale_at_a_tiny_size(tmp_path):
    """benchmarks/nih_scale.py: the index finds every image of the synthetic tree, figures are positive."""
    out = tmp_path / "nih_scale.json"
    cmd = [sys.executable, str(REPO / "benchmarks/nih_scale.py"), "--n", "600", "--cache-sample", "100",
           "--distinct", "8", "--batch-size", "8", "--loader-workers", "0", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == res
    assert res["n"] == 600 and res["n_small"] == 37 and res["index_found_all"] is True
    assert res["index_large"]["images"] == 600 and res["index_small"]["images"] == 37
    tree = res["tree"]
    assert tree["folders"] == 12 and tree["train_val"] + tree["test"] == 600 and tree["test"] > 0
    assert res["cache_w1"]["images"] == 100 and res["cache_small_w1"]["images"] == 25
    assert abs(res["cache_bytes_per_image"] / res["cache_size"] ** 2 - 1) < 0.01  # rows + the .npy header
    assert res["cache_speedup_w1"] == 1.0 and res["cache_speedup_w2"] > 0
    positive = ["index_time_ratio", "index_rss_ratio", "index_rss_kb_per_image", "cache_images_per_s_w1",
                "cache_images_per_s_w2", "cache_extrapolated_s_w1", "cache_extrapolated_gb", "cache_rss_ratio",
                "cache_main_rss_ratio", "total_s"]
    for w in (0, 1):
        positive += [f"loader_{p}_w{w}" for p in ("cache", "pil", "cache_per_worker", "pil_per_worker", "ratio")]
    for key in positive:
        assert isinstance(res[key], float) and res[key] > 0, key
    for r in (res["index_large"], res["index_small"], res["cache_w1"], res["cache_w2"]):
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0
    assert res["tree"]["disk_mb"] < res["tree"]["apparent_gb"] * 1024  # hard links: the names share 8 files
    assert not list(tmp_path.glob("cxrssl_nih_scale_*"))  # its work folder is removed


def test_convert_dicom_benchmark_prints_one_json_object_of_consistent_figures(tmp_path):
    """benchmarks/convert_dicom.py at a tiny size: its keys, and each figure consistent with its parts."""
    cmd = [sys.executable, str(REPO / "benchmarks/convert_dicom.py"), "--n-files", "3", "--height", "400", "--width",
           "320", "--size", "128", "--j2k-every", "2", "--memory-factor", "2", "--json", str(tmp_path / "c.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TMPDIR=str(tmp_path)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # the table goes to stderr
    assert json.loads((tmp_path / "c.json").read_text()) == out
    assert out["n_files"] == 3 and out["j2k_files"] == 2 and out["bits"] == [12, 14, 16]
    one, two = out["pipeline"]["1"], out["pipeline"]["2"]
    many_one, many_two = out["pipeline_many"]["1"], out["pipeline_many"]["2"]
    assert one["converted"] == two["converted"] == 3 and many_one["converted"] == many_two["converted"] == 6
    assert out["cached"]["converted"] == 0
    assert out["pipeline_vs_naive_cpu"] == out["naive"]["cpu_s"] / one["cpu_s"]
    assert out["images_per_s_per_core_pipeline"] == pytest.approx(1 / out["cpu_s_per_image_pipeline"])
    assert out["speedup_1_to_workers"] == {"2": one["seconds"] / two["seconds"]}
    assert out["cpu_s_per_extra_image_pipeline"] == pytest.approx((many_one["cpu_s"] - one["cpu_s"]) / 3)
    per_file = {w: (out["pipeline_many"][w]["seconds"] - out["pipeline"][w]["seconds"]) / 3 for w in ("1", "2")}
    assert out["speedup_1_to_workers_per_extra_file"]["2"] == pytest.approx(per_file["1"] / per_file["2"])
    hours = out["hours_18000_files"]  # the 3-file run, then 17,997 files at the cost of one more
    assert hours["1_worker"] == pytest.approx((one["seconds"] + per_file["1"] * 17997) / 3600)
    assert hours["2_workers"] == pytest.approx((two["seconds"] + per_file["2"] * 17997) / 3600)
    assert hours["2_workers_cpu_bound"] == pytest.approx(18000 * out["cpu_s_per_extra_image_pipeline"] / 2 / 3600)
    # the JPEG 2000 files were decoded at level 1 (200 x 160 covers 128 x 102), close to the full decode
    assert out["j2k_reduced_shapes"] == [[200, 160]]
    assert 0 < out["j2k_png_mean_abs_diff_8bit"] <= 1.0 and out["j2k_png_max_abs_diff_8bit"] <= 6
    assert out["j2k_reduced_vs_full_decode_cpu"] > 0 and out["j2k_reduced_vs_full_conversion_cpu"] > 0
    assert out["memory_mb"]["files_many"] == 6
    assert not list(tmp_path.glob("cxrssl_bench_*"))  # its work folder is removed
