"""Torchvision Faster R-CNN engine: model building per init, freezing, norm_eval, precision, heads as
mmdet's, data, schedule, training, checkpoint/resume, the engine contract, refusal of malicious
checkpoints and the predictions contract. Tiny sizes: resnet18, 64 px, a dozen images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.ops.misc import FrozenBatchNorm2d

from cxrssl.classes import coco_categories
from cxrssl.config import load_schema, section_defaults
from cxrssl.detection import engine, train
from cxrssl.detection.dataset import CocoDetection, collate, load_coco, training_image_ids
from cxrssl.detection.engine import WarmupCosine, coco_map50, evaluate_map50
from cxrssl.detection.engines import RUN_SETTINGS, engine_names, get_engine, load_detector
from cxrssl.detection.model import (EvalBatchNorm2d, MinIoUMatcher, build_detector, load_trained_detector,
                                    set_precision, trainable_layers_for)
from cxrssl.detection.transforms import hflip
from cxrssl.errors import BadInputError
from cxrssl.models.backbone import backbone_state_dict
from payloads import check_payload_is_live, malicious_checkpoint

REPO = Path(__file__).resolve().parents[1]
RES = 64
SIZE = (96, 80)  # width, height: not square, so the aspect-kept resize is exercised


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test machine is shared: one torch thread is faster than two fighting for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_split(root: Path, split: str, n: int, seed: int, size=SIZE) -> Path:
    """COCO JSON + grey PNGs: noise with one bright square ("Aortic enlargement", id 1) in three of
    four images; every fourth image has no box (as VinDr's "No finding" images)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    width, height = size
    for i in range(n):
        img = rng.normal(60, 15, (height, width)).clip(0, 255)
        if i % 4 != 3:
            side = int(rng.integers(18, 30))
            x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            img[y:y + side, x:x + side] = 220
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, side, side],
                         "area": side * side, "iscrowd": 0})
        name = f"images/{split}_{i:03d}.png"
        cv2.imwrite(str(root / name), img.astype(np.uint8))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height,
                       "vindr_id": f"{split}_{i:03d}"})
    path = root / f"coco_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": coco_categories()}))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coco")
    return {split: make_split(root, split, n, seed) for split, n, seed in
            (("train", 16, 0), ("val", 6, 1), ("test", 4, 2))}


