"""Pretraining: Barlow Twins loss, LARS, schedule, augmentations, data, the method registry, VICReg,
resume and export (GMML has its own file, test_gmml.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cxrssl.config import section_defaults, section_schema, section_to_cli
from cxrssl.errors import BadInputError
from torchvision.transforms import v2

from cxrssl.ssl.augment import SeparableGaussianBlur, TwoViews, normalize_views, original_transforms, sample_seed
from cxrssl.ssl.methods.barlowtwins import (BarlowTwins, barlow_twins_loss, build_projector,
                                           cross_correlation, off_diagonal)
from cxrssl.ssl.data import NIHPairDataset, PairSampler, pretrain_rows
from cxrssl.ssl.lars import LARS, lars_param_groups, lr_factor, set_learning_rates
from cxrssl.ssl.train import METRIC_COLUMNS, pretrain

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def make_nih(folder: Path, n: int = 30, size: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """A random uint8 cache and an index in the NIH_INDEX contract (every 5th image is `test`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "cache.npy"
    np.save(cache, rng.integers(0, 256, (n, size, size), dtype=np.uint8))
    index = folder / "index.csv"
    pd.DataFrame({
        "image_index": [f"{i:08d}_000.png" for i in range(n)],
        "patient_id": np.arange(n) // 2,
        "official_split": ["test" if i % 5 == 0 else "train_val" for i in range(n)],
        "path": [f"images/{i:08d}_000.png" for i in range(n)],
        "Atelectasis": 0,
        "cache_row": rng.permutation(n),
    }).to_csv(index, index=False)
    return index, cache


TINY_BLOCKS = {
    "barlowtwins": dict(arch="resnet18", init="random", projector=[32, 32], augment="original"),
    "vicreg": dict(arch="resnet18", init="random", hidden_dim=32, output_dim=32, augment="original"),
    "gmml": dict(arch="vit_tiny_patch8", init="random"),
}


def tiny_settings(method: str = "barlowtwins", **over) -> dict:
    """The `pretrain` section at test sizes; ``over`` keys of the shared settings go there, the
    others into the method's block."""
    s = section_defaults("pretrain")
    s.update(batch_size=8, epochs=2, warmup_epochs=1, image_size=16, workers=0, checkpoint_every=2)
    s.update(monitor_every_epochs=0)  # make_nih's index has one finding column: no kNN monitor (test_tracking)
    s[method].update(TINY_BLOCKS[method])
    for key, value in over.items():
        (s if key in s else s[method])[key] = value
    return s


def cli_args(s: dict, method: str) -> list[str]:
    """The script flags of a `pretrain` section for ``method`` (as the rule renders them)."""
    return ["--method", method, *section_to_cli("pretrain", s, exclude=("methods",)),
            *section_to_cli(f"pretrain.{method}", s[method])]


# --- loss ----------------------------------------------------------------------------------------

def naive_loss(z1: np.ndarray, z2: np.ndarray, lambd: float, eps: float = 1e-5) -> float:
    """The Barlow Twins loss written out element by element (float64)."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / np.sqrt(z1.var(0) + eps)  # BatchNorm1d(affine=False), biased variance
    b = (z2 - z2.mean(0)) / np.sqrt(z2.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total += (c_ij - 1) ** 2 if i == j else lambd * c_ij ** 2
    return total


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(1, 7), lambd=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_loss_equals_naive_formula(n, d, lambd, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    bn = nn.BatchNorm1d(d, affine=False).double()
    loss = barlow_twins_loss(cross_correlation(bn(z1), bn(z2), n), lambd)
    assert loss.item() == pytest.approx(naive_loss(z1.numpy(), z2.numpy(), lambd), rel=1e-9, abs=1e-9)


def test_model_forward_is_the_loss_of_its_embeddings():
    torch.manual_seed(0)
    model = BarlowTwins(torchvision.models.resnet18(), 512, [16, 8], lambd=0.3, global_batch=4)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    model.eval()  # freeze BN statistics so embed() is a pure function of the input
    z1, z2 = model.embed(x1).double().detach().numpy(), model.embed(x2).double().detach().numpy()
    model.train()
    model.backbone.eval(), model.projector.eval()  # only the final BN normalises over the batch
    assert model(x1, x2).item() == pytest.approx(naive_loss(z1, z2, 0.3), rel=1e-4)
    assert isinstance(model.backbone.fc, nn.Identity)


def test_off_diagonal_and_projector():
    x = torch.arange(16.0).view(4, 4)
    assert sorted(off_diagonal(x).tolist()) == sorted(v for v in range(16) if v % 5)
    proj = build_projector(512, [64, 64, 32])
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert [m.out_features for m in proj if isinstance(m, nn.Linear)] == [64, 64, 32]
    with pytest.raises(ValueError):
        build_projector(512, [])


# --- LARS and schedule ---------------------------------------------------------------------------

def reference_lars_step(p, g, mu, lr, wd, exclude, momentum=0.9, eta=0.001):
    """REFERENCE.md's definition, in float64."""
    dp = g.copy()
    if not exclude:
        dp = dp + wd * p
        pn, dn = np.linalg.norm(p), np.linalg.norm(dp)
        q = eta * pn / dn if pn > 0 and dn > 0 else 1.0
        dp = q * dp
    mu = momentum * mu + dp
    return p - lr * mu, mu


def test_lars_step_matches_definition():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[2].weight.zero_()  # |p| = 0: trust ratio must be 1
    params = dict(model.named_parameters())
    groups = lars_param_groups(model)
    assert {id(p) for p in groups[0]["params"]} == {id(params["0.weight"]), id(params["2.weight"])}
    assert {id(p) for p in groups[1]["params"]} == {id(params[k]) for k in ("0.bias", "1.weight", "1.bias")}
    opt = LARS(groups, lr=0.0, weight_decay=0.05)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.7, 0.3
    ref = {k: (p.detach().double().numpy().copy(), np.zeros(p.shape)) for k, p in params.items()}
    for it in range(3):  # several steps: momentum accumulates
        grads = {k: torch.randn_like(p) for k, p in params.items()}
        if it == 1:
            grads["0.bias"].zero_()  # |dp| = 0 on an excluded param
        for k, p in params.items():
            p.grad = grads[k].clone()
        opt.step()
        for k, p in params.items():
            exclude = p.ndim == 1
            lr = 0.3 if exclude else 0.7
            new_p, new_mu = reference_lars_step(ref[k][0], grads[k].double().numpy(), ref[k][1], lr, 0.05, exclude)
            ref[k] = (new_p, new_mu)
            np.testing.assert_allclose(p.detach().double().numpy(), new_p, rtol=1e-5, atol=1e-7, err_msg=k)
    assert opt.param_groups[1]["exclude"] and not opt.param_groups[0]["exclude"]


def test_lars_zero_gradient_weight_uses_trust_one():
    p = nn.Parameter(torch.ones(2, 2))
    opt = LARS([dict(params=[p], exclude=False)], lr=1.0, weight_decay=0.0)
    p.grad = torch.zeros(2, 2)
    opt.step()  # dp = 0 -> q = 1 -> no change and no NaN
    assert torch.equal(p.detach(), torch.ones(2, 2))


def test_lr_schedule():
    total, warm = 100, 10
    assert lr_factor(0, total, warm) == 0.0
    assert lr_factor(5, total, warm) == pytest.approx(0.5)
    assert lr_factor(10, total, warm) == pytest.approx(1.0)
    assert lr_factor(total, total, warm) == pytest.approx(0.001)
    mid = warm + (total - warm) // 2
    assert lr_factor(mid, total, warm) == pytest.approx(0.5 * 1 + 0.5 * 0.001)
    values = [lr_factor(s, total, warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone cosine decay
    assert lr_factor(0, total, 0) == 1.0  # no warm-up
    opt = LARS(lars_param_groups(nn.Linear(2, 2)))
    lw, lb = set_learning_rates(opt, 10, total, warm, 0.2, 0.0048, global_batch=512)
    assert (lw, lb) == pytest.approx((0.4, 0.0096))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.0096])


# --- augmentations -------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["original", "cxr"])
def test_two_views(recipe):
    channels = 1
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 40, 40), dtype=np.uint8))
    views = TwoViews(recipe, 24)
    state = torch.get_rng_state()
    v1, v2 = views(img, 123)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched
    assert v1.dtype == torch.uint8 and v1.shape == (channels, 24, 24) and v2.shape == v1.shape
    w1, w2 = views(img, 123)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # seeded per sample
    others = [views(img, s) for s in range(1, 6)]
    assert any(not torch.equal(v1, o[0]) for o in others)
    assert not torch.equal(v1, v2)  # two different views
    x = normalize_views(torch.stack([v1, w1]), torch.device("cpu"))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32
    expect = (v1[0].float() / 255 - 0.485) / 0.229
    torch.testing.assert_close(x[0, 0], expect)
    with pytest.raises(ValueError):
        TwoViews("rotate", 24)
    with pytest.raises(ValueError):
        views(img.float(), 0)


