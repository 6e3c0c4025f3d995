"""mmdet detection engine: config equivalence, every shared setting reaching both engines, the
common LR schedule and precision policy, class table, backbone loading, a tiny training run through
the shared evaluation, the CAM wrapper, refusal of malicious checkpoints and stored config code, the
missing-mmcv message and the mmcv build recipe.

Tests that need mmcv's compiled ops are marked ``mmdet`` and skipped only when those are not
importable (CI installs the prebuilt wheel from ../shared/wheels/).
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrssl.classes import VINDR_CLASSES, coco_categories
from cxrssl.config import section_defaults
from cxrssl.detection import mmcv_build
from cxrssl.detection.engines import RUN_SETTINGS, VIT_SETTINGS, training_settings
from cxrssl.detection.mmdet_config import BEST_METRIC, SCHEDULER_TYPE, build_config
from cxrssl.errors import BadInputError
from payloads import check_payload_is_live, malicious_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = ("mmcv with compiled ops (mmcv.ops), mmengine or mmdet is not installed: "
               "`make mmcv` or `make install-mmdet MMCV_WHEEL=...`")


def _require_mmdet():
    pytest.importorskip("mmcv.ops", reason=SKIP_REASON)
    pytest.importorskip("mmdet", reason=SKIP_REASON)
    return importlib.import_module("cxrssl.detection.mmdet_engine")


@pytest.fixture(scope="module")
def engine():
    return _require_mmdet()


def params(**overrides):
    p = dict(section_defaults("detection"))
    p.update(overrides)
    return p


def make_coco(root: Path, sizes=(2, 2, 2), side=64, seed=0, names=None) -> dict[str, Path]:
    """Grey PNGs with bright boxes and COCO JSONs laid out like the pipeline's (file_name relative)."""
    rng = np.random.default_rng(seed)
    (root / "images_64px_8bit").mkdir(parents=True, exist_ok=True)
    cats = coco_categories()
    if names is not None:
        cats = [dict(c, name=n) for c, n in zip(cats, names)]
    out = {}
    for split, n in zip(("train", "val", "test"), sizes):
        images, anns = [], []
        for i in range(n):
            h, w = side, side * 3 // 4 if i % 2 else side
            arr = (rng.random((h, w)) * 60).astype(np.uint8)
            for _ in range(2 if i % 3 != 2 else 0):  # every third image has no box
                bw, bh = (int(v) for v in rng.integers(12, 24, 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                arr[y:y + bh, x:x + bw] = 220
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.integers(1, 15)),
                             "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh),
                             "iscrowd": 0})
            name = f"images_64px_8bit/{split}{i}.png"
            Image.fromarray(arr, mode="L").save(root / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h, "vindr_id": f"{split}{i}"})
        path = root / f"coco_{split}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        out[split] = path
    return out


def save_torchvision_backbone(arch: str, path: Path) -> dict:
    """What Barlow Twins pretraining exports: a torchvision ResNet state dict without fc."""
    torch.manual_seed(1)
    state = {k: v for k, v in getattr(torchvision.models, arch)().state_dict().items() if not k.startswith("fc.")}
    torch.save(state, path)
    return state


# --- config equivalence (no mmcv needed) -----------------------------------------------------------