def tiny_settings(**overrides) -> dict:
    s = {k: v for k, v in section_defaults("detection").items() if k not in RUN_SETTINGS + ("predict",)}
    s.update(arch="resnet18", epochs=3, batch_size=4, lr=0.01, warmup_iters=2, workers=0, amp=False,
             rpn_proposals=100, rois_per_image=32)
    s.update(overrides)
    return s


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """A local "ImageNet" state dict (torchvision format) and a pretraining-style backbone file."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18()
    imagenet.bn1.running_mean.uniform_(0.1, 0.5)  # non-default statistics, to see them kept
    torch.save(imagenet.state_dict(), root / "imagenet.pth")
    torch.manual_seed(2)
    pretrained = torchvision.models.resnet18()
    torch.save(backbone_state_dict(pretrained), root / "backbone.pth")
    return {"imagenet": root / "imagenet.pth", "checkpoint": root / "backbone.pth"}


def _body(model: FasterRCNN) -> nn.Module:
    return model.backbone.body


# --- model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("frozen, trainable", [(-1, 5), (0, 4), (1, 3), (4, 0)])
def test_frozen_stages_map_to_torchvision_trainable_layers(frozen, trainable):
    assert trainable_layers_for(frozen) == trainable


def test_frozen_stages_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="frozen_stages"):
        trainable_layers_for(5)


def test_imagenet_and_checkpoint_inits_load_their_weights(weights):
    imagenet = torch.load(weights["imagenet"], weights_only=True)
    model = build_detector("resnet18", "imagenet", res=RES, imagenet_weights=weights["imagenet"])
    assert isinstance(model, FasterRCNN) and model.roi_heads.box_predictor.cls_score.out_features == 15
    assert torch.equal(_body(model).conv1.weight, imagenet["conv1.weight"])
    assert torch.equal(_body(model).layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])
    assert torch.equal(_body(model).bn1.running_mean, imagenet["bn1.running_mean"])
    assert isinstance(_body(model).layer1[0].bn1, FrozenBatchNorm2d)  # a frozen stage
    assert isinstance(_body(model).layer4[0].bn1, EvalBatchNorm2d)  # norm_eval: mmdet's, affine trains

    backbone = torch.load(weights["checkpoint"], weights_only=True)
    model = build_detector("resnet18", str(weights["checkpoint"]), res=RES)
    assert torch.equal(_body(model).layer2[1].conv2.weight, backbone["layer2.1.conv2.weight"])
    assert not torch.equal(_body(model).conv1.weight, imagenet["conv1.weight"])


def test_input_resizing_keeps_aspect_with_longest_side_res():
    model = build_detector("resnet18", "random", res=RES)
    batch, _ = model.transform([torch.rand(3, 80, 96)])
    assert batch.image_sizes == [(53, 64)]
    assert model.transform.image_mean == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("norm, kind", [("batchnorm", nn.BatchNorm2d), ("groupnorm", nn.GroupNorm)])
def test_random_init_has_trainable_normalisation_and_nothing_frozen(norm, kind):
    model = build_detector("resnet18", "random", res=RES, frozen_stages=1, norm_eval=True, random_init_norm=norm)
    body = _body(model)
    assert all(p.requires_grad for p in body.parameters())
    norms = [m for m in body.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, kind) for m in norms)
    assert all(m.weight.requires_grad for m in norms)


def _one_step(model: FasterRCNN, data: dict[str, Path]) -> None:
    images, targets = collate([CocoDetection(data["train"])[i] for i in range(2)])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    loss = sum(model(images, targets).values())
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("norm_eval", [True, False])
def test_frozen_stages_stay_frozen_and_norm_eval_keeps_statistics(weights, data, norm_eval):
    model = build_detector("resnet18", "imagenet", res=RES, frozen_stages=1, norm_eval=norm_eval,
                           imagenet_weights=weights["imagenet"], rpn_proposals=50, rois_per_image=16)
    body = _body(model)
    before = {k: v.clone() for k, v in body.state_dict().items()}
    frozen = [n for n, _ in body.named_parameters() if n.startswith(("conv1", "bn1", "layer1"))]
    assert all(not p.requires_grad for n, p in body.named_parameters() if n in frozen)
    assert all(p.requires_grad for n, p in body.named_parameters() if n.startswith(("layer2", "layer3", "layer4")))
    _one_step(model, data)
    after = body.state_dict()
    # stem and layer1: weights and statistics unchanged whatever norm_eval says
    for name in before:
        if name.startswith(("conv1", "bn1", "layer1")):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    stats_moved = not torch.equal(before["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])
    assert stats_moved is (not norm_eval)
    if norm_eval:
        assert all(torch.equal(before[n], after[n]) for n in before if "running_" in n)
    # mmdet's norm_eval keeps the BN affine weights of the trained stages trainable (torchvision's
    # FrozenBatchNorm2d froze them): they move either way
    for name in ("layer2.0.bn1.weight", "layer4.1.bn2.bias"):
        assert not torch.equal(before[name], after[name]), name


def test_norm_eval_batchnorm_stays_in_eval_mode_with_trainable_affine(weights):
    model = build_detector("resnet18", "imagenet", res=RES, frozen_stages=1, norm_eval=True,
                           imagenet_weights=weights["imagenet"])
    model.train()
    bns = [m for n, m in _body(model).named_modules() if n.startswith(("layer2", "layer3", "layer4"))
           and isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, EvalBatchNorm2d) and not m.training for m in bns)
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in bns)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.body.layer3.0.bn1.weight" in trainable and "backbone.body.layer1.0.bn1.weight" not in trainable


# --- precision: bf16 backbone, fp32 heads ----------------------------------------------------------

def _dtypes_seen(model: FasterRCNN, images, targets=None) -> dict:
    seen = {}
    hooks = [model.backbone.body.register_forward_hook(lambda m, i, o: seen.__setitem__("body", o["0"].dtype)),
             model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("fpn", o["0"].dtype)),
             model.rpn.register_forward_hook(lambda m, i, o: seen.__setitem__("proposals", o[0][0].dtype)),
             model.roi_heads.box_predictor.register_forward_hook(
                 lambda m, i, o: seen.__setitem__("box_regression", o[1].dtype))]
    try:
        out = model(images, targets) if targets is not None else model(images)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def test_backbone_runs_in_bf16_and_proposals_and_boxes_stay_fp32(data):
    """The policy that both engines follow with amp on a GPU, exercised with CPU autocast."""
    torch.manual_seed(0)
    model = build_detector("resnet18", "random", res=RES, score_thr=0.0, rpn_proposals=50, rois_per_image=16).eval()
    images = [CocoDetection(data["val"])[0][0]]
    with torch.no_grad():
        # the defect: autocast around the whole detector decodes proposals and boxes in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            whole, (out_whole,) = _dtypes_seen(model, images)
        assert whole["proposals"] == torch.bfloat16 and out_whole["boxes"].dtype == torch.bfloat16
        set_precision(model, "cpu")
        seen, (out,) = _dtypes_seen(model, images)
    assert seen == {"body": torch.bfloat16, "fpn": torch.float32, "proposals": torch.float32,
                    "box_regression": torch.float32}
    assert out["boxes"].dtype == torch.float32 and len(out["boxes"]) > 0
    # fp32 boxes are not on bf16's grid (2 px spacing above 256, 0.25 px between 32 and 64)
    assert not torch.equal(out["boxes"], out["boxes"].bfloat16().float())
    # training goes the same way: fp32 losses, gradients reach the bf16 backbone
    model.train()
    image, target = CocoDetection(data["train"])[0]
    seen, losses = _dtypes_seen(model, [image], [target])
    assert seen["proposals"] == torch.float32 and seen["body"] == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None
    set_precision(model, None)
    assert _dtypes_seen(model.eval(), images)[0]["body"] == torch.float32


def test_training_plan_applies_the_precision_policy(data):
    s = tiny_settings(amp=True)
    assert train.build_plan(s, data["train"], "random", RES, 0).model.backbone.autocast_device is None  # CPU
    on_gpu = train.build_plan(s, data["train"], "random", RES, 0, device_type="cuda")
    assert on_gpu.model.backbone.autocast_device == "cuda"
    assert train.build_plan(dict(s, amp=False), data["train"], "random", RES, 0,
                            device_type="cuda").model.backbone.autocast_device is None


def test_vit_detectors_train_with_adamw_and_resnets_with_sgd(data):
    """ViTDet's recipe for a ViT backbone (AdamW at vit_lr, vit_weight_decay, the same warm-up and
    cosine shape), the paper's SGD for ResNets and for ViTs with vit_optimizer sgd."""
    s = tiny_settings(lr=0.01, min_lr=0.0002, vit_lr=0.0003, vit_weight_decay=0.05)
    vit = train.build_plan(dict(s, arch="vit_tiny_patch8"), data["train"], "random", RES, 0)
    assert type(vit.optimizer) is torch.optim.AdamW
    assert {g["weight_decay"] for g in vit.optimizer.param_groups} == {0.05}
    resnet = train.build_plan(s, data["train"], "random", RES, 0)
    assert type(resnet.optimizer) is torch.optim.SGD and resnet.optimizer.param_groups[0]["momentum"] == s["momentum"]
    shapes = []
    for plan, peak in ((vit, 0.0003), (resnet, 0.01)):
        lrs = []
        for _ in range(plan.epochs * len(plan.loader)):
            lrs.append(plan.optimizer.param_groups[0]["lr"] / peak)
            plan.optimizer.step()
            plan.scheduler.step()
        shapes.append(lrs)
    assert max(shapes[0]) == pytest.approx(1.0) and shapes[0] == pytest.approx(shapes[1])  # one schedule, two peaks
    sgd_vit = train.build_plan(dict(s, arch="vit_tiny_patch8", vit_optimizer="sgd"), data["train"], "random", RES, 0)
    assert type(sgd_vit.optimizer) is torch.optim.SGD and sgd_vit.optimizer.param_groups[0]["lr"] <= 0.01


