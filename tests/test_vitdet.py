"""ViTDet detection: the simple feature pyramid on a ViT, position-embedding resampling, a ViT-init
detector that trains, predicts and rebuilds from its checkpoint meta, and the mmdet refusal."""

from __future__ import annotations

import json

import numpy as np

import pytest
import timm
import torch

from cxrssl.detection import train
from cxrssl.detection.dataset import CocoDetection, collate
from cxrssl.detection.engines import load_detector
from cxrssl.detection.model import build_detector, set_precision
from cxrssl.detection.vitdet import (SimpleFeaturePyramid, TokenReshape, ViTDetBackbone, ViTFeatureMap,
                                     tokens_to_map)
from cxrssl.models.backbones import build_backbone, export_state_dict, get_spec, write_sidecar
from test_detection import make_split, tiny_settings

RES = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vit(patch: int, image_size: int = 224, depth: int = 1):
    return timm.create_model("vit_tiny_patch16_224", patch_size=patch, depth=depth, img_size=image_size,
                             num_classes=0, dynamic_img_size=True).eval()


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("res", [224, 640])
def test_pyramid_levels_have_strides_4_to_64_and_256_channels(patch, res):
    backbone = ViTDetBackbone(_vit(patch)).eval()
    with torch.no_grad():
        levels = backbone(torch.rand(1, 3, res, res))
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    expected = [res // 4, res // 8, res // 16, res // 32, -(-res // 64)]
    assert [tuple(v.shape) for v in levels.values()] == [(1, 256, s, s) for s in expected]
    # the ViT map is at the patch stride; deconvolutions above it, poolings below it
    assert backbone.body(torch.rand(1, 3, res, res)).shape == (1, 192, res // patch, res // patch)
    ups = [sum(isinstance(m, torch.nn.ConvTranspose2d) for m in s) for s in backbone.fpn.scales]
    pools = [sum(isinstance(m, torch.nn.MaxPool2d) for m in s) for s in backbone.fpn.scales]
    assert ups == ([2, 1, 0, 0] if patch == 16 else [1, 0, 0, 0])
    assert pools == ([0, 0, 0, 1] if patch == 16 else [0, 0, 1, 2])


def test_pyramid_refuses_a_stride_that_is_no_power_of_two_of_the_patch():
    with pytest.raises(ValueError, match="power-of-two"):
        SimpleFeaturePyramid(192, 12)


def test_feature_map_is_timms_own_forward_with_the_position_embedding_resampled():
    vit = _vit(8, image_size=48, depth=2)  # pretrained at a 6 x 6 grid
    body = ViTFeatureMap(vit)
    x = torch.rand(2, 3, 64, 96)  # an 8 x 12 grid
    with torch.no_grad():
        fmap = body(x)
        tokens = vit.forward_features(x)
    assert fmap.shape == (2, 192, 8, 12) and vit.pos_embed.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(fmap, tokens_to_map(tokens, (8, 12), 1))
    torch.testing.assert_close(fmap[:, :, 2, 5], tokens[:, 1 + 2 * 12 + 5])  # row-major grid
    # the resampled embedding differs from a ViT built at 64 x 96 with a fresh one: it is interpolated
    timm_resampled = timm.layers.resample_abs_pos_embed(vit.pos_embed, (8, 12), (6, 6), num_prefix_tokens=1)
    assert timm_resampled.shape == (1, 1 + 96, 192)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        ViTFeatureMap(timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0))


def test_token_reshape_drops_cls_and_register_tokens():
    tokens = torch.arange(2 * (5 + 12) * 3, dtype=torch.float32).reshape(2, 17, 3)
    fmap = TokenReshape(5, grid=(3, 4))(tokens)
    assert fmap.shape == (2, 3, 3, 4)
    torch.testing.assert_close(fmap[1, :, 1, 2], tokens[1, 5 + 1 * 4 + 2])
    square = TokenReshape(1)(torch.rand(1, 1 + 16, 8))
    assert square.shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        TokenReshape(1, grid=(3, 3))(torch.rand(1, 11, 8))


@pytest.fixture(scope="module")
def vit_init(tmp_path_factory):
    """A gmml-style export: a vit_tiny_patch8 state dict at 48 px with its backbone.json."""
    root = tmp_path_factory.mktemp("vit_init")
    torch.manual_seed(3)
    path = root / "backbone.pth"
    torch.save(export_state_dict(build_backbone("vit_tiny_patch8", "random", image_size=48)), path)
    write_sidecar(path, get_spec("vit_tiny_patch8"), method="gmml", image_size=48, fingerprint="0" * 64)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_vit")
    return {split: make_split(root, split, n, seed) for split, n, seed in
            (("train", 8, 0), ("val", 4, 1), ("test", 4, 2))}


def test_a_vit_init_builds_vitdet_from_its_sidecar_with_its_weights(vit_init):
    model = build_detector("resnet18", str(vit_init), res=RES, rpn_proposals=50)  # detection.arch ignored
    assert isinstance(model.backbone, ViTDetBackbone)
    stored = torch.load(vit_init, weights_only=True)
    vit_state = model.backbone.body.vit.state_dict()
    assert set(stored) == set(vit_state)
    for key, value in stored.items():
        torch.testing.assert_close(vit_state[key], value)
    assert all(p.requires_grad for p in model.backbone.parameters())  # a ViT trains whole
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 80, 96)])
    assert out[0]["boxes"].shape[1] == 4 and out[0]["boxes"].dtype == torch.float32