def test_config_has_the_papers_schedule_and_pipeline(tmp_path):
    p = params()  # schema defaults = the paper's values
    cfg = build_config(p, train_json=tmp_path / "coco_train.json", val_json=tmp_path / "coco_val.json",
                       test_json=tmp_path / "coco_test.json", work_dir=tmp_path / "w", res=640,
                       backbone_checkpoint="/ckpt/backbone.pth", seed=3)
    opt = cfg["optim_wrapper"]["optimizer"]
    assert (opt["type"], opt["lr"], opt["momentum"], opt["weight_decay"]) == ("SGD", 0.005, 0.9, 1e-4)
    assert cfg["optim_wrapper"]["type"] == "OptimWrapper"  # precision lives in the detector type
    (sched,) = cfg["param_scheduler"]
    assert (sched["type"], sched["lr"], sched["min_lr"], sched["warmup_iters"], sched["epochs"]) == \
        (SCHEDULER_TYPE, 0.005, 1e-4, 500, 50)
    assert sched["convert_to_iter_based"] is True and cfg["default_hooks"]["checkpoint"] is None
    assert cfg["train_cfg"]["max_epochs"] == 50 and cfg["train_dataloader"]["batch_size"] == 32
    train_pipe = {s["type"]: s for s in cfg["train_dataloader"]["dataset"]["pipeline"]}
    assert train_pipe["Resize"]["scale"] == (640, 640) and train_pipe["Resize"]["keep_ratio"] is True
    assert train_pipe["RandomFlip"]["prob"] == 0.5
    test_pipe = {s["type"]: s for s in cfg["test_dataloader"]["dataset"]["pipeline"]}
    assert test_pipe["Resize"]["scale"] == (640, 640) and "RandomFlip" not in test_pipe
    pre = cfg["model"]["data_preprocessor"]
    assert pre["mean"] == [123.675, 116.28, 103.53] and pre["std"] == [58.395, 57.12, 57.375]
    assert pre["bgr_to_rgb"] is True and pre["pad_size_divisor"] == 32
    bb = cfg["model"]["backbone"]
    assert (bb["depth"], bb["frozen_stages"], bb["norm_eval"]) == (50, 1, True)
    assert bb["init_cfg"] == {"type": "Pretrained", "checkpoint": "/ckpt/backbone.pth"}
    assert cfg["model"]["neck"]["in_channels"] == [256, 512, 1024, 2048]
    assert cfg["model"]["roi_head"]["bbox_head"]["num_classes"] == 14
    assert cfg["model"]["test_cfg"]["rcnn"]["score_thr"] == 0.001
    assert BEST_METRIC == "coco/bbox_mAP_50"
    assert cfg["model"]["type"] == "CxrsslFasterRCNN" and cfg["model"]["autocast_device"] is None  # CPU
    rpn, rcnn = cfg["model"]["train_cfg"]["rpn"], cfg["model"]["train_cfg"]["rcnn"]
    assert rpn["assigner"]["min_pos_iou"] == 0.3 and rcnn["sampler"]["num"] == 512
    assert cfg["model"]["roi_head"]["bbox_roi_extractor"]["roi_layer"]["sampling_ratio"] == 0
    assert cfg["model"]["rpn_head"]["loss_bbox"]["type"] == cfg["model"]["roi_head"]["bbox_head"]["loss_bbox"][
        "type"] == "L1Loss"
    for split in ("train", "val", "test"):
        ds = cfg[f"{split}_dataloader"]["dataset"]
        assert ds["metainfo"]["classes"] == VINDR_CLASSES
        assert ds["data_root"] == str(tmp_path) and ds["ann_file"] == f"coco_{split}.json"
        assert ds["filter_cfg"]["filter_empty_gt"] is False  # default train_on_empty: true
    paper = build_config(params(train_on_empty=False), train_json=tmp_path / "coco_train.json",
                         val_json=tmp_path / "coco_val.json", test_json=tmp_path / "coco_test.json",
                         work_dir=tmp_path / "w", res=640, backbone_checkpoint=None, seed=3)
    assert paper["train_dataloader"]["dataset"]["filter_cfg"] == {"filter_empty_gt": True, "min_size": 32}
    assert paper["test_dataloader"]["dataset"]["filter_cfg"]["filter_empty_gt"] is False
    assert cfg["randomness"]["seed"] == 3


@pytest.mark.parametrize("norm,expected", [("batchnorm", "BN"), ("groupnorm", "GN")])
def test_random_init_keeps_normalisation_trainable(tmp_path, norm, expected):
    cfg = build_config(params(arch="resnet18", random_init_norm=norm, warmup_iters=0), train_json=tmp_path / "a.json",
                       val_json=tmp_path / "b.json", test_json=tmp_path / "c.json", work_dir=tmp_path, res=224,
                       backbone_checkpoint=None, seed=0)
    bb = cfg["model"]["backbone"]
    assert (bb["depth"], bb["frozen_stages"], bb["norm_eval"], bb["init_cfg"]) == (18, -1, False, None)
    assert bb["norm_cfg"]["type"] == expected and bb["norm_cfg"]["requires_grad"] is True
    assert cfg["model"]["neck"]["in_channels"] == [64, 128, 256, 512]
    assert [(s["type"], s["warmup_iters"]) for s in cfg["param_scheduler"]] == [(SCHEDULER_TYPE, 0)]


# --- missing mmcv ----------------------------------------------------------------------------------

