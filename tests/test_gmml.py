"""GMML (SPCXR's pretraining): group masking, corruption, loss, export into timm, DDP = one process.

Resume after a kill is checked with the other methods in test_pretrain.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cxrssl.models.backbones import build_backbone, library_model, read_sidecar
from cxrssl.ssl.methods.gmml import GMML, GMMLLoss, GMMLSample, ReconstructionHead, group_mask, patch_pixels, warmup_cosine
from cxrssl.ssl.train import pretrain
from test_pretrain import cli_args, make_nih, tiny_settings

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


# --- group masking -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(gh=st.integers(1, 14), gw=st.integers(1, 14), share=st.floats(0.01, 1.0), max_block=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_group_mask_covers_the_share_and_stops_there(gh, gw, share, max_block, seed):
    mask = group_mask((gh, gw), share, max_block, np.random.default_rng(seed))
    assert mask.shape == (gh, gw) and mask.dtype == bool
    cells = gh * gw
    block = max(1, round(max_block * gh)) * max(1, round(max_block * gw))
    covered = int(mask.sum())
    assert covered >= share * cells - 1e-9  # at least the share ...
    assert covered < np.ceil(share * cells - 1e-9) + block  # ... and drawing stopped at the first rectangle reaching it
    again = group_mask((gh, gw), share, max_block, np.random.default_rng(seed))
    assert np.array_equal(mask, again)  # seeded


def test_group_mask_rectangles_respect_max_block_and_differ_by_seed():
    # one rectangle only (share of one cell): its sides are at most round(0.3 * 20) = 6 cells
    for seed in range(50):
        mask = group_mask((20, 20), 1 / 400, 0.3, np.random.default_rng(seed))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == len(rows) * len(cols)  # a filled rectangle
        assert len(rows) <= 6 and len(cols) <= 6
    masks = {group_mask((14, 14), 0.5, 0.3, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert len(masks) == 10
    with pytest.raises(ValueError):
        group_mask((4, 4), 0.0, 0.3, np.random.default_rng(0))


class Images:
    """An image source like NIHImages: ``image(i)`` and ``len``."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return torch.from_numpy(self.images[i].copy())[None]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), size_cells=st.integers(2, 6), patch=st.sampled_from([4, 8]),
       replace=st.booleans())
def test_corruption_is_aligned_to_the_patch_grid_and_seeded(seed, size_cells, patch, replace):
    size = size_cells * patch
    # image 0 black, image 1 white: flip, crop, blur and jitter keep each constant (white stays >= 229)
    images = Images(np.stack([np.zeros((40, 40), np.uint8), np.full((40, 40), 255, np.uint8)]))
    sample = GMMLSample("original", size, patch, (0.5, 0.75), 0.3, replace_prob=float(replace), replace_ratio=0.3)
    clean, corrupted, cells = sample(images, 0, seed)
    assert clean.shape == corrupted.shape == (1, size, size) and clean.dtype == corrupted.dtype == torch.uint8
    assert cells.shape == (1, size_cells, size_cells) and cells.dtype == torch.bool
    pixels = patch_pixels(cells, patch)[0]
    assert torch.equal(corrupted[0][~pixels], clean[0][~pixels])  # nothing outside the masked patches
    assert (clean == 0).all()
    share = cells.float().mean().item()
    if replace:  # another image's pixels over the masked patches
        assert share >= 0.3 - 1e-6 and (corrupted[0][pixels] >= 229).all()
    else:  # noise over the masked patches
        assert share >= 0.5 - 1e-6 and corrupted[0][pixels].float().std() > 20
    for a, b in zip((clean, corrupted, cells), sample(images, 0, seed)):
        assert torch.equal(a, b)
    # the seed decides the corruption: on a 2 x 2 grid two seeds can draw the same few cells (with a
    # constant donor image the corruption is then equal too), but eight seeds do not all agree
    others = [sample(images, 0, (seed + k) % 2**63) for k in range(1, 9)]
    assert any(not (torch.equal(o[2], cells) and torch.equal(o[1], corrupted)) for o in others)


# --- loss, head, schedule ------------------------------------------------------------------------------

def naive_gmml_loss(r: np.ndarray, t: np.ndarray, m: np.ndarray, masked_only: bool) -> float:
    """Mean of |r - t| over the corrupted pixels of every channel (or over all), element by element."""
    total, count = 0.0, 0
    b, c, h, w = r.shape
    for i in range(b):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    if m[i, 0, y, x] or not masked_only:
                        total += abs(r[i, ch, y, x] - t[i, ch, y, x])
                        count += 1
    return total / count


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       seed=st.integers(0, 2**16), masked_only=st.booleans())
def test_gmml_loss_equals_its_definition(b, c, h, w, seed, masked_only):
    g = torch.Generator().manual_seed(seed)
    r, t = torch.randn(b, c, h, w, generator=g, dtype=torch.float64), torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    m = torch.rand(b, 1, h, w, generator=g) < 0.5
    m.view(-1)[0] = True  # at least one corrupted pixel
    loss = GMMLLoss(masked_only)(r, t, m)
    assert loss.item() == pytest.approx(naive_gmml_loss(r.numpy(), t.numpy(), m.numpy(), masked_only), rel=1e-12)