def test_vitdet_backbone_runs_in_bf16_and_the_heads_stay_fp32(vit_init):
    model = build_detector("vit_tiny_patch8", str(vit_init), res=RES, rpn_proposals=50).eval()
    set_precision(model, "cpu")
    with torch.no_grad():
        levels = model.backbone(torch.rand(1, 3, RES, RES))
        out = model([torch.rand(3, 64, 48)])
    assert all(v.dtype == torch.float32 for v in levels.values())
    assert out[0]["boxes"].dtype == torch.float32


def test_a_vit_init_detector_trains_predicts_and_rebuilds_from_its_meta(vit_init, data, tmp_path):
    out = tmp_path / "run"
    summary = train.train_detector(data["train"], data["val"], data["test"], out, init=str(vit_init), res=RES,
                                   seed=0, settings=tiny_settings(epochs=1, rpn_proposals=50, rois_per_image=16),
                                   device="cpu", init_name="gmml")
    assert summary["best_epoch"] == 1
    model, meta = load_detector(out / "best.pth")
    assert meta["arch"] == "vit_tiny_patch8" and meta["init_name"] == "gmml" and meta["norm"] == "layernorm"
    assert meta["vit_image_size"] == 48 and meta["patch_size"] == 8 and meta["frozen_stages"] == -1
    assert meta["neck"] == "simple_feature_pyramid"
    assert isinstance(model.backbone, ViTDetBackbone)
    # training moved the ViT away from its init
    stored = torch.load(vit_init, weights_only=True)
    assert not torch.equal(model.backbone.body.vit.blocks[0].attn.qkv.weight, stored["blocks.0.attn.qkv.weight"])
    # the rebuilt model predicts what the run wrote (same boxes for the same test images)
    written = json.loads((out / "predictions_test.json").read_text())
    loader = torch.utils.data.DataLoader(CocoDetection(data["test"]), batch_size=4, collate_fn=collate)
    again = train.predict_coco(model, loader, torch.device("cpu"), score_thr=meta["score_thr"])
    again = sorted(again, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))
    assert written and len(again) == len(written)
    assert [r["image_id"] for r in again] == [r["image_id"] for r in written]
    assert again[0]["bbox"] == pytest.approx(written[0]["bbox"], abs=0.02)