def test_original_recipe_on_one_channel_equals_the_rgb_recipe():
    """The paper's transforms on the grey channel = on the RGB-converted image (same draws)."""
    img = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (1, 48, 48), dtype=np.uint8))
    t1, t2 = original_transforms(24)
    gen = torch.default_generator
    for seed in range(12):
        gen.manual_seed(seed)
        grey = (t1(img), t2(img))
        gen.manual_seed(seed)
        rgb = (t1(img.expand(3, -1, -1)), t2(img.expand(3, -1, -1)))
        for g, c in zip(grey, rgb):
            assert (g.int() - c.int()).abs().max() <= 3  # rounding only
            assert (c.int().amax(0) - c.int().amin(0)).max() <= 3  # the RGB views stay grey
        gen.manual_seed(seed + 100)
        other = t1(img)
        assert (other.int() - grey[0].int()).abs().max() > 3  # another seed is another view


def test_separable_blur_matches_torchvision():
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (1, 40, 40), dtype=np.uint8))
    ours = SeparableGaussianBlur((1.5, 1.5))
    ref = v2.GaussianBlur(2 * math.ceil(4.5) + 1, sigma=(1.5, 1.5))
    assert (ours(img).int() - ref(img).int()).abs().max() <= 1
    assert ours(img.float()).dtype == torch.float32


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(0, e, i) for e in range(3) for i in range(200)}
    assert len(seeds) == 600 and all(0 <= s < 2**63 for s in seeds)