def test_import_without_mmcv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv.ops", None)  # makes `import mmcv.ops` raise ImportError
    monkeypatch.delitem(sys.modules, "cxrssl.detection.mmdet_engine", raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module("cxrssl.detection.mmdet_engine")
    assert type(info.value).__name__ == "MmdetUnavailableError"
    message = str(info.value)
    assert "make mmcv" in message and "make install-mmdet MMCV_WHEEL=" in message and "mmcv.ops" in message
    sys.modules.pop("cxrssl.detection.mmdet_engine", None)


def test_script_help_needs_no_mmcv(monkeypatch):
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['mmcv'] = None; "
                          f"sys.argv = ['train_detector.py', '--help']; exec(open({str(ROOT / 'scripts/train_detector.py')!r}).read())"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--engine {torchvision,mmdet}" in out.stdout and "--warmup-iters" in out.stdout and "--inits" not in out.stdout


# --- mmcv build recipe -----------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["x = 1\n", "-std=c++14", "-std=c++17", "'-O3'", "/std:c++17", "-std=c++11",
                                 "c++14", " "]), max_size=12))
def test_patch_cxx_standard_only_touches_14_and_17(parts):
    text = "".join(parts)
    new, count = mmcv_build.patch_cxx_standard(text)
    assert count == sum(p in ("-std=c++14", "-std=c++17", "/std:c++17") for p in parts)
    assert "-std=c++14" not in new and "-std=c++17" not in new and "/std:c++17" not in new
    assert new.count("-std=c++11") == text.count("-std=c++11")


def test_patch_setup_py_fake_file(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text("extra_compile_args = {'cxx': ['-std=c++14']}\n"
                     "if is_torch2: cxx = ['-std=c++17']\nmsvc = ['/std:c++14']\n")
    assert mmcv_build.patch_setup_py(setup) == 3
    text = setup.read_text()
    assert text.count("-std=c++20") == 2 and "/std:c++20" in text and "c++14" not in text
    assert mmcv_build.patch_setup_py(setup) == 0  # rerun: already patched
    other = tmp_path / "other.py"
    other.write_text("setup(name='x')\n")
    with pytest.raises(RuntimeError, match="no -std=c\\+\\+14"):
        mmcv_build.patch_setup_py(other)


def test_cuda_only_with_nvcc_and_cuda_torch():
    assert mmcv_build.want_cuda("auto", "/usr/bin/nvcc", "12.4") is True
    assert mmcv_build.want_cuda("auto", None, "12.4") is False
    assert mmcv_build.want_cuda("auto", "/usr/bin/nvcc", None) is False
    assert mmcv_build.want_cuda("no", "/usr/bin/nvcc", "12.4") is False
    with pytest.raises(RuntimeError, match="nvcc"):
        mmcv_build.want_cuda("yes", None, "12.4")
    env = mmcv_build.build_environment({"PATH": "/bin"}, cuda=False, jobs=2, overlay=Path("/o"))
    assert env["MMCV_WITH_OPS"] == "1" and env["FORCE_CUDA"] == "0" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["PYTHONPATH"] == "/o" and env["PATH"].startswith("/o/bin") and env["MAX_JOBS"] == "2"
    assert mmcv_build.build_environment({}, cuda=True, jobs=4, overlay=None)["FORCE_CUDA"] == "1"


def test_build_mmcv_steps_with_a_fake_sdist(tmp_path, monkeypatch):
    src = tmp_path / "pkg" / "mmcv-2.1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text("args = ['-std=c++14']\n")
    sdist = tmp_path / "mmcv-2.1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="mmcv-2.1.0")
    monkeypatch.setattr(mmcv_build, "find_nvcc", lambda: None)
    calls = []

    def fake_run(cmd, env=None):
        calls.append((list(cmd), env))
        sub = cmd[cmd.index("pip") + 2]  # python -m pip --disable-pip-version-check <sub>
        if sub == "download":
            (Path(cmd[cmd.index("-d") + 1]) / "mmcv-2.1.0.tar.gz").write_bytes(sdist.read_bytes())
        if sub == "wheel":
            setup = Path(cmd[-1]) / "setup.py"
            assert "-std=c++20" in setup.read_text()  # patched before the build
            (Path(cmd[cmd.index("-w") + 1]) / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"w")

    wheel = mmcv_build.build_mmcv(tmp_path / "out", tmp_path / "work", jobs=2, run=fake_run)
    assert wheel.name == "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl" and wheel.parent == (tmp_path / "out").resolve()
    download = calls[0][0]
    assert download[-3:-1] == ["mmcv==2.1.0", "-d"] and "--no-binary" in download
    build_cmd, build_env = calls[-1]
    assert "--no-build-isolation" in build_cmd and "--no-deps" in build_cmd
    assert build_env["MMCV_WITH_OPS"] == "1" and build_env["FORCE_CUDA"] == "0"
    if not mmcv_build._setuptools_ok():  # the env's setuptools is too new: an overlay with <70
        install = calls[1][0]
        assert "--target" in install and "setuptools<70" in install
        assert build_env["PYTHONPATH"].split(":")[0] == install[install.index("--target") + 1]


# --- with mmdet ------------------------------------------------------------------------------------

@pytest.mark.mmdet
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_barlowtwins_backbone_loads_without_missing_or_unexpected_keys(engine, tmp_path, arch, caplog):
    path = tmp_path / "backbone.pth"
    state = save_torchvision_backbone(arch, path)
    assert engine.backbone_key_mismatch(state, arch) == ([], [], [])
    assert engine.prepare_backbone_checkpoint(str(path), arch, tmp_path) == str(path)  # used unchanged
    # Through the real mechanism (init_cfg Pretrained); mmengine logs mismatches as a warning only.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = engine.current_logger()
    logger.addHandler(handler)
    try:
        model = engine.load_backbone_via_init_cfg(path, arch)
    finally:
        logger.removeHandler(handler)
    messages = "\n".join(r.getMessage() for r in records)
    assert "load model from" in messages and "do not match" not in messages
    loaded = model.state_dict()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.mmdet
def test_unfit_or_wrapped_backbone_checkpoints(engine, tmp_path):
    path = tmp_path / "r18.pth"
    state = save_torchvision_backbone("resnet18", path)
    with pytest.raises(ValueError, match="does not fit mmdet's ResNet-50.*missing"):
        engine.prepare_backbone_checkpoint(str(path), "resnet50", tmp_path)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()},
                "fc.weight": torch.zeros(1)} | {}, wrapped)
    out = engine.prepare_backbone_checkpoint(str(wrapped), "resnet18", tmp_path / "w")
    assert out == str(tmp_path / "w" / "backbone_init.pth")
    assert set(torch.load(out, weights_only=True)) == set(state)