def test_a_random_vit_detection_arch_builds_vitdet():
    model = build_detector("vit_tiny_patch8", "random", res=RES, rpn_proposals=50)
    assert isinstance(model.backbone, ViTDetBackbone)
    assert model.backbone.body.vit.pos_embed.shape == (1, 1 + (224 // 8) ** 2, 192)


def test_mmdet_engine_refuses_a_vit_clearly(vit_init, tmp_path):
    from cxrssl.detection.mmdet_engine import prepare_backbone_checkpoint, refuse_vit

    with pytest.raises(ValueError, match="mmdet engine builds ResNets only, but init .* is a vit_tiny_patch8"):
        prepare_backbone_checkpoint(str(vit_init), "resnet18", tmp_path)
    with pytest.raises(ValueError, match="detection.arch is vit_small_patch16.*torchvision engine"):
        refuse_vit("random", "vit_small_patch16")
    refuse_vit("random", "resnet18")  # ResNets pass


# --- heatmaps -------------------------------------------------------------------------------------

def test_token_ablation_layer_ablates_channels_last():
    from cxrssl.cam.ablation import TokenAblationLayer

    layer = TokenAblationLayer()
    tokens = torch.rand(1, 5, 4) + 1.0
    layer.set_next_batch(0, tokens, 2)
    layer.indices = [1, 3]
    out = layer(None)
    assert out.shape == (2, 5, 4)
    assert (out[0, :, 1] < -1e6).all() and (out[1, :, 3] < -1e6).all()
    torch.testing.assert_close(out[0, :, [0, 2, 3]], tokens[0, :, [0, 2, 3]])


@pytest.fixture(scope="module")
def vit_detector(vit_init):
    torch.manual_seed(0)
    return build_detector("vit_tiny_patch8", str(vit_init), res=RES, score_thr=0.0, rpn_proposals=20).eval()


@pytest.mark.parametrize("target", ["backbone", "backbone.body", "backbone.body.vit.blocks.3"])
def test_heatmaps_of_a_vit_detector_at_each_target(vit_detector, target):
    from cxrssl.cam import compute_cam

    image = torch.rand(3, 48, 64)  # not square: padded inside the model
    result = compute_cam(vit_detector, image, ratio=0.05, batch_size=16, score_thr=0.5, top_k=2,
                         target_layer=target, min_grid=4)
    assert result.method == "ablation" and result.cam.shape == (48, 64)
    assert 0.0 <= result.cam.min() and result.cam.max() <= 1.0 and result.cam.max() > 0
    width = 256 * 5 if target == "backbone" else 192
    assert result.n_channels_ablated == -(-width * 5 // 100)


def test_token_target_equals_the_map_target_it_is_reshaped_to(vit_detector):
    from cxrssl.cam import compute_cam

    image = torch.rand(3, 64, 64)
    kwargs = dict(ratio=0.1, batch_size=32, score_thr=0.5, top_k=2)
    tokens = compute_cam(vit_detector, image, target_layer="backbone.body.vit.norm", **kwargs)
    fmap = compute_cam(vit_detector, image, target_layer="backbone.body", **kwargs)
    np.testing.assert_allclose(tokens.cam, fmap.cam, atol=1e-4)


def test_token_reshape_serves_grad_cam_on_a_plain_vit_encoder_with_registers():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrssl.cam.heatmaps import token_reshape_for

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64, reg_tokens=4, num_classes=3,
                            dynamic_img_size=True).eval()
    assert vit.num_prefix_tokens == 5
    layer = vit.blocks[-1].norm1
    reshape = token_reshape_for(vit, layer, 48, 80)  # a 3 x 5 grid, CLS and 4 registers dropped
    assert (reshape.num_prefix_tokens, reshape.grid) == (5, (3, 5))
    cam = GradCAM(model=vit, target_layers=[layer], reshape_transform=reshape)
    try:
        heat = cam(torch.rand(1, 3, 48, 80), targets=[ClassifierOutputTarget(1)])
    finally:
        cam.activations_and_grads.release()
    assert heat.shape == (1, 48, 80) and np.isfinite(heat).all()
    with pytest.raises(ValueError, match="in no ViT"):
        token_reshape_for(vit, torch.nn.Linear(2, 2), 48, 80)