# --- data ----------------------------------------------------------------------------------------

@given(n=st.integers(8, 60), batch=st.sampled_from([2, 4, 8]), world=st.sampled_from([1, 2]),
       start=st.integers(0, 3))
@settings(max_examples=25, deadline=None)
def test_sampler_is_world_size_invariant_and_resumable(n, batch, world, start):
    single = PairSampler(n, batch, 1, 0, seed=3)
    single.set_epoch(2)
    full = list(single)
    per_epoch = n // batch
    assert len(full) == per_epoch * batch and len(set(full)) == len(full)
    assert all(e == 2 for e, _ in full)
    ranks = [PairSampler(n, batch, world, r, seed=3) for r in range(world)]
    start = min(start, per_epoch)
    for s in ranks:
        s.set_epoch(2, start)
    parts = [list(s) for s in ranks]
    local = batch // world
    rebuilt = [x for b in range(per_epoch - start) for part in parts for x in part[b * local:(b + 1) * local]]
    assert rebuilt == full[start * batch:]
    other = PairSampler(n, batch, 1, 0, seed=3)
    other.set_epoch(3)
    assert n < 2 * batch or list(other) != full  # a new order each epoch


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        PairSampler(10, 5, 2, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        PairSampler(3, 4)


def test_dataset_uses_train_val_only(tmp_path):
    index, cache = make_nih(tmp_path)
    frame = pd.read_csv(index)
    ds = NIHPairDataset(index, cache, TwoViews("cxr", 16), seed=0)
    expected = frame.loc[frame["official_split"] == "train_val", "cache_row"].to_numpy()
    assert np.array_equal(ds.rows, expected) and len(ds) == 24
    test_rows = set(frame.loc[frame["official_split"] == "test", "cache_row"])
    assert not test_rows & set(ds.rows.tolist())
    v1, v2 = ds[(0, 3)]
    assert v1.shape == (1, 16, 16)
    assert torch.equal(ds[(0, 3)][0], v1) and not torch.equal(ds[(1, 3)][0], v1)


def test_dataset_errors_name_file_and_row(tmp_path):
    index, cache = make_nih(tmp_path)
    frame = pd.read_csv(index)
    frame.loc[4, "cache_row"] = 999
    frame.to_csv(index, index=False)
    with pytest.raises(BadInputError, match=r"index.csv:row 5 \(line 6\).*cache_row '999'"):
        pretrain_rows(index, 30)
    frame.loc[4, "cache_row"] = 1
    frame.loc[7, "official_split"] = "val"
    frame.to_csv(index, index=False)
    with pytest.raises(BadInputError, match=r"row 8 \(line 9\).*'val'"):
        pretrain_rows(index, 30)
    frame.drop(columns="cache_row").to_csv(index, index=False)
    with pytest.raises(BadInputError, match="missing column"):
        pretrain_rows(index, 30)
    np.save(cache, np.zeros((30, 8, 8), dtype=np.float32))
    with pytest.raises(BadInputError, match="uint8"):
        NIHPairDataset(index, cache, TwoViews("cxr", 16), 0)


# --- training: resume after a stop gives the same weights; export loads into torchvision ---------

def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    index, cache = make_nih(tmp_path / "data")
    s = tiny_settings()  # 24 images / batch 8 = 3 steps per epoch, 6 steps, checkpoints at 2, 4, 6
    full = pretrain(index, cache, tmp_path / "full", s, seed=5, device="cpu")
    assert pretrain(index, cache, tmp_path / "cut", s, seed=5, device="cpu", stop_after_steps=5) is None
    assert not (tmp_path / "cut" / "backbone.pth").exists()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=False)
    assert ckpt["step"] == 4 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 1  # step 5 is lost, as in a kill
    assert {"model", "optimizer", "rng", "fingerprint", "metrics"} <= set(ckpt)
    resumed = pretrain(index, cache, tmp_path / "cut", s, seed=5, device="cpu")

    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    m_full, m_cut = (pd.read_csv(p.parent / "metrics.csv") for p in (full, resumed))
    assert list(m_full.columns) == METRIC_COLUMNS and m_full["step"].tolist() == list(range(1, 7))
    np.testing.assert_array_equal(m_full["loss"], m_cut["loss"])
    # the resumed run really started at step 4: steps 1-4 (timings included) come from the checkpoint
    np.testing.assert_array_equal(m_cut["images_per_s"][:4], [r["images_per_s"] for r in ckpt["metrics"]])
    assert not np.array_equal(m_cut["images_per_s"][:4], m_full["images_per_s"][:4])
    np.testing.assert_array_equal(m_full["lr_weights"], m_cut["lr_weights"])
    assert m_full["epoch"].tolist() == [0, 0, 0, 1, 1, 1] and np.isfinite(m_full["loss"]).all()
    assert (full.parent / "loss.png").stat().st_size > 1000

    # the export is a torchvision ResNet state dict without fc (its sidecar says so), and training changed it
    assert not any(k.startswith("fc.") for k in a)
    net = torchvision.models.resnet18()
    result = net.load_state_dict(a, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"fc.weight", "fc.bias"}
    torch.manual_seed(5)
    init = torchvision.models.resnet18().state_dict()
    assert not torch.equal(init["conv1.weight"], a["conv1.weight"])

    # a finished checkpoint, or one from other settings, is not resumed
    other = pretrain(index, cache, tmp_path / "cut", tiny_settings(epochs=1), seed=5, device="cpu")
    assert len(pd.read_csv(other.parent / "metrics.csv")) == 3


