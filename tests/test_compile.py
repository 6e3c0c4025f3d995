"""torch.compile as an option (`pretrain.compile`, `detection.compile`): same losses as eager, clear failures.

The tests compile with the ``aot_eager`` backend (dynamo's graph capture and AOTAutograd's joint
forward/backward graph, as inductor gets them, run without generating C++): inductor on this
2-core CPU takes minutes per graph. benchmarks/pretrain_throughput.py --compile and
benchmarks/detection_step.py --compile measure inductor itself.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import cxrssl.runtime as runtime
import cxrssl.ssl.train as ssl_train
from cxrssl.config import section_defaults
from cxrssl.detection.model import build_detector, compile_backbone
from cxrssl.runtime import CompileError

from test_pretrain import make_nih, tiny_settings


def _compile_with(monkeypatch, backend) -> list:
    """Route the pipeline's compile_module to ``backend``; records the modules it compiled."""
    calls, real = [], runtime.compile_module

    def patched(module, setting, device, mode=None, backend_=None):
        calls.append((type(module).__name__, setting))
        return real(module, setting, device, mode, backend)

    monkeypatch.setattr(ssl_train, "compile_module", patched)
    return calls


def test_schema_defaults_are_eager():
    assert section_defaults("pretrain")["compile"] is False
    assert section_defaults("detection")["compile"] is False


def test_compiled_pretraining_gives_the_eager_losses(tmp_path, monkeypatch):
    index, cache = make_nih(tmp_path / "data", n=20, size=20)
    s = tiny_settings(epochs=1)  # 16 train_val images / batch 8: 2 steps
    eager = pretrain_losses(index, cache, tmp_path / "eager", s)
    calls = _compile_with(monkeypatch, "aot_eager")
    compiled = pretrain_losses(index, cache, tmp_path / "compiled", dict(s, compile=True))
    assert calls == [("BarlowTwins", "pretrain.compile")]
    assert len(eager) == len(compiled) == 2
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # compiled in place: the exported backbone has the eager keys (no _orig_mod. prefix)
    a = torch.load(tmp_path / "eager" / "backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "compiled" / "backbone.pth", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)


def pretrain_losses(index, cache, out, s) -> list[float]:
    ssl_train.pretrain(index, cache, out, s, seed=3, device="cpu")
    return pd.read_csv(out / "metrics.csv")["loss"].tolist()


def test_a_compilation_failure_stops_the_run_naming_the_setting(tmp_path, monkeypatch):
    index, cache = make_nih(tmp_path / "data", n=20, size=20)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no kernel for this graph")

    _compile_with(monkeypatch, broken_backend)
    with pytest.raises(CompileError, match=r"(?s)pretrain\.compile: torch\.compile failed.*no kernel.*set pretrain\.compile: false"):
        ssl_train.pretrain(index, cache, tmp_path / "out", dict(tiny_settings(epochs=1), compile=True), seed=3,
                           device="cpu")
    assert not (tmp_path / "out" / "backbone.pth").exists()


def test_inductor_without_a_c_compiler_fails_before_training(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CompileError, match="C compiler.*detection.compile: false"):
        runtime.compile_module(torch.nn.Linear(2, 2), "detection.compile", torch.device("cpu"))


def test_compiled_detector_backbone_gives_the_eager_losses():
    def losses(compiled: bool) -> dict:
        torch.manual_seed(0)
        model = build_detector("resnet18", "random", res=64, rpn_proposals=20, rois_per_image=16).train()
        if compiled:
            compile_backbone(model, backend="aot_eager")
        keys = set(model.state_dict())
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([3])} for _ in range(2)]
        torch.manual_seed(2)  # the samplers of the RPN and RoI heads draw from torch's RNG
        out = model(images, targets)
        sum(out.values()).backward()
        return {k: float(v) for k, v in out.items()}, keys

    (eager, keys_eager), (compiled, keys_compiled) = losses(False), losses(True)
    assert keys_eager == keys_compiled
    assert compiled.keys() == eager.keys()
    for key in eager:
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-5), key