# --- heads as mmdet's R50-FPN ------------------------------------------------------------------------

def test_rpn_box_loss_is_l1_over_the_sampled_anchors():
    model = build_detector("resnet18", "random", res=RES)
    rpn = model.rpn
    rpn.fg_bg_sampler.batch_size_per_image = 10_000  # sample every labelled anchor: a deterministic sum
    labels = [torch.tensor([1.0, 1.0, 0.0, 0.0, -1.0, 1.0])]
    targets = [torch.zeros(6, 4)]
    deltas = torch.full((6, 4), 0.05)  # |x| < 1/9: smooth-L1 (beta 1/9) would give 0.5 x^2 / beta
    deltas[4] = 9.0  # an ignored anchor (-1) adds nothing
    _, box_loss = rpn.compute_loss(torch.zeros(6, 1), deltas, labels, targets)
    assert float(box_loss) == pytest.approx(3 * 4 * 0.05 / 5)  # 3 positives, 5 sampled


def test_roi_box_loss_is_l1_over_the_sampled_rois(data):
    torch.manual_seed(0)
    model = build_detector("resnet18", "random", res=RES, rois_per_image=32).train()
    heads, captured = model.roi_heads, {}
    real_select = heads.select_training_samples

    def select(proposals, targets):
        out = real_select(proposals, targets)
        captured["labels"], captured["targets"] = torch.cat(out[2]), torch.cat(out[3])
        return out

    heads.select_training_samples = select
    hook = heads.box_predictor.register_forward_hook(lambda m, i, o: captured.__setitem__("regression", o[1]))
    image, target = CocoDetection(data["train"])[0]
    losses = model([image], [target])
    hook.remove()
    labels, regression = captured["labels"], captured["regression"].reshape(len(captured["labels"]), -1, 4)
    pos = torch.where(labels > 0)[0]
    assert len(pos) > 0
    expected = (regression[pos, labels[pos]] - captured["targets"][pos]).abs().sum() / labels.numel()
    assert float(losses["loss_box_reg"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_rpn_low_quality_matches_need_iou_0_3():
    quality = torch.tensor([[0.20, 0.10, 0.05],   # this GT's best anchor is below min_pos_iou 0.3
                            [0.01, 0.35, 0.10]])  # this one's is above: its best anchor becomes positive
    matches = MinIoUMatcher(0.7, 0.3, 0.3)(quality)
    assert matches.tolist() == [-1, 1, -1]  # below 0.3 is background; mmdet's min_pos_iou floor
    model = build_detector("resnet18", "random", res=RES)
    assert isinstance(model.rpn.proposal_matcher, MinIoUMatcher) and model.rpn.proposal_matcher.min_pos_iou == 0.3
    assert model.roi_heads.box_roi_pool.sampling_ratio == 0  # mmdet's adaptive RoIAlign sampling


def test_input_geometry_is_the_models_own_resize_and_padding():
    model = build_detector("resnet18", "random", res=RES)
    for height, width in ((80, 96), (40, 96), (96, 33), (64, 64)):
        batch, _ = model.transform([torch.rand(3, height, width)])
        assert model.input_geometry(height, width) == (*batch.image_sizes[0], *batch.tensors.shape[-2:])
    assert model.input_geometry(40, 96) == (26, 64, 32, 64)


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch8"])
def test_fpn_channels_set_the_pyramid_rpn_and_roi_widths_and_survive_the_checkpoint(arch):
    """``fpn_channels`` reaches every level, the RPN head and the box head, and the checkpoint's meta
    rebuilds the same shapes; meta without the key (older checkpoints) means mmdet's 256."""
    from cxrssl.detection.model import build_meta, detector_from_meta

    model = build_detector(arch, "random", res=RES, fpn_channels=64)
    with torch.no_grad():
        levels = model.backbone(torch.rand(1, 3, RES, RES))
    assert {k: v.shape[1] for k, v in levels.items()} == {k: 64 for k in levels}
    assert model.rpn.head.conv[0][0].out_channels == 64
    assert model.roi_heads.box_head.fc6.in_features == 64 * 7 * 7
    meta = build_meta(arch, "random", 15, RES, 1, True, "batchnorm", 0.001, fpn_channels=64)
    assert meta["fpn_channels"] == 64
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in detector_from_meta(meta).state_dict().items()} == shapes
    old = {k: v for k, v in meta.items() if k != "fpn_channels"}
    assert detector_from_meta(old).backbone.out_channels == 256


# --- data and transforms ---------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(width=st.integers(8, 40), height=st.integers(8, 40), data=st.data())
def test_hflip_moves_boxes_with_the_pixels(width, height, data):
    x0 = data.draw(st.integers(0, width - 2))
    x1 = data.draw(st.integers(x0 + 1, width))
    y0 = data.draw(st.integers(0, height - 2))
    y1 = data.draw(st.integers(y0 + 1, height))
    image = torch.zeros(3, height, width)
    image[:, y0:y1, x0:x1] = 1.0
    flipped, boxes = hflip(image, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32))
    fx0, fy0, fx1, fy1 = boxes[0].int().tolist()
    assert (fy0, fy1) == (y0, y1)
    assert flipped[:, fy0:fy1, fx0:fx1].min() == 1.0 and flipped.sum() == image.sum()
    twice, back = hflip(flipped, boxes)
    assert torch.equal(twice, image) and back[0].tolist() == [x0, y0, x1, y1]