def test_script_help():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--index", "--cache", "--out-dir", "--seed", "--imagenet-weights", "--log", "--device",
                 "--batch-size", "--checkpoint-every", "--augment", "--stop-after-steps"):
        assert flag in out


# --- the method registry ---------------------------------------------------------------------------

def test_registry_matches_the_schema_blocks():
    """A method is its module plus its schema block: both sides list the same names (the methods
    with their own rules, multimodal, have a block and no module of the shared loop)."""
    from cxrssl.config import OWN_RULE_METHODS, registry_methods
    from cxrssl.models.backbones import BACKBONES
    from cxrssl.ssl.registry import methods

    found = methods()
    props = section_schema("pretrain")["properties"]
    blocks = {k for k, v in props.items() if v.get("type") == "object"}
    assert set(found) == blocks - set(OWN_RULE_METHODS) == set(registry_methods()) == {"barlowtwins", "vicreg", "gmml"}
    assert set(OWN_RULE_METHODS) == {"multimodal"} <= blocks
    common = {k for k, v in props.items() if v.get("type") != "object"}
    for name, cls in found.items():
        block = props[name]["properties"]
        assert {"arch", "init"} <= set(block), name
        assert not common & set(block), f"{name} reuses shared flag names {common & set(block)}"
        assert set(block["arch"]["enum"]) <= set(BACKBONES)
        assert all(BACKBONES[a].family in cls.families for a in block["arch"]["enum"]), name
        assert cls.lr_columns and cls.name == name