@pytest.mark.mmdet
def test_class_table_passes_through_exactly(engine, tmp_path):
    jsons = make_coco(tmp_path, sizes=(3, 1, 1))
    cfg = build_config(params(arch="resnet18"), train_json=jsons["train"], val_json=jsons["val"],
                       test_json=jsons["test"], work_dir=tmp_path / "w", res=64, backbone_checkpoint=None, seed=0)
    from mmdet.registry import DATASETS

    for split in ("train", "test"):
        ds = DATASETS.build(cfg[f"{split}_dataloader"]["dataset"])
        assert ds.metainfo["classes"] == VINDR_CLASSES
        assert ds.cat2label == {i + 1: i for i in range(14)}  # COCO id k -> label k-1, none dropped
    test_ds = DATASETS.build(cfg["test_dataloader"]["dataset"])
    assert len(test_ds) == 1  # the no-box image is kept in val/test
    # The original study's defect: "Nodule_Mass" in one place and "Nodule/Mass" in the other.
    bad = make_coco(tmp_path / "bad", sizes=(1, 1, 1),
                    names=[n.replace("/", "_") for n in VINDR_CLASSES])
    with pytest.raises(ValueError, match="missing \\['Nodule/Mass'\\], unexpected \\['Nodule_Mass'\\]"):
        engine.check_coco_json(bad["train"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    engine = _require_mmdet()
    from cxrssl.utils import setup_logging

    root = tmp_path_factory.mktemp("mmdet_run")
    jsons = make_coco(root / "data", sizes=(2, 2, 2))
    backbone = root / "backbone.pth"
    save_torchvision_backbone("resnet18", backbone)
    log_file = root / "rule.log"
    setup_logging(log_file)
    # score_thr 0 so that a one-iteration model still emits boxes to evaluate.
    p = params(arch="resnet18", epochs=1, batch_size=2, warmup_iters=1, workers=0, score_thr=0.0)
    summary = engine.train(jsons["train"], jsons["val"], jsons["test"], root / "run", init=str(backbone), res=64,
                           seed=0, settings=p, init_name="barlowtwins")
    logging.getLogger().handlers.clear()
    return engine, root / "run", jsons, summary, log_file


@pytest.mark.mmdet
def test_tiny_training_run_through_the_shared_evaluation(trained_run, tmp_path):
    import pandas as pd
    from pycocotools.coco import COCO

    from cxrssl.evaluation import Run, evaluate, write_summary

    _engine, run, jsons, summary, log_file = trained_run
    for name in ("best.pth", "last.pth", "train_log.csv", "train_curve.png", "predictions_test.json"):
        assert (run / name).is_file(), name
    best = torch.load(run / "best.pth", weights_only=True)  # tensors and plain data only
    assert set(best) == {"meta", "model"} and json.loads(json.dumps(best["meta"])) == best["meta"]
    meta = best["meta"]
    assert (meta["format"], meta["engine"], meta["init_name"], meta["pretrained"]) == (2, "mmdet", "barlowtwins", True)
    assert meta["classes"] == list(VINDR_CLASSES) and "cfg" not in meta and meta["settings"]["arch"] == "resnet18"
    assert meta["epoch"] == 1 and summary["best_epoch"] == 1 and meta["input_size"] == 64
    assert set(torch.load(run / "last.pth", weights_only=True)) == {"meta", "model"}
    assert not list((run / "mmdet_work").rglob("*.pth")) or all(
        p.name == "backbone_init.pth" for p in (run / "mmdet_work").rglob("*.pth"))  # no mmengine checkpoints
    log_frame = pd.read_csv(run / "train_log.csv")
    assert list(log_frame.columns[:3]) == ["epoch", "iter", "loss"] and len(log_frame) == 1
    assert log_frame["val_mAP50"].notna().iloc[-1]

    preds = json.loads((run / "predictions_test.json").read_text())
    assert preds and summary["n_predictions"] == len(preds)
    assert {p["category_id"] for p in preds} <= set(range(1, 15))
    gt = json.loads(jsons["test"].read_text())
    assert {p["image_id"] for p in preds} <= {im["id"] for im in gt["images"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    for p in preds:  # converted pixels of coco_test.json
        x, y, w, h = p["bbox"]
        assert x >= 0 and y >= 0 and x + w <= sizes[p["image_id"]][0] + 1e-3 and y + h <= sizes[p["image_id"]][1] + 1e-3
    COCO(str(jsons["test"])).loadRes(str(run / "predictions_test.json"))

    text = log_file.read_text()  # mmengine's messages reach the rule's log, the backbone loaded cleanly
    assert "load model from" in text and "do not match" not in text

    metrics_mmdet = evaluate(str(jsons["test"]), str(run / "predictions_test.json"), bootstrap=20, seed=0)
    assert 0.0 <= metrics_mmdet["mAP50"] <= 1.0
    # A torchvision-format result list (here: the ground truth itself) through the same code.
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"]]
    metrics_tv = evaluate(str(jsons["test"]), perfect, bootstrap=20, seed=0)
    assert metrics_tv["mAP50"] == pytest.approx(1.0)
    paths = {}
    for name, metrics in (("mmdet", metrics_mmdet), ("torchvision", metrics_tv)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(metrics))
    runs = [Run("torchvision", "barlowtwins", 64, 0, str(paths["torchvision"])),
            Run("mmdet", "barlowtwins", 64, 0, str(paths["mmdet"]))]
    write_summary(runs, tmp_path / "summary.csv", tmp_path / "summary.md", tmp_path / "map50.png")
    table = pd.read_csv(tmp_path / "summary.csv")
    assert set(table["engine"]) == {"torchvision", "mmdet"}
    md = (tmp_path / "summary.md").read_text()
    assert "mmdet" in md and "torchvision" in md


@pytest.mark.mmdet
def test_cam_model_behaves_like_a_torchvision_detector(trained_run):
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayerFasterRCNN
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

    engine, run, jsons, _summary, _log = trained_run
    model = engine.load_cam_model(run / "best.pth", "cpu")
    img = torch.rand(3, 60, 80)
    with torch.no_grad():
        feats = model.backbone(img[None])
        (out,) = model([img])
    assert list(feats) == ["0", "1", "2", "3", "pool"] and all(f.shape[1] == 256 for f in feats.values())
    assert set(out) == {"boxes", "labels", "scores"} and len(out["boxes"]) > 0
    assert out["labels"].min() >= 1 and out["labels"].max() <= 14
    assert out["boxes"][:, 2].max() <= 80 + 1e-3 and out["boxes"][:, 3].max() <= 60 + 1e-3  # input pixels

    # Same preprocessing as the test pipeline: the best-scoring test prediction is reproduced.
    gt = json.loads(jsons["test"].read_text())
    image = gt["images"][0]
    grey = np.asarray(Image.open(jsons["test"].parent / image["file_name"]), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(grey)[None].expand(3, -1, -1)
    with torch.no_grad():
        (mine,) = model([tensor])
    preds = [p for p in json.loads((run / "predictions_test.json").read_text()) if p["image_id"] == image["id"]]
    top = max(preds, key=lambda p: p["score"])
    assert float(mine["scores"].max()) == pytest.approx(top["score"], abs=0.02)

    labels = out["labels"][:1].tolist()
    boxes = out["boxes"][:1].detach().numpy()
    cam = AblationCAM(model, [model.backbone], reshape_transform=fasterrcnn_reshape_transform,
                      ablation_layer=AblationLayerFasterRCNN(), ratio_channels_to_ablate=0.005)
    cam.batch_size = 16
    heat = cam(img[None], targets=[FasterRCNNBoxScoreTarget(labels=labels, bounding_boxes=boxes)])
    assert heat.shape == (1, 60, 80) and np.isfinite(heat).all()


@pytest.mark.mmdet
def test_cpu_only_mmcv_on_a_gpu_machine_is_a_clear_error(engine, monkeypatch):
    import mmcv.ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mmcv.ops, "get_compiling_cuda_version", lambda: "not available")
    with pytest.raises(ImportError, match="without CUDA ops.*make mmcv"):
        engine.check_cuda_ops()
    monkeypatch.setattr(mmcv.ops, "get_compiling_cuda_version", lambda: "12.4")
    engine.check_cuda_ops()


def test_gradient_clipping_reaches_the_mmdet_optimizer(tmp_path):
    kwargs = dict(train_json=tmp_path / "a.json", val_json=tmp_path / "b.json", test_json=tmp_path / "c.json",
                  work_dir=tmp_path / "w", res=128, backbone_checkpoint=None, seed=0)
    assert "clip_grad" not in build_config(params(), **kwargs)["optim_wrapper"]  # the paper's: none
    clipped = build_config(params(grad_clip=10.0), **kwargs)["optim_wrapper"]
    assert clipped["clip_grad"] == {"max_norm": 10.0, "norm_type": 2}


# --- one engine contract: every shared setting reaches both engines ---------------------------------

def _depth(blocks) -> int:
    return {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}[tuple(blocks)]


def _frozen_stages(named_params) -> list[str]:
    """mmdet stages (stem = conv1 + its norm) none of whose parameters train."""
    stages = {"stem": ("conv1", "bn1"), **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}}
    trains = {stage: False for stage in stages}
    for name, p in named_params:
        for stage, prefixes in stages.items():
            if name.startswith(prefixes) and p.requires_grad:
                trains[stage] = True
    return [stage for stage, t in trains.items() if not t]


def _mm_backbone(cfg):
    from mmdet.registry import MODELS

    backbone = MODELS.build(dict(cfg["model"]["backbone"], init_cfg=None))
    backbone.train()
    return backbone


def _mm_train_set(cfg):
    from mmdet.registry import DATASETS

    return DATASETS.build(cfg["train_dataloader"]["dataset"])


def _mm_iters_per_epoch(cfg) -> int:
    """Batches per epoch as mmdet's own sampler (AspectRatioBatchSampler) yields them."""
    from mmdet.datasets.samplers import AspectRatioBatchSampler
    from mmengine.dataset import DefaultSampler

    ds = _mm_train_set(cfg)
    sampler = AspectRatioBatchSampler(DefaultSampler(ds, shuffle=True, seed=0), cfg["train_dataloader"]["batch_size"])
    n = sum(1 for _ in sampler)
    assert n == len(sampler)
    return n


def _mm_lrs(cfg):
    from mmengine.registry import PARAM_SCHEDULERS

    iters_per_epoch = _mm_iters_per_epoch(cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg["optim_wrapper"]["optimizer"]["lr"])
    (sched,) = cfg["param_scheduler"]
    scheduler = PARAM_SCHEDULERS.build(sched, default_args=dict(optimizer=optimizer, epoch_length=iters_per_epoch))
    lrs = []
    for _ in range(cfg["train_cfg"]["max_epochs"] * iters_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _tv_lrs(plan):
    lrs = []
    for _ in range(plan.epochs * len(plan.loader)):
        lrs.append(plan.optimizer.param_groups[0]["lr"])
        plan.optimizer.step()
        plan.scheduler.step()
    return lrs


def _mm_train_ids(cfg):
    ds = _mm_train_set(cfg)
    return sorted(int(ds.get_data_info(i)["img_id"]) for i in range(len(ds)))


def _mm_bn(cfg):
    bn = _mm_backbone(cfg).layer3[0].bn1
    return bn.training, bn.weight.requires_grad


#: For each training setting of the schema: a value other than the base's, how the torchvision
#: training plan (model, optimizer, schedule, loader) shows it, and how the mmdet config (or what
#: mmdet builds from it: backbone, datasets, sampler, scheduler) shows it.
PROBES = {
    "arch": ("resnet34", lambda tv: _depth(len(getattr(tv.model.backbone.body, f"layer{i}")) for i in range(1, 5)),
             lambda mm: mm["model"]["backbone"]["depth"]),
    "epochs": (3, lambda tv: (tv.epochs, len(_tv_lrs(tv))), lambda mm: (mm["train_cfg"]["max_epochs"], len(_mm_lrs(mm)))),
    "batch_size": (3, lambda tv: (tv.loader.batch_size, len(tv.loader)),
                   lambda mm: (mm["train_dataloader"]["batch_size"], _mm_iters_per_epoch(mm))),
    "lr": (0.02, _tv_lrs, _mm_lrs),
    "momentum": (0.5, lambda tv: tv.optimizer.param_groups[0]["momentum"],
                 lambda mm: mm["optim_wrapper"]["optimizer"]["momentum"]),
    "weight_decay": (0.003, lambda tv: tv.optimizer.param_groups[0]["weight_decay"],
                     lambda mm: mm["optim_wrapper"]["optimizer"]["weight_decay"]),
    "warmup_iters": (1, _tv_lrs, _mm_lrs),
    "min_lr": (0.004, _tv_lrs, _mm_lrs),
    "frozen_stages": (2, lambda tv: _frozen_stages(tv.model.backbone.body.named_parameters()),
                      lambda mm: _frozen_stages(_mm_backbone(mm).named_parameters())),
    "norm_eval": (False, lambda tv: (tv.model.train().backbone.body.layer3[0].bn1.training,
                                     tv.model.backbone.body.layer3[0].bn1.weight.requires_grad), _mm_bn),
    "random_init_norm": ("groupnorm", lambda tv: type(tv.model.backbone.body.bn1).__name__,
                         lambda mm: type(_mm_backbone(mm).norm1).__name__),
    "hflip": (0.25, lambda tv: tv.train_set.hflip_prob,
              lambda mm: {t["type"]: t for t in mm["train_dataloader"]["dataset"]["pipeline"]}["RandomFlip"]["prob"]),
    "grad_clip": (3.0, lambda tv: tv.grad_clip, lambda mm: mm["optim_wrapper"].get("clip_grad", {}).get("max_norm", 0.0)),
    "workers": (2, lambda tv: tv.loader.num_workers, lambda mm: mm["train_dataloader"]["num_workers"]),
    "amp": (True, lambda tv: tv.model.backbone.autocast_device, lambda mm: mm["model"]["autocast_device"]),
    "rpn_proposals": (77, lambda tv: (tv.model.rpn._post_nms_top_n["training"], tv.model.rpn._post_nms_top_n["testing"]),
                      lambda mm: (mm["model"]["train_cfg"]["rpn_proposal"]["max_per_img"],
                                  mm["model"]["test_cfg"]["rpn"]["max_per_img"])),
    "rois_per_image": (48, lambda tv: tv.model.roi_heads.fg_bg_sampler.batch_size_per_image,
                       lambda mm: mm["model"]["train_cfg"]["rcnn"]["sampler"]["num"]),
    "fpn_channels": (64, lambda tv: (tv.model.backbone.out_channels, tv.model.rpn.head.conv[0][0].out_channels,
                                     tv.model.roi_heads.box_head.fc6.in_features),
                     lambda mm: (mm["model"]["neck"]["out_channels"], mm["model"]["rpn_head"]["feat_channels"],
                                 mm["model"]["roi_head"]["bbox_head"]["in_channels"] * 7 * 7)),
    "score_thr": (0.2, lambda tv: tv.model.roi_heads.score_thresh, lambda mm: mm["model"]["test_cfg"]["rcnn"]["score_thr"]),
    "compile": (True, lambda tv: tv.model.backbone._compiled_call_impl is not None, lambda mm: mm["compile"]),
    "train_on_empty": (False, lambda tv: sorted(int(im["id"]) for im in tv.train_set.images), _mm_train_ids),
}


def test_every_training_setting_has_a_probe():
    # ViT detectors' settings have no mmdet counterpart: the mmdet engine refuses ViTs (test_detection
    # checks them on the torchvision plan)
    assert set(PROBES) == set(training_settings(section_defaults("detection"))) - set(VIT_SETTINGS)


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The data, the base settings and both engines' views of them, built once per probe kind."""
    from cxrssl.detection.train import build_plan

    _require_mmdet()
    root = tmp_path_factory.mktemp("parity")
    jsons = make_coco(root, sizes=(6, 1, 1))
    torch.manual_seed(0)
    for arch in ("resnet18", "resnet34"):
        torch.save(getattr(torchvision.models, arch)().state_dict(), root / f"imagenet_{arch}.pth")
    base = {k: v for k, v in params(arch="resnet18", epochs=2, batch_size=2, workers=0, warmup_iters=3,
                                    amp=False, grad_clip=0.0).items() if k not in RUN_SETTINGS + ("predict",)}

    def views(s, init):
        weights = root / f"imagenet_{s['arch']}.pth"
        tv = build_plan(s, jsons["train"], init, 64, 0, imagenet_weights=weights, device_type="cuda")
        mm = build_config(s, train_json=jsons["train"], val_json=jsons["val"], test_json=jsons["test"],
                          work_dir=root / "w", res=64, backbone_checkpoint=None if init == "random" else str(weights),
                          seed=0, device_type="cuda")
        return tv, mm

    shared, values = {}, {}

    def base_values(setting, init):
        _, tv_probe, mm_probe = PROBES[setting]
        key = (init, tv_probe, mm_probe)
        if key not in values:
            if tv_probe is _tv_lrs or setting == "epochs":  # these step the plan's optimizer: a plan of their own
                tv, mm = views(base, init)
            else:
                if init not in shared:
                    shared[init] = views(base, init)
                tv, mm = shared[init]
            values[key] = (tv_probe(tv), mm_probe(mm))
        return values[key]

    return base, views, base_values


@pytest.mark.mmdet
@pytest.mark.parametrize("setting", sorted(PROBES))
def test_every_shared_setting_reaches_both_engines(parity, setting):
    """Each setting, changed from the base, shows up the same in the torchvision training plan and
    in the mmdet config (or in what mmdet builds from it), and differently from the base."""
    base, views, base_values = parity
    value, tv_probe, mm_probe = PROBES[setting]
    init = "random" if setting == "random_init_norm" else "imagenet"
    tv_base, mm_base = base_values(setting, init)
    tv, mm = views(dict(base, **{setting: value}), init)
    tv_new, mm_new = tv_probe(tv), mm_probe(mm)
    assert tv_new == pytest.approx(mm_new), (setting, tv_new, mm_new)
    assert tv_base == pytest.approx(mm_base), (setting, tv_base, mm_base)
    assert tv_new != tv_base, f"{setting}: the probe does not see the setting"


@pytest.mark.mmdet
def test_mmdet_backbone_runs_in_bf16_and_boxes_stay_fp32(engine):
    """The precision policy of both engines, exercised with CPU autocast (on GPUs it is CUDA's)."""
    cfg = build_config(params(arch="resnet18", rpn_proposals=50), train_json=Path("a.json"), val_json=Path("b.json"),
                       test_json=Path("c.json"), work_dir=Path("w"), res=64, backbone_checkpoint=None, seed=0)
    cfg["model"]["autocast_device"] = "cpu"
    cfg["model"]["test_cfg"]["rcnn"]["score_thr"] = 0.0
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict

    torch.manual_seed(0)
    detector = MODELS.build(ConfigDict(cfg["model"])).eval()
    seen = {}
    detector.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("backbone", o[0].dtype))
    image = torch.rand(3, 48, 64)
    with torch.no_grad():
        feats = detector.extract_feat(detector.data_preprocessor({"inputs": [image * 255]}, False)["inputs"])
        (out,) = engine.MMDetCamModel(detector, 64)([image])
    assert seen["backbone"] == torch.bfloat16 and all(f.dtype == torch.float32 for f in feats)
    assert out["boxes"].dtype == torch.float32 and out["scores"].dtype == torch.float32 and len(out["boxes"])


@pytest.mark.mmdet
def test_malicious_checkpoints_and_stored_config_code_are_refused(engine, tmp_path):
    check_payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    evil_backbone = malicious_checkpoint(tmp_path / "evil_backbone.pth", marker, "state_dict")
    with pytest.raises(BadInputError, match="evil_backbone.pth"):
        engine.prepare_backbone_checkpoint(str(evil_backbone), "resnet18", tmp_path)
    evil = malicious_checkpoint(tmp_path / "best.pth", marker)
    with pytest.raises(BadInputError, match="best.pth.*refused"):
        engine.load_cam_model(evil)
    # The old format kept the mmdet config as Python text; mmengine's Config.fromstring would run it.
    code = f"open({str(marker)!r}, 'w').close()\nmodel = dict(type='FasterRCNN')\n"
    torch.save({"engine": "mmdet", "meta": {"cfg": code, "classes": list(VINDR_CLASSES), "res": 64},
                "state_dict": {"w": torch.zeros(1)}}, tmp_path / "old.pth")
    with pytest.raises(BadInputError, match="old.pth.*never executes stored code"):
        engine.load_cam_model(tmp_path / "old.pth")
    assert not marker.exists()
    assert "fromstring(" not in Path(engine.__file__).read_text()