def test_dataset_items_and_seeded_flips(data):
    ds = CocoDetection(data["train"], hflip_prob=0.5, seed=3)
    image, target = ds[0]
    assert image.shape == (3, SIZE[1], SIZE[0]) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image[0], image[1]) and target["labels"].tolist() == [1]
    _, empty = ds[3]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].numel() == 0
    draws = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.append(tuple(ds[i][1]["boxes"][0, 0].item() for i in (0, 1)))
    again = CocoDetection(data["train"], hflip_prob=0.5, seed=3)
    again.set_epoch(4)
    assert tuple(again[i][1]["boxes"][0, 0].item() for i in (0, 1)) == draws[4]  # a function of seed/epoch/index
    assert len(set(draws)) > 1  # and the flips do vary over epochs


def _coco(tmp_path: Path, data: dict[str, Path], edit) -> Path:
    coco = json.loads(data["val"].read_text())
    edit(coco)
    path = tmp_path / "bad.json"
    (tmp_path / "images").mkdir(exist_ok=True)
    for img in coco["images"]:
        src = data["val"].parent / img["file_name"]
        (tmp_path / img["file_name"]).write_bytes(src.read_bytes())
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["categories"][8].update(name="Nodule_Mass"), "class table differs"),
    (lambda c: c["annotations"][0].update(bbox=[90, 10, 30, 20]), "lies outside"),
    (lambda c: c["annotations"][0].update(category_id=15), "category_id 15"),
    (lambda c: c["annotations"][0].update(image_id=999), "image_id 999"),
    (lambda c: c["annotations"][0].update(bbox=[1, 1, 0, 5]), "empty box"),
])
def test_bad_coco_json_names_file_and_entry(tmp_path, data, edit, message):
    path = _coco(tmp_path, data, edit)
    with pytest.raises(BadInputError, match=message) as info:
        load_coco(path)
    assert "bad.json" in str(info.value)


