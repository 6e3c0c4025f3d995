"""The multimodal method: losses equal their definitions (both directions), the text encoder (local
path, scratch vocabulary, sentence pooling), the image encoder, training (resume after a kill is
bit-identical on CPU; 2 gloo processes train like 1), export and zero-shot localisation."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cxrssl.demo.nih import make_nih
from cxrssl.demo.reports import make_reports
from cxrssl.errors import Quarantine
from cxrssl.multimodal.image import ImageEncoder, region_map, resnet_feature_map
from cxrssl.multimodal.losses import GlobalInfoNCE, LocalSentenceRegionLoss, MultimodalLoss, sentence_region_scores
from cxrssl.multimodal.method import (IMAGE_ENCODER, IMAGE_SIDECAR, MultimodalMethod, MultimodalSettings,
                                      load_trained)
from cxrssl.multimodal.reports import load_reports, patient_split, write_pairs
from cxrssl.multimodal.text import (SentenceTextEncoder, TextEncoderUnavailableError, build_text_encoder,
                                    load_pretrained, pool_sentences, train_wordpiece)
from cxrssl.multimodal.train import METRIC_COLUMNS, pretrain_multimodal

REPO = Path(__file__).resolve().parents[1]


# --- losses equal their definitions ----------------------------------------------------------------

def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _nce(scores: np.ndarray) -> float:
    """mean_i -log softmax(scores[i])[i], written out."""
    total = 0.0
    for i in range(len(scores)):
        total += -scores[i, i] + math.log(sum(math.exp(v) for v in scores[i]))
    return total / len(scores)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 6), st.integers(2, 8), st.floats(0.05, 1.0), st.integers(0, 2**31 - 1))
def test_global_infonce_equals_definition_both_directions(n, d, tau, seed):
    g = torch.Generator().manual_seed(seed)
    v, t = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    out = GlobalInfoNCE(tau)(v, t)
    s = np.array([[_cos(v[i].numpy(), t[j].numpy()) / tau for j in range(n)] for i in range(n)])
    assert out["image_to_text"].item() == pytest.approx(_nce(s), rel=1e-5)  # image i picks its report
    assert out["text_to_image"].item() == pytest.approx(_nce(s.T), rel=1e-5)  # report j picks its image


def _local_score(regions: np.ndarray, sentences: np.ndarray, n_sent: int, tau_a: float, gamma: float) -> float:
    """S(i, j) with loops: attention over regions per sentence, then soft-max aggregation."""
    terms = []
    for k in range(n_sent):
        s = sentences[k]
        weights = [math.exp(_cos(s, r) / tau_a) for r in regions]
        z = sum(weights)
        context = sum(w / z * r / np.linalg.norm(r) for w, r in zip(weights, regions))
        terms.append(math.exp(gamma * _cos(context, s)))
    return math.log(sum(terms)) / gamma


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_local_loss_equals_definition_both_directions(n, k_max, r, seed):
    rng = np.random.default_rng(seed)
    d, tau, tau_a, gamma = 5, 0.2, 0.3, 4.0
    regions = rng.standard_normal((n, r, d))
    sentences = rng.standard_normal((n, k_max, d))
    counts = rng.integers(1, k_max + 1, size=n)
    mask = np.arange(k_max)[None] < counts[:, None]
    loss = LocalSentenceRegionLoss(tau, tau_a, gamma)
    out = loss(torch.from_numpy(regions), torch.from_numpy(sentences), torch.from_numpy(mask))
    s = np.array([[_local_score(regions[i], sentences[j], counts[j], tau_a, gamma) / tau for j in range(n)]
                  for i in range(n)])
    assert out["image_to_text"].item() == pytest.approx(_nce(s), rel=1e-5)
    assert out["text_to_image"].item() == pytest.approx(_nce(s.T), rel=1e-5)
    # padded sentences do not count, whatever they hold
    noisy = np.where(mask[..., None], sentences, rng.standard_normal(sentences.shape) * 100)
    again = loss(torch.from_numpy(regions), torch.from_numpy(noisy), torch.from_numpy(mask))
    assert again["image_to_text"].item() == pytest.approx(out["image_to_text"].item(), rel=1e-9)


def test_local_scores_reward_the_matching_region():
    """A sentence equal to one region of image 0 scores image 0 above an image without that region."""
    regions = torch.randn(2, 6, 8, dtype=torch.float64)
    sentences = regions[0, 2].reshape(1, 1, 8).clone()
    scores = sentence_region_scores(regions, sentences, torch.ones(1, 1, dtype=torch.bool), 0.05, 5.0)
    assert scores[0, 0] > 0.99 and scores[0, 0] > scores[1, 0]


def test_multimodal_loss_is_the_weighted_sum_of_four_parts():
    g = torch.Generator().manual_seed(0)
    out = {"image_global": torch.randn(4, 6, generator=g), "text_global": torch.randn(4, 6, generator=g),
           "regions": torch.randn(4, 9, 6, generator=g), "sentences": torch.randn(4, 3, 6, generator=g),
           "sentence_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)}
    total, parts = MultimodalLoss(0.1, 0.2, 0.25, 5.0, global_weight=0.5, local_weight=2.0)(out)
    expected = 0.5 * (parts["global_image_to_text"] + parts["global_text_to_image"]) + \
        2.0 * (parts["local_image_to_text"] + parts["local_text_to_image"])
    assert total.item() == pytest.approx(expected.item())
    assert len({round(v.item(), 6) for v in parts.values()}) == 4  # four different terms
    with pytest.raises(ValueError, match="at least one sentence"):
        MultimodalLoss()(dict(out, sentence_mask=torch.zeros(4, 3, dtype=torch.bool)))
    with pytest.raises(ValueError):
        GlobalInfoNCE(0.0)


# --- losses: negatives gathered across 2 gloo ranks equal one process --------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_inputs():
    g = torch.Generator().manual_seed(7)
    img = torch.randn(6, 5, generator=g)
    txt = torch.randn(6, 5, generator=g)
    reg = torch.randn(6, 4, 5, generator=g)
    sen = torch.randn(6, 3, 5, generator=g)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    return img, txt, reg, sen, mask


def _loss_and_grads(part: slice | None):
    img, txt, reg, sen, mask = _loss_inputs()
    leaves = [x.requires_grad_() for x in (img, txt, reg, sen)]
    sl = part or slice(None)
    total, _ = MultimodalLoss()({"image_global": img[sl], "text_global": txt[sl], "regions": reg[sl],
                                 "sentences": sen[sl], "sentence_mask": mask[sl]})
    total.backward()
    return total.item(), [x.grad for x in leaves]


def _loss_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss, grads = _loss_and_grads(slice(3 * rank, 3 * rank + 3))
        torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_loss_with_negatives_from_two_ranks_equals_one_process(tmp_path):
    mp.spawn(_loss_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    loss, grads = _loss_and_grads(None)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # each rank's loss is the mean over its own rows: the two average to the global loss
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(loss, rel=1e-5)
    # DDP averages gradients over ranks; the all-gather's backward sums each rank's share
    for k, g in enumerate(grads):
        ddp = (ranks[0]["grads"][k] + ranks[1]["grads"][k]) / 2
        torch.testing.assert_close(ddp, g, rtol=1e-4, atol=1e-6)
    # without the other rank's negatives the loss is another number (the check can fail)
    alone, _ = _loss_and_grads(slice(0, 3))
    assert abs(alone - ranks[0]["loss"]) > 1e-3


# --- text encoder ----------------------------------------------------------------------------------

REPORTS = ["There is a 2.5 cm nodule in the right upper zone. No pneumothorax.",
           "Small left pleural effusion. The heart size is normal.",
           "The lungs are clear. No acute osseous abnormality."]


def _tiny_text(dropout: float = 0.0) -> SentenceTextEncoder:
    torch.manual_seed(0)
    return build_text_encoder("scratch", REPORTS, vocab_size=200, hidden=16, layers=1, heads=2, intermediate=32,
                              max_tokens=40, max_sentences=4, dropout=dropout)


def test_scratch_vocabulary_is_deterministic_across_processes():
    code = ("import sys; sys.path.insert(0, %r); from cxrssl.multimodal.text import train_wordpiece; "
            "print(train_wordpiece(%r, 120).backend_tokenizer.to_str())" % (str(REPO / "src"), REPORTS * 3))
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}
    assert len(runs) == 1  # tokenizers' WordPieceTrainer gives another vocabulary in almost every process


def test_scratch_vocabulary_comes_from_the_training_reports():
    tok = train_wordpiece(REPORTS, 200)
    assert tok.tokenize("nodule effusion") == ["nodule", "effusion"]
    assert tok.tokenize("cardiomegaly")[0] != "cardiomegaly"  # never seen: split into pieces, not lost
    assert tok.convert_tokens_to_string(tok.tokenize("cardiomegaly")) == "cardiomegaly"
    small = train_wordpiece(REPORTS, 90)
    assert len(small) <= max(90, len(small.get_vocab())) and "[CLS]" in small.get_vocab()


def test_tokenize_tracks_sentences_and_truncates():
    enc = _tiny_text()
    ids, sid = enc.tokenize(["The lungs are clear.", "No pneumothorax.", "Heart normal."])
    assert ids[0] == enc.tokenizer.cls_token_id and ids[-1] == enc.tokenizer.sep_token_id
    assert sid[0] == -1 and sid[-1] == -1 and sorted(set(sid[1:-1])) == [0, 1, 2]
    n0 = len(enc.tokenizer.tokenize("The lungs are clear."))
    assert sid[1:1 + n0] == [0] * n0
    enc.max_tokens = 1 + n0 + 2 + 1  # room for sentence 0 and two tokens of sentence 1
    ids, sid = enc.tokenize(["The lungs are clear.", "No pneumothorax.", "Heart normal."])
    assert len(ids) == enc.max_tokens and sorted(set(sid[1:-1])) == [0, 1]
    enc.max_tokens, enc.max_sentences = 40, 2
    assert max(enc.tokenize(["a.", "b.", "c."])[1]) == 1


def test_sentence_pooling_is_the_mean_of_its_tokens():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    sid = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, -1, -1, -1]])
    report, sentences, mask = pool_sentences(hidden, sid, 3)
    torch.testing.assert_close(sentences[0, 0], hidden[0, 1:3].mean(0))
    torch.testing.assert_close(sentences[0, 1], hidden[0, 3])
    torch.testing.assert_close(report[0], hidden[0, 1:4].mean(0))
    assert mask.tolist() == [[True, True, False], [True, False, False]] and sentences[1, 1:].abs().sum() == 0


def test_sentences_are_encoded_in_one_pass_over_the_report():
    enc = _tiny_text().eval()
    a = enc(**enc.collate([enc.tokenize(["The lungs are clear.", "No pneumothorax."])]))[1][0, 0]
    b = enc(**enc.collate([enc.tokenize(["The lungs are clear.", "Small left pleural effusion."])]))[1][0, 0]
    alone = enc(**enc.collate([enc.tokenize(["The lungs are clear."])]))[1][0, 0]
    assert not torch.allclose(a, b) and not torch.allclose(a, alone)  # the same sentence sees its report


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from([s for r in REPORTS for s in r.split(". ")]), min_size=1, max_size=5),
                min_size=1, max_size=4))
def test_sentence_context_encodes_each_sentence_as_it_stands_alone(reports):
    """sentence_context: sentence: a report's sentence embeddings are those of the sentences as
    one-sentence reports (what a zero-shot prompt is), the report's their token-weighted mean."""
    enc = _tiny_text().eval()
    enc.context = "sentence"
    n_tokens = [2 + sum(len(enc.tokenizer(x, add_special_tokens=False)["input_ids"]) for x in r[:enc.max_sentences])
                for r in reports]
    assume(max(n_tokens) <= enc.max_tokens)  # truncation is the tokenizer's test
    with torch.no_grad():
        report, sentences, mask = enc(**enc.collate([enc.tokenize(r) for r in reports]))
        for b, r in enumerate(reports):
            kept = int(mask[b].sum())
            assert kept == min(len(r), enc.max_sentences)
            counts = []
            for k, sentence in enumerate(r[:kept]):
                alone_report, alone, _ = enc(**enc.collate([enc.tokenize([sentence])]))
                torch.testing.assert_close(sentences[b, k], alone[0, 0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(alone_report[0], alone[0, 0], rtol=1e-5, atol=1e-5)
                counts.append(len(enc.tokenizer(sentence, add_special_tokens=False)["input_ids"]))
            w = torch.tensor(counts, dtype=torch.float32).unsqueeze(-1)
            torch.testing.assert_close(report[b], (sentences[b, :kept] * w).sum(0) / w.sum(), rtol=1e-5, atol=1e-5)
            assert sentences[b, kept:].abs().sum() == 0
    with pytest.raises(ValueError, match="context"):
        SentenceTextEncoder(enc.model, enc.tokenizer, context="word")


def test_text_encoder_loaded_from_a_local_path(tmp_path):
    enc = _tiny_text().eval()
    enc.model.save_pretrained(tmp_path / "bert")
    enc.tokenizer.save_pretrained(tmp_path / "bert")
    loaded = build_text_encoder(str(tmp_path / "bert"), None, vocab_size=0, hidden=0, layers=0, heads=0,
                                intermediate=0, max_tokens=40, max_sentences=4).eval()
    assert type(loaded.model).__name__ == "BertModel" and loaded.width == 16
    batch = [enc.tokenize(r.split(". ")) for r in REPORTS]
    assert batch == [loaded.tokenize(r.split(". ")) for r in REPORTS]
    for x, y in zip(enc(**enc.collate(batch)), loaded(**loaded.collate(batch))):
        torch.testing.assert_close(x, y)
    with pytest.raises(FileNotFoundError):
        load_pretrained(str(tmp_path / "missing"))


def test_unavailable_hub_model_says_what_to_download():
    with pytest.raises(TextEncoderUnavailableError) as err:
        load_pretrained("cxrssl-tests/no-such-bert", local_files_only=True)
    message = str(err.value)
    assert "hf download cxrssl-tests/no-such-bert" in message and "text_encoder: /path/to/no-such-bert" in message


# --- image encoder ---------------------------------------------------------------------------------

def test_resnet_feature_map_and_export_are_torchvision():
    torch.manual_seed(0)
    fmap = resnet_feature_map("resnet18")
    x = torch.randn(2, 3, 64, 64)
    fmap.eval()
    ref = torchvision.models.resnet18()
    result = ref.load_state_dict(fmap.export_state_dict(), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    ref.eval()
    ref.fc = nn.Identity()
    torch.testing.assert_close(fmap(x).mean(dim=(2, 3)), ref(x))  # the last conv map, pooled = torchvision
    fine = resnet_feature_map("resnet18", output_stride=16)
    assert fmap(x).shape == (2, 512, 2, 2) and fine(x).shape == (2, 512, 4, 4)
    assert fine.export_state_dict().keys() == fmap.export_state_dict().keys()
    bottleneck = resnet_feature_map("resnet50", output_stride=16)
    assert bottleneck(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 4, 4)


@pytest.mark.parametrize("arch, output_stride, local_grid, global_grid",
                         [("resnet18", 32, (4, 4), (2, 2)), ("resnet18", 16, (4, 4), (4, 4)),
                          ("resnet50", 32, (4, 4), (2, 2))])
def test_layer3_regions_are_the_intermediate_map(arch, output_stride, local_grid, global_grid):
    """local_features: layer3 (GLoRIA's): regions from layer3 at stride 16, the global vector from layer4."""
    torch.manual_seed(0)
    backbone = resnet_feature_map(arch, output_stride=output_stride).eval()
    enc = ImageEncoder(backbone, 8, local_features="layer3").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        g, regions, grid = enc(x)
        r = backbone.resnet
        mid = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))
        both = enc.regions(x)
    assert mid.shape[1] == backbone.mid_channels and grid == local_grid
    torch.testing.assert_close(regions, enc.local_head(mid).flatten(2).transpose(1, 2))
    torch.testing.assert_close(g, enc.global_head(r.layer4(mid).mean(dim=(2, 3))))
    dense, dense_grid = both["global"]
    assert both["local"][1] == local_grid and dense_grid == global_grid
    torch.testing.assert_close(dense.mean(1), g, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="local_features"):
        ImageEncoder(backbone, 8, local_features="layer2")


def test_image_encoder_takes_any_feature_map_backbone():
    class Tokens(nn.Module):  # e.g. a ViT's patch tokens reshaped to their grid
        out_channels = 7

        def forward(self, x):
            return torch.ones(x.shape[0], 7, 3, 5)

    enc = ImageEncoder(Tokens(), 4)
    g, regions, grid = enc(torch.zeros(2, 3, 48, 80))
    assert g.shape == (2, 4) and regions.shape == (2, 15, 4) and grid == (3, 5)
    maps = region_map(torch.arange(15.0).reshape(1, 15), grid, (30, 50))
    assert maps.shape == (1, 30, 50) and maps[0, 0, 0] < maps[0, -1, -1]


# --- training --------------------------------------------------------------------------------------

def tiny_settings(**over) -> dict:
    s = dict(arch="resnet18", init="random", output_stride=16, image_size=32, text_encoder="scratch", vocab_size=200,
             text_hidden=16, text_layers=1, text_heads=2, text_intermediate=32, max_tokens=48, max_sentences=6,
             embed_dim=16, batch_size=8, epochs=2, warmup_epochs=0.5, lr=1e-3, lr_text=1e-3, workers=0,
             checkpoint_every=2, val_fraction=0.15, test_fraction=0.0)
    s.update(over)
    return s


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A small NIH-like set with MIMIC-layout reports; returns (pairs.csv, MIMIC root, demo root)."""
    root = tmp_path_factory.mktemp("mm_corpus")
    records = []
    make_nih(root / "nih", n_images=30, n_patients=10, image_size=64, seed=3, on_image=records.append)
    make_reports(root / "reports", records, seed=3)
    mimic = root / "reports" / "mimic_cxr"
    pairs = patient_split(load_reports("mimic", mimic, Quarantine("skip")), 0.15, 0.0, seed=0)
    write_pairs(pairs, root / "pairs.csv")
    return root / "pairs.csv", mimic, root


def test_resume_after_kill_is_bit_identical(corpus, tmp_path):
    pairs, mimic, _ = corpus
    s = tiny_settings(text_dropout=0.1)  # dropout: the RNG state must be restored too
    torch.set_num_threads(1)
    full = pretrain_multimodal(pairs, mimic, tmp_path / "full", s, seed=4, device="cpu", threads=1)
    n_steps = len(pd.read_csv(full.parent / "metrics.csv"))
    assert n_steps >= 4
    # killed after an odd step: that step is lost (the last checkpoint is one step earlier)
    stop = n_steps - 1 if (n_steps - 1) % 2 else n_steps - 2
    assert pretrain_multimodal(pairs, mimic, tmp_path / "cut", s, seed=4, device="cpu", threads=1,
                               stop_after_steps=stop) is None
    assert not (tmp_path / "cut" / IMAGE_ENCODER).exists()
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == stop - 1
    resumed = pretrain_multimodal(pairs, mimic, tmp_path / "cut", s, seed=4, device="cpu", threads=1)
    for name in (IMAGE_ENCODER, "model.pth"):
        a = torch.load(full.parent / name, weights_only=True)
        b = torch.load(resumed.parent / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    m_full, m_cut = (pd.read_csv(p.parent / "metrics.csv") for p in (full, resumed))
    assert list(m_full.columns) == METRIC_COLUMNS
    np.testing.assert_array_equal(m_full["loss"], m_cut["loss"])
    np.testing.assert_array_equal(m_cut["pairs_per_s"][: stop - 1], [r["pairs_per_s"] for r in ckpt["metrics"]])
    assert not np.array_equal(m_cut["pairs_per_s"][: stop - 1], m_full["pairs_per_s"][: stop - 1])
    pd.testing.assert_frame_equal(pd.read_csv(full.parent / "val.csv"), pd.read_csv(resumed.parent / "val.csv"))

    # exports: a torchvision state dict with its sidecar; the whole model reloads for zero-shot use
    sidecar = json.loads((full.parent / IMAGE_SIDECAR).read_text())
    assert (sidecar["method"], sidecar["arch"], sidecar["library"]) == ("multimodal", "resnet18", "torchvision")
    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(full, weights_only=True), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    torch.manual_seed(4)
    assert not torch.equal(torchvision.models.resnet18().state_dict()["conv1.weight"], net.state_dict()["conv1.weight"])
    model, settings_back = load_trained(full.parent)
    assert settings_back == MultimodalSettings.from_dict(s)
    emb = model.embed_sentences(["There is a nodule."])
    assert emb.shape == (1, 16) and torch.isfinite(emb).all()
    # the image-report space: the prompt as a report, and the global head at every location, whose
    # mean is the image's global embedding (the map is the CAM of the image-report similarity)
    batch = model.text.collate([model.text.tokenize(["There is a nodule."])])
    report, _, _ = model.encode_text(batch["input_ids"], batch["attention_mask"], batch["sentence_ids"])
    torch.testing.assert_close(model.embed_sentences(["There is a nodule."], "global"), report)
    with pytest.raises(ValueError, match="space"):
        model.embed_sentences(["There is a nodule."], "pixel")
    x = torch.rand(2, 3, settings_back.image_size, settings_back.image_size)
    with torch.no_grad():
        both = model.image.regions(x)
        glob, regions, grid_local = model.image(x)
    (local, grid_l), (dense, grid) = both["local"], both["global"]
    torch.testing.assert_close(local, regions)
    assert grid == grid_l == grid_local and dense.shape == (2, grid[0] * grid[1], glob.shape[1])
    torch.testing.assert_close(dense.mean(1), glob, rtol=1e-5, atol=1e-5)

    # zero-shot localisation end to end on the held-out set, every box layout (functional: this
    # tiny model has not learned to localise)
    from cxrssl.multimodal.zeroshot import demo_localisation

    for boxes in ("nih", "rsna", "ms_cxr"):
        summary = demo_localisation(corpus[2], full.parent, tmp_path / f"zs_{boxes}", n_boot=20, val_fraction=0.5,
                                    boxes=boxes)
        assert set(summary["source"]) == {"model", "model_global", "random", "centre"}
        assert set(summary["query"]) == ({"prompt", "sentence"} if boxes == "ms_cxr" else {"prompt"})
        assert summary["mean"].notna().all() and (summary["ci_low"] <= summary["mean"] + 1e-12).all()
        scores = pd.read_csv(tmp_path / f"zs_{boxes}" / "scores.csv")
        assert scores.groupby(["query", "source"]).size().nunique() == 1  # baselines scored on the same items
    assert (tmp_path / "zs_ms_cxr" / "panel.png").stat().st_size > 5000

    # a checkpoint of other settings is not resumed
    other = pretrain_multimodal(pairs, mimic, tmp_path / "cut", tiny_settings(text_dropout=0.1, epochs=1), seed=4,
                                device="cpu", threads=1)
    assert len(pd.read_csv(other.parent / "metrics.csv")) == n_steps // 2


def _ddp_rank(rank: int, port: int, pairs: str, mimic: str, out: str, s: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    pretrain_multimodal(pairs, mimic, out, s, seed=2, device="cpu", threads=2)


def test_two_gloo_processes_train_like_one(corpus, tmp_path):
    pairs, mimic, _ = corpus
    s = tiny_settings(text_dropout=0.0, epochs=1, checkpoint_every=100)  # dropout masks differ per rank
    mp.spawn(_ddp_rank, args=(_free_port(), str(pairs), str(mimic), str(tmp_path / "ddp"), s), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = pretrain_multimodal(pairs, mimic, tmp_path / "one", s, seed=2, device="cpu", threads=1)
    m_ddp, m_one = (pd.read_csv(d / "metrics.csv") for d in (tmp_path / "ddp", tmp_path / "one"))
    assert len(m_ddp) == len(m_one) >= 2
    # step 1: same weights, same global batch -> the same loss (every part: negatives were gathered)
    for col in ("loss", "global_image_to_text", "global_text_to_image", "local_image_to_text",
                "local_text_to_image"):
        assert m_ddp[col][0] == pytest.approx(m_one[col][0], rel=1e-5), col
    assert m_ddp["loss"].to_numpy() == pytest.approx(m_one["loss"].to_numpy(), rel=1e-3)
    a, b = (torch.load(d / "model.pth", weights_only=True) for d in (tmp_path / "ddp", tmp_path / "one"))
    errors = {}
    for k in a:
        if not b[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
        elif not k.endswith("attention.self.key.bias"):
            # (a key bias shifts every logit of a query alike: softmax ignores it, its true gradient
            # is 0 and what AdamW does with the rounding noise differs from run to run)
            errors[k] = ((a[k] - b[k]).norm() / max(b[k].norm().item(), 1e-6)).item()
    worst = max(errors, key=errors.get)
    assert errors[worst] < 2e-3, f"{worst}: DDP and single-process weights differ by {errors[worst]:.2e}"
    assert single.name == IMAGE_ENCODER and (tmp_path / "ddp" / IMAGE_ENCODER).is_file()


def test_param_groups_and_schedule():
    method = MultimodalMethod(tiny_settings(lr=1e-3, lr_text=1e-4, weight_decay=0.1))
    model = method.build_model(REPORTS)
    groups = {g["name"]: g for g in method.param_groups(model)}
    assert set(groups) == {"image", "image_no_decay", "text", "text_no_decay"}
    assert groups["text"]["base_lr"] == 1e-4 and groups["image"]["base_lr"] == 1e-3
    assert groups["image_no_decay"]["weight_decay"] == 0.0 and groups["text"]["weight_decay"] == 0.1
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert any(p is model.text_local.weight for p in groups["image"]["params"])  # heads train at lr
    opt = method.optimizer(model)
    assert method.set_lr(opt, 0, 10, 2) == 0.0 and method.set_lr(opt, 2, 10, 2) == 1.0
    assert opt.param_groups[0]["lr"] == opt.param_groups[0]["base_lr"]
    with pytest.raises(ValueError, match="unknown multimodal setting"):
        MultimodalSettings.from_dict({"temperature": 0.1})