def test_model_reconstructs_pixels_and_its_loss_is_the_l1_of_the_corrupted_area():
    torch.manual_seed(0)
    encoder = build_backbone("vit_tiny_patch8", "random", image_size=32)
    model = GMML(encoder, 192, 8, 3, masked_only=True).eval()
    x, target = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    mask = patch_pixels(torch.rand(2, 1, 4, 4) < 0.5, 8)
    mask[0, 0, :8, :8] = True
    recon = model.reconstruct(x)
    assert recon.shape == (2, 3, 32, 32)
    expected = (recon - target).abs()[mask.expand(-1, 3, -1, -1)].mean()
    torch.testing.assert_close(model(x, target, mask), expected)
    head = ReconstructionHead(16, 4, 0)
    assert head(torch.randn(1, 6, 16), (2, 3)).shape == (1, 3, 8, 12)  # non-square grids too


def test_schedule_warms_up_then_decays_to_the_minimum():
    assert warmup_cosine(0, 100, 10, 1.0, 0.01) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.01) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0, 0.01) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert warmup_cosine(0, 100, 0, 0.04, 0.4) == pytest.approx(0.04)  # weight decay: rises to its end value
    assert warmup_cosine(100, 100, 0, 0.04, 0.4) == pytest.approx(0.4)


def test_adamw_groups_spare_norms_biases_and_the_position_embedding():
    from cxrssl.ssl.methods.gmml import GMMLMethod

    s = tiny_settings("gmml")
    method = GMMLMethod(s["gmml"], s)
    model = method.build_model(build_backbone("vit_tiny_patch8", "random", image_size=16), 8)
    opt = method.optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight", "head.to_pixels.bias"} <= spared
    assert {"backbone.patch_embed.proj.weight", "head.mlp.0.weight", "head.to_pixels.weight"} <= decayed
    lrs = method.schedule(opt, 3, 6, 2, 8)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == lrs["weight_decay"]
    assert lrs["lr"] == pytest.approx(warmup_cosine(3, 6, 2, s["gmml"]["lr"] * 8 / 256, s["gmml"]["min_lr"]))
    with pytest.raises(ValueError, match="vit"):
        GMMLMethod(dict(s["gmml"], arch="resnet18"), s)


# --- export and DDP ------------------------------------------------------------------------------------

def test_exported_vit_loads_into_timm_unchanged(tmp_path):
    index, cache = make_nih(tmp_path / "data")
    path = pretrain(index, cache, tmp_path / "run", tiny_settings("gmml", epochs=1), method="gmml", seed=0, device="cpu")
    state = torch.load(path, weights_only=True)
    meta = read_sidecar(path)
    assert (meta["library"], meta["model_name"], meta["patch_size"]) == ("timm", "vit_tiny_patch16_224", 8)
    net = timm.create_model("vit_tiny_patch16_224", patch_size=8, depth=4, img_size=16)  # the library, unchanged
    result = net.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"head.weight", "head.bias"}
    again = library_model(meta)
    assert again.load_state_dict(state, strict=False).unexpected_keys == []
    # the trained encoder and timm's model compute the same features
    encoder = build_backbone("vit_tiny_patch8", str(path), image_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(encoder.forward_features(x), net.eval().forward_features(x))
    torch.manual_seed(0)
    assert not torch.equal(build_backbone("vit_tiny_patch8", "random", image_size=16).pos_embed, state["pos_embed"])


def test_torchrun_gmml_matches_single_process(tmp_path):
    """2 gloo processes with the global batch split = 1 process with the whole batch (float rounding)."""
    index, cache = make_nih(tmp_path / "data", n=20, size=16)
    s = tiny_settings("gmml", epochs=2, warmup_epochs=0, lr=0.05, checkpoint_every=1, replace_prob=0.5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "scripts" / "pretrain.py"), "--index", str(index), "--cache", str(cache),
           "--out-dir", str(tmp_path / "ddp"), "--seed", "4", "--device", "cpu", "--threads", "2",
           "--log-file", str(tmp_path / "ddp.log"), *cli_args(s, "gmml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CXRSSL_PROGRESS="0", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in (tmp_path / "ddp.log").read_text()
    single = pretrain(index, cache, tmp_path / "single", s, method="gmml", seed=4, device="cpu")
    a, b = torch.load(tmp_path / "ddp" / "backbone.pth", weights_only=True), torch.load(single, weights_only=True)
    torch.manual_seed(4)
    init = build_backbone("vit_tiny_patch8", "random", image_size=16).state_dict()
    m_ddp, m_one = (pd.read_csv(p / "metrics.csv") for p in (tmp_path / "ddp", tmp_path / "single"))
    assert len(m_ddp) == len(m_one) == 4  # 16 train_val images / batch 8, 2 epochs
    np.testing.assert_allclose(m_ddp["loss"], m_one["loss"], rtol=1e-5)  # the loss of the global batch
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        update = b[k] - init[k]
        if init[k].ndim > 1 and k.endswith(".weight"):  # Adam moves each weight by about lr per step
            assert update.norm() < 0.5 * init[k].norm(), f"{k}: not the initial state assumed"
        moved = max(moved, update.abs().max().item())
        if update.norm() > 0:
            err = (a[k] - b[k]).norm() / update.norm()
            assert err < 1e-3, f"{k}: DDP and single-process updates differ by {err:.2e}"
    assert moved > 1e-3  # training moved the weights far beyond the tolerance