def test_missing_or_resized_image_names_the_file(tmp_path, data):
    path = _coco(tmp_path, data, lambda c: None)
    ds = CocoDetection(path)
    ds.image_path(0).unlink()
    with pytest.raises(BadInputError, match="does not exist"):
        ds[0]
    cv2.imwrite(str(ds.image_path(1)), np.zeros((10, 10), np.uint8))
    with pytest.raises(BadInputError, match="10x10 but"):
        ds[1]


# --- schedule and metric ---------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(warmup=st.integers(0, 50), epochs=st.integers(1, 12), per_epoch=st.integers(1, 30), lr=st.floats(1e-3, 1.0),
       min_frac=st.floats(0.0, 0.5))
def test_warmup_then_cosine_per_epoch_schedule(warmup, epochs, per_epoch, lr, min_frac):
    """The paper's mmcv schedule: the cosine value changes once per epoch, the linear warm-up scales it
    per iteration (mmcv's CosineAnnealingLrUpdaterHook, by_epoch=True)."""
    total = epochs * per_epoch
    f = WarmupCosine(lr, lr * min_frac, warmup, epochs, per_epoch)
    values = [f(i) for i in range(total)]
    cosine = [(min_frac + (1 - min_frac) * 0.5 * (1 + np.cos(np.pi * (i // per_epoch) / epochs))) for i in range(total)]
    warm = [0.001 + 0.999 * i / warmup if i < warmup else 1.0 for i in range(total)]
    assert values == pytest.approx([c * w for c, w in zip(cosine, warm)], rel=1e-9, abs=1e-12)
    assert values[0] == pytest.approx(0.001 if warmup else 1.0)
    after = [v for i, v in enumerate(values) if i >= warmup]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises after the warm-up
    for e in range(epochs):  # one value per epoch once warmed up
        assert len({round(v, 12) for i, v in enumerate(values) if i // per_epoch == e and i >= warmup}) <= 1
    if epochs > 1 and total - 1 >= warmup:
        assert values[-1] > min_frac  # the last epoch is (E-1)/E of the way, as mmcv's


def test_coco_map50_scores_perfect_shifted_and_empty_predictions(data):
    gt = json.loads(data["val"].read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    assert coco_map50(gt, perfect) == pytest.approx(1.0)
    shifted = [{**p, "bbox": [p["bbox"][0] + p["bbox"][2] * 0.6, *p["bbox"][1:]]} for p in perfect]
    assert coco_map50(gt, shifted) == pytest.approx(0.0)
    assert coco_map50(gt, []) == 0.0
    wrong_class = [{**p, "category_id": 2} for p in perfect]
    assert coco_map50(gt, wrong_class) == pytest.approx(0.0)


def test_coco_map50_agrees_with_the_evaluation_stage(data):
    """Checkpoint selection and the reported test metric must be the same mAP50."""
    from cxrssl.evaluation.metrics import evaluate

    gt = json.loads(data["val"].read_text())
    rng = np.random.default_rng(0)
    results = []
    for a in gt["annotations"]:
        for _ in range(5):
            x, y, w, h = a["bbox"]
            jitter = rng.normal(0, 4, 4)
            results.append({"image_id": a["image_id"], "category_id": int(rng.choice([1, 1, 2])),
                            "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                            "score": float(rng.uniform())})
    ours = coco_map50(gt, results)
    assert 0.05 < ours < 0.95
    assert ours == pytest.approx(evaluate(gt, results, bootstrap=0, no_finding=False)["mAP50"], abs=1e-9)


# --- training, checkpoints, resume -----------------------------------------------------------

def run(data, out_dir, **overrides):
    return train.train_detector(data["train"], data["val"], data["test"], out_dir, init="random", res=RES, seed=0,
                                settings=tiny_settings(**overrides), device="cpu")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run_a")
    run(data, out)
    return out


def test_training_beats_an_untrained_model_and_writes_the_run_folder(trained, data):
    torch.manual_seed(0)
    untrained = build_detector("resnet18", "random", res=RES, rpn_proposals=100)
    loader = torch.utils.data.DataLoader(CocoDetection(data["val"]), batch_size=4, collate_fn=collate)
    base, _ = evaluate_map50(untrained, loader, load_coco(data["val"]), torch.device("cpu"))

    log = pd.read_csv(trained / "train_log.csv")
    assert list(log.columns) == train.LOG_COLUMNS
    assert len(log) == 3 * 4 and log["iter"].tolist() == list(range(1, 13))
    per_epoch = log.dropna(subset=["val_mAP50"])
    assert per_epoch["epoch"].tolist() == [1, 2, 3]
    assert log["lr"].iloc[0] == pytest.approx(0.01 * 0.001) and log["lr"].max() == pytest.approx(0.01)
    best = per_epoch["val_mAP50"].max()
    assert best > base + 0.1, (base, per_epoch["val_mAP50"].tolist())

    model, meta = load_trained_detector(trained / "best.pth")
    assert not model.training and meta["val_mAP50"] == pytest.approx(best)
    assert meta["epoch"] == int(per_epoch.loc[per_epoch["val_mAP50"].idxmax(), "epoch"])
    assert meta["arch"] == "resnet18" and meta["res"] == RES and meta["norm"] == "batchnorm"
    assert meta["input_size"] == max(SIZE) and meta["input_bit_depth"] == 8
    assert (trained / "last.pth").is_file() and (trained / "train_curve.png").stat().st_size > 1000


def test_predictions_are_valid_coco_results(trained, data):
    from pycocotools.coco import COCO

    results = json.loads((trained / "predictions_test.json").read_text())
    gt = load_coco(data["test"])
    assert results, "a trained model should find something"
    ids = {im["id"] for im in gt["images"]}
    assert {r["image_id"] for r in results} <= ids
    assert all(r["score"] >= 0.001 and 1 <= r["category_id"] <= 14 for r in results)
    assert max(pd.Series([r["image_id"] for r in results]).value_counts()) <= 100
    for r in results:
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= SIZE[0] + 0.01 and y + h <= SIZE[1] + 0.01
    coco = COCO()
    coco.dataset = {**gt, "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0}
                                          for a in gt["annotations"]]}
    coco.createIndex()
    assert len(coco.loadRes(results).getAnnIds()) == len(results)
    # the stored predictions are the best checkpoint's
    model, _ = load_trained_detector(trained / "best.pth")
    loader = torch.utils.data.DataLoader(CocoDetection(data["test"]), batch_size=4, collate_fn=collate)
    again = engine.predict_coco(model, loader, torch.device("cpu"), score_thr=0.001)
    assert len(again) == len(results) and again[0]["bbox"] == pytest.approx(results[0]["bbox"], abs=0.02)


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(trained, data, tmp_path, monkeypatch):
    real = train.train_one_epoch

    def dies_in_second_epoch(*args, **kwargs):
        if args[5] == 2:  # 1-based epoch number
            raise Interrupted("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", dies_in_second_epoch)
    with pytest.raises(Interrupted):
        run(data, tmp_path)
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1  # epochs completed
    (tmp_path / "best.pth").unlink()  # Snakemake deletes a failed job's declared outputs
    (tmp_path / "train_log.csv").unlink()
    monkeypatch.setattr(train, "train_one_epoch", real)
    run(data, tmp_path)

    a = torch.load(trained / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "last.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["best_model"][k], b["best_model"][k]) for k in a["best_model"])
    assert pd.read_csv(trained / "train_log.csv").equals(pd.read_csv(tmp_path / "train_log.csv"))
    assert (trained / "predictions_test.json").read_text() == (tmp_path / "predictions_test.json").read_text()


def test_finished_run_rebuilds_outputs_without_training(trained, data, tmp_path, monkeypatch):
    for name in ("last.pth",):
        (tmp_path / name).write_bytes((trained / name).read_bytes())

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished run with the same settings must not train again")

    monkeypatch.setattr(train, "train_one_epoch", must_not_train)
    run(data, tmp_path)
    assert (tmp_path / "predictions_test.json").read_text() == (trained / "predictions_test.json").read_text()
    a = torch.load(trained / "best.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "best.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_or_data_change_the_resume_fingerprint(data, tmp_path):
    s = tiny_settings()
    jsons = [data["train"], data["val"]]
    base = train.fingerprint(s, "random", RES, 0, 1, jsons, None)
    assert train.fingerprint(dict(s, workers=3), "random", RES, 0, 1, jsons, None) == base
    assert train.fingerprint(dict(s, lr=0.02), "random", RES, 0, 1, jsons, None) != base
    assert train.fingerprint(s, "random", RES, 1, 1, jsons, None) != base
    changed = tmp_path / "coco_val.json"
    changed.write_text(data["val"].read_text().replace('"width": 96', '"width": 95', 1))
    assert train.fingerprint(s, "random", RES, 0, 1, [data["train"], changed], None) != base


def test_train_detector_script_help():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train_detector.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--engine {torchvision,mmdet}", "--init", "--res", "--train-json", "--frozen-stages",
                 "--rois-per-image", "--train-on-empty", "--device", "--threads"):
        assert flag in out
    assert "--inits" not in out and "--engines" not in out and "--resolutions" not in out
    assert not (REPO / "scripts" / "train_detector_mmdet.py").exists()  # one training script


# --- the engine contract -------------------------------------------------------------------------------

def test_engine_registry_matches_the_schema_and_the_run_settings():
    det = load_schema()["properties"]["detection"]["properties"]
    assert tuple(det["engine"]["enum"]) == engine_names() == tuple(det["engines"]["items"]["enum"])
    assert set(RUN_SETTINGS) <= set(det) and det["inits"]["type"] == det["resolutions"]["type"] == "array"
    assert get_engine("torchvision").name == "torchvision"
    with pytest.raises(ValueError, match="unknown detection engine 'detectron'"):
        get_engine("detectron")
    # the tuple of run-selecting settings is written once: every user imports it
    for path in ("scripts/train_detector.py", "rules/common.smk", "src/cxrssl/detection/mmdet_config.py"):
        text = (REPO / path).read_text()
        assert '"engine", "engines", "inits", "resolutions"' not in text, path


def test_checkpoint_meta_is_plain_json_and_loads_through_the_registry(trained):
    best = torch.load(trained / "best.pth", weights_only=True)
    assert set(best) == {"meta", "model"}
    meta = json.loads(json.dumps(best["meta"]))  # plain data, nothing else
    assert meta == best["meta"]
    assert (meta["format"], meta["engine"], meta["arch"], meta["res"]) == (2, "torchvision", "resnet18", RES)
    assert meta["settings"]["rpn_proposals"] == 100 and "inits" not in meta["settings"]
    model, loaded = load_detector(trained / "best.pth", score_thr=0.5)
    assert loaded == meta and model.roi_heads.score_thresh == 0.5 and not model.training


def test_train_on_empty_selects_the_training_images(data):
    coco = load_coco(data["train"])
    empty = {im["id"] for im in coco["images"]} - {a["image_id"] for a in coco["annotations"]}
    assert len(empty) == 4
    with_empty = CocoDetection(data["train"], train_on_empty=True)
    boxed = CocoDetection(data["train"], train_on_empty=False)
    assert len(with_empty) == 16 and len(boxed) == 12
    assert {im["id"] for im in boxed.images} == set(training_image_ids(coco, False)) and not empty & {
        im["id"] for im in boxed.images}
    assert all(len(boxed[i][1]["boxes"]) for i in range(len(boxed)))
    assert len(train.build_plan(tiny_settings(train_on_empty=False), data["train"], "random", RES, 0).train_set) == 12
    assert len(CocoDetection(data["train"])) == 16  # val/test sets keep every image


# --- malicious checkpoints are refused, never executed ----------------------------------------------

def test_malicious_checkpoints_are_refused_at_init_resume_and_load(data, tmp_path):
    check_payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    evil_init = malicious_checkpoint(tmp_path / "evil_backbone.pth", marker, "state_dict")
    with pytest.raises(BadInputError, match="evil_backbone.pth"):
        train.train_detector(data["train"], data["val"], data["test"], tmp_path / "a", init=str(evil_init),
                             res=RES, seed=0, settings=tiny_settings(epochs=1), device="cpu")
    run_dir = tmp_path / "b"
    run_dir.mkdir()
    malicious_checkpoint(run_dir / "last.pth", marker, "resume")
    with pytest.raises(BadInputError, match="last.pth"):
        train.train_detector(data["train"], data["val"], data["test"], run_dir, init="random", res=RES, seed=0,
                             settings=tiny_settings(epochs=1), device="cpu")
    evil = malicious_checkpoint(tmp_path / "best.pth", marker)
    for load in (load_trained_detector, load_detector):
        with pytest.raises(BadInputError, match="best.pth.*refused"):
            load(evil)
    assert not marker.exists()


def test_gradient_clipping_caps_the_global_norm(data, monkeypatch):
    """grad_clip > 0 clips every step to that global norm; 0 leaves gradients alone."""
    from cxrssl.detection import engine

    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        total = real(params, max_norm, *args, **kwargs)
        seen.append((float(total), float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model = build_detector("resnet18", "random", res=RES, rpn_proposals=50, rois_per_image=32)
    loader = [collate([CocoDetection(data["train"])[i] for i in range(2)])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, engine.WarmupCosine(0.001, 0.0, 0, 4, 1))
    engine.train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 1, grad_clip=0.0,
                           show_progress=False)
    assert seen == []
    engine.train_one_epoch(model, loader, optimizer, scheduler, torch.device("cpu"), 2, grad_clip=1e-3,
                           show_progress=False)
    (before, after, max_norm), = seen
    assert before > max_norm and after == pytest.approx(max_norm, rel=1e-3)
