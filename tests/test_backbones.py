"""Backbone registry: library-loadable exports, sidecars, ImageNet weights, and files that hold code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from cxrssl.errors import BadInputError
from cxrssl.models import backbones
from cxrssl.models.backbone import WeightsUnavailableError, build_resnet
from cxrssl.models.backbones import (BACKBONES, build_backbone, export_state_dict, feature_extractor, get_spec,
                                     read_sidecar, write_sidecar)

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_exports_what_its_library_loads_unchanged(arch, tmp_path):
    spec = get_spec(arch)
    size = 224 if spec.family == "resnet" or spec.imagenet else 32
    encoder = build_backbone(arch, "random", image_size=size)
    path = tmp_path / "backbone.pth"
    torch.save(export_state_dict(encoder), path)
    state = torch.load(path, weights_only=True)
    if spec.library == "torchvision":
        plain = getattr(torchvision.models, arch)()
        missing = {"fc.weight", "fc.bias"}
    else:  # ViT-S/16 and ViT-B/16 at timm's own defaults, the demo ViT with its sidecar's arguments
        plain = timm.create_model(spec.model_name, **({} if spec.imagenet else spec.library_kwargs(size)))
        missing = {"head.weight", "head.bias"}
    result = plain.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == missing
    x = torch.randn(2, 3, size, size)
    features = feature_extractor(encoder.eval())(x)
    assert features.shape == (2, spec.feature_dim)


def test_sidecar_round_trip_and_refusals(tmp_path):
    spec = get_spec("vit_tiny_patch8")
    path = tmp_path / "backbone.pth"
    torch.save(export_state_dict(build_backbone("vit_tiny_patch8", "random", image_size=48)), path)
    write_sidecar(path, spec, method="gmml", image_size=48, fingerprint="f" * 64)
    meta = read_sidecar(path)
    assert meta["model_kwargs"] == {"patch_size": 8, "depth": 4, "img_size": 48} and meta["feature_dim"] == 192
    assert backbones.checkpoint_arch(str(path), "resnet18") == "vit_tiny_patch8"
    assert backbones.checkpoint_arch("random", "resnet18") == "resnet18"
    # another arch than the run builds, and the ResNet entry point of detection
    with pytest.raises(BadInputError, match="is a vit_tiny_patch8 backbone, not the resnet18"):
        build_backbone("resnet18", str(path))
    with pytest.raises(BadInputError, match=r"vit_tiny_patch8 \(timm\) backbone from gmml pretraining"):
        build_resnet("resnet18", str(path))
    # a ViT at another image size: the position embedding is resampled (8 x 8 grid at 64 px)
    bigger = build_backbone("vit_tiny_patch8", str(path), image_size=64)
    assert bigger.pos_embed.shape == (1, 65, 192)
    assert torch.equal(bigger.patch_embed.proj.weight, torch.load(path, weights_only=True)["patch_embed.proj.weight"])
    (tmp_path / "backbone.json").write_text("{not json")
    with pytest.raises(BadInputError, match=r"backbone\.json: not a readable backbone sidecar"):
        read_sidecar(path)
    (tmp_path / "backbone.json").write_text(json.dumps({**meta, "arch": "vit_huge"}))
    with pytest.raises(BadInputError, match="unknown arch 'vit_huge'"):
        read_sidecar(path)


def test_vit_imagenet_offline_names_what_to_download(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("vit_small_patch16", "imagenet")
    message = str(info.value)
    assert "timm/vit_small_patch16_224" in message and "imagenet_weights" in message
    with pytest.raises(ValueError, match="without ImageNet weights"):
        build_backbone("vit_tiny_patch8", "imagenet", image_size=32)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_imagenet_from_a_local_file_at_another_size(tmp_path, suffix):
    """A hub checkpoint (classifier and all, at 224 px) initialises the encoder at 112 px."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch16_224")
    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    model = build_backbone("vit_small_patch16", "imagenet", imagenet_weights=path, image_size=112)
    assert model.pos_embed.shape == (1, 50, 384)
    assert torch.equal(model.blocks[3].attn.qkv.weight, reference.blocks[3].attn.qkv.weight)


# --- files that would run code when unpickled ------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command (it creates ``marker``): what a hostile checkpoint holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def hostile(tmp_path) -> tuple[Path, Path]:
    """A torch file holding the payload, checked to be real (a plain load runs it), and its marker."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the unsafe load, once: the payload is real
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_hostile_pretraining_resume_checkpoint_is_refused(hostile, tmp_path):
    from test_pretrain import make_nih, tiny_settings

    from cxrssl.ssl.train import pretrain

    path, marker = hostile
    index, cache = make_nih(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(path.read_bytes())
    with pytest.raises(BadInputError, match=r"checkpoint\.pth: not a loadable pretraining resume checkpoint"):
        pretrain(index, cache, run, tiny_settings(), seed=0, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("method", ["barlowtwins", "gmml"])
def test_hostile_pretraining_init_is_refused(hostile, tmp_path, method):
    from test_pretrain import make_nih, tiny_settings

    from cxrssl.ssl.train import pretrain

    path, marker = hostile
    index, cache = make_nih(tmp_path / "data")
    with pytest.raises(BadInputError, match=r"evil\.pth: not a loadable backbone checkpoint"):
        pretrain(index, cache, tmp_path / "run", tiny_settings(method, init=str(path)), method=method, seed=0,
                 device="cpu")
    assert not marker.exists()


def test_hostile_imagenet_files_are_refused(hostile):
    path, marker = hostile
    with pytest.raises(BadInputError, match="not a loadable ImageNet weights"):
        build_backbone("vit_small_patch16", "imagenet", imagenet_weights=path, image_size=32)
    with pytest.raises(BadInputError, match=r"evil\.pth: not a loadable"):
        build_resnet("resnet18", "imagenet", imagenet_weights=path)
    assert not marker.exists()


def test_hostile_linear_eval_init_is_refused(hostile, tmp_path):
    from test_linear_eval import synthetic_images, synthetic_index, write_dataset

    from cxrssl.classes import NIH_FINDINGS

    path, marker = hostile
    index = synthetic_index(12, 1, 4)
    images = synthetic_images(index[list(NIH_FINDINGS)].to_numpy(), np.random.default_rng(0))
    index_path, cache_path = write_dataset(tmp_path / "data", index, images)
    done = subprocess.run([sys.executable, "scripts/linear_eval.py", "--init", str(path), "--fraction", "1.0",
                           "--index", str(index_path), "--cache", str(cache_path), "--out-dir", str(tmp_path / "run"),
                           "--arch", "resnet18", "--epochs", "1", "--image-size", "16", "--workers", "0",
                           "--val-fraction", "0.5"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "CXRSSL_PROGRESS": "0"})
    assert done.returncode != 0
    assert "BadInputError" in done.stderr and "evil.pth: not a loadable backbone checkpoint" in done.stderr
    assert not marker.exists()