def test_random_resnet_for_pretraining_zero_inits_the_residuals():
    """The authors' random-init arm used zero_init_residual=True (issue 10.3)."""
    from cxrssl.ssl.train import build_encoder

    s = tiny_settings()
    encoder = build_encoder(s["barlowtwins"], s["image_size"], None)
    assert all(block.bn2.weight.abs().sum() == 0 for layer in (encoder.layer1, encoder.layer4) for block in layer)
    assert encoder.bn1.weight.abs().sum() > 0


def test_method_setting_reaches_the_script():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain.py"), "--method", "gmml", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--mask-ratio", "--replace-prob", "--loss-on", "--clip-grad", "--batch-size", "--arch"):
        assert flag in out
    assert "--lambd" not in out and "--methods" not in out


# --- VICReg (lightly's loss and head) ----------------------------------------------------------------

def naive_vicreg(za: np.ndarray, zb: np.ndarray, lam=25.0, mu=25.0, nu=1.0, eps=1e-4) -> float:
    """VICReg's loss (Bardes et al. 2022, eqs. 1-6), written out in float64."""
    n, d = za.shape
    inv = ((za - zb) ** 2).mean()

    def var(z):
        return np.mean(np.maximum(0.0, 1.0 - np.sqrt(z.var(0, ddof=1) + eps)))

    def cov(z):
        c = (z - z.mean(0)).T @ (z - z.mean(0)) / (n - 1)
        return (c ** 2).sum() / d - (np.diag(c) ** 2).sum() / d

    return lam * inv + mu * 0.5 * (var(za) + var(zb)) + nu * (cov(za) + cov(zb))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(2, 7), seed=st.integers(0, 2**16),
       weights=st.tuples(st.floats(0, 30), st.floats(0, 30), st.floats(0, 3)))
def test_vicreg_loss_equals_its_definition(n, d, seed, weights):
    from lightly.loss import VICRegLoss

    g = torch.Generator().manual_seed(seed)
    za, zb = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    loss = VICRegLoss(*weights)(za, zb)
    assert loss.item() == pytest.approx(naive_vicreg(za.numpy(), zb.numpy(), *weights), rel=1e-9, abs=1e-9)


def test_vicreg_model_is_the_loss_of_its_projections():
    from cxrssl.ssl.methods.vicreg import VICReg

    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    backbone.fc = nn.Identity()
    model = VICReg(backbone, 512, 16, 8, 3, 25.0, 25.0, 1.0).eval()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    za, zb = (model.projector(backbone(x)).double().detach().numpy() for x in (x1, x2))
    assert model(x1, x2).item() == pytest.approx(naive_vicreg(za, zb), rel=1e-4)
    kinds = [type(m).__name__ for m in model.projector.layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]


@pytest.mark.parametrize("method", ["vicreg", "gmml"])
def test_resume_after_stop_is_bit_identical_for_every_method(method, tmp_path):
    """Killed after 5 of 6 steps (checkpoint at 4), resumed: the same weights and losses, bit for bit."""
    from cxrssl.models.backbones import read_sidecar
    from cxrssl.ssl.train import metric_columns
    from cxrssl.ssl.registry import get_method

    index, cache = make_nih(tmp_path / "data")
    s = tiny_settings(method)
    full = pretrain(index, cache, tmp_path / "full", s, method=method, seed=2, device="cpu")
    assert pretrain(index, cache, tmp_path / "cut", s, method=method, seed=2, device="cpu", stop_after_steps=5) is None
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 4
    resumed = pretrain(index, cache, tmp_path / "cut", s, method=method, seed=2, device="cpu")
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_full, m_cut = (pd.read_csv(p.parent / "metrics.csv") for p in (full, resumed))
    assert list(m_full.columns) == metric_columns(get_method(method))
    np.testing.assert_array_equal(m_full["loss"], m_cut["loss"])
    assert np.isfinite(m_full["loss"]).all() and m_full["loss"].nunique() > 1
    meta = read_sidecar(full)
    assert meta["method"] == method and meta["arch"] == s[method]["arch"] and meta["image_size"] == 16
    assert meta == read_sidecar(resumed)
