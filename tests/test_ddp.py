"""DDP (2 CPU processes, gloo) trains exactly like one process with the same global batch.

This checks the distributed pieces the paper's method depends on: batch norm over the global
batch, the cross-correlation summed over ranks (autograd-aware), DDP gradient averaging, and the
sampler that gives every rank its slice of the same global batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cxrssl.ssl.methods.barlowtwins import BarlowTwins
from cxrssl.runtime import AllReduceBatchNorm, sync_batchnorm
from cxrssl.ssl.lars import LARS, lars_param_groups

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, WORLD = 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 + pooling (no conv bias before BN: its true gradient is 0, i.e. pure noise)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def _model() -> BarlowTwins:
    torch.manual_seed(0)
    return BarlowTwins(TinyNet(), 16, [32, 16], lambd=0.0051, global_batch=GLOBAL_BATCH)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g), torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g)


def _train_step(model, net, x1, x2) -> tuple[float, dict, dict]:
    opt = LARS(lars_param_groups(model), lr=0.0, weight_decay=1e-6)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 5.0, 0.5
    loss = net(x1, x2)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    return loss.item(), grads, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = sync_batchnorm(_model(), torch.device("cpu"))
        net = DistributedDataParallel(model)
        x1, x2 = _batch()
        part = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        loss, grads, state = _train_step(model, net, x1[part], x2[part])
        torch.save({"loss": loss, "grads": grads, "state": state}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process_loss_gradients_and_step(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    torch.set_num_threads(1)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads, state = _train_step(model, model, *_batch())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for got in ranks:
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["grads"].keys() == grads.keys()
        for k, g in grads.items():  # float32 sums in another order: compare tensor-wise
            err = (got["grads"][k] - g).norm() / g.norm()
            assert err < 1e-4, f"gradient of {k}: relative error {err:.2e}"
        for k, v in state.items():  # one LARS step and the BN running statistics (of the global batch)
            if v.is_floating_point():
                delta, delta_ref = got["state"][k] - before[k], v - before[k]
                err = (delta - delta_ref).norm() / delta_ref.norm()
                assert err < 1e-3, f"update of {k}: relative error {err:.2e}"
            else:
                assert torch.equal(got["state"][k], v), k
    # a non-trivial check: the step moved the weights and the BN statistics
    assert not torch.equal(state["backbone.body.0.weight"], before["backbone.body.0.weight"])
    assert not torch.equal(state["backbone.body.1.running_var"], before["backbone.body.1.running_var"])
    # per-rank batch norm (what plain DDP would do) gives a different loss: the check can fail
    model = _model()
    x1, x2 = _batch()
    half = GLOBAL_BATCH // 2
    per_rank = [model.bn(model.embed(x1[i:i + half])) for i in (0, half)]
    assert not torch.allclose(torch.cat(per_rank), _model().bn(_model().embed(x1)), atol=1e-3)


def test_cpu_sync_batchnorm_keeps_torchvision_state_dict():
    model = sync_batchnorm(torchvision.models.resnet18(), torch.device("cpu"))
    assert isinstance(model.bn1, AllReduceBatchNorm) and isinstance(model.layer1[0].bn2, AllReduceBatchNorm)
    assert model.state_dict().keys() == torchvision.models.resnet18().state_dict().keys()
    x = torch.randn(4, 3, 16, 16)
    ref = torchvision.models.resnet18()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), ref(x))  # no process group: plain batch norm


def test_torchrun_pretraining_matches_single_process(tmp_path):
    from test_pretrain import cli_args, make_nih, tiny_settings

    from cxrssl.ssl.train import pretrain

    index, cache = make_nih(tmp_path / "data", n=20, size=20)
    s = tiny_settings(epochs=1, warmup_epochs=0, lr_weights=50.0, lr_biases=0.2, checkpoint_every=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(REPO / "scripts" / "pretrain.py"), "--index", str(index), "--cache", str(cache),
           "--out-dir", str(tmp_path / "ddp"), "--seed", "3", "--device", "cpu", "--threads", "2",
           "--log-file", str(tmp_path / "ddp.log"), *cli_args(s, "barlowtwins"),
           "--backend", "dvclive", "--every-n-steps", "1"]  # live tracking: rank 0 alone logs
    env = dict(os.environ, CXRSSL_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 process(es)" in (tmp_path / "ddp.log").read_text()

    torch.set_num_threads(1)
    single = pretrain(index, cache, tmp_path / "single", s, seed=3, device="cpu")
    assert_backbone_like_single_process(tmp_path / "ddp" / "backbone.pth", single, seed=3)
    m_ddp = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    m_one = pd.read_csv(tmp_path / "single" / "metrics.csv")
    assert len(m_ddp) == 2  # 16 train_val images / batch 8
    live = pd.read_csv(tmp_path / "ddp" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert live["step"].tolist() == [1, 2]  # once per step: one rank logged
    assert live["loss"].tolist() == pytest.approx(m_ddp["loss"].tolist(), rel=1e-6)
    assert m_ddp["loss"][0] == pytest.approx(m_one["loss"][0], rel=1e-5)  # same weights, same batch
    assert m_ddp["loss"][1] == pytest.approx(m_one["loss"][1], rel=1e-4)


def assert_backbone_like_single_process(ddp: Path, single: Path, seed: int) -> float:
    """The ResNet-18 backbone pretrained by DDP ranks equals a single process's (random init, ``seed``).

    Returns the largest absolute difference of any tensor (tests/test_slurm.py reports it too).
    """
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (ddp, single))
    assert a.keys() == b.keys()
    torch.manual_seed(seed)  # pretrain() seeds, then builds the backbone: this is its initial state
    init = torchvision.models.resnet18(zero_init_residual=True).state_dict()
    for k in a:
        if not b[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        if "running_" in k:  # BN statistics of the global batch
            err = (a[k] - b[k]).norm() / b[k].norm()
            assert err < 1e-3, f"{k}: DDP and single-process statistics differ by {err:.2e}"
            continue
        update = b[k] - init[k]
        assert update.norm() < 0.5 * init[k].norm() + 1.0, f"{k}: not the initial state assumed"
        # Float32 sums in another order, amplified by large LARS steps through batch norms over
        # 8 values (16 px crops): updates agree to ~0.3 %. A per-rank BN or a missing reduction of
        # the cross-correlation changes the loss itself by percents (the callers check it sharply).
        err = (a[k] - b[k]).norm() / update.norm()
        assert err < 2e-2, f"{k}: DDP and single-process updates differ by {err:.2e}"
    moved = max((b[k] - v).abs().max().item() for k, v in init.items()
                if k in b and v.is_floating_point() and k.endswith("weight"))
    assert moved > 1e-3  # training changed the weights by far more than the tolerance
    return max((a[k] - b[k]).abs().max().item() for k in b if b[k].is_floating_point())
