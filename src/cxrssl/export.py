"""Export trained models for use outside cxrssl, each with a model card (``cxrssl export``).

* **Detectors** (torchvision engine, any ``best.pth`` :func:`cxrssl.detection.engines.load_detector`
  reads): ``detector.torchscript.pt`` (``torch.jit.script``; call it with a list of ``(3, H, W)``
  float images in [0, 1], get one ``{"boxes", "labels", "scores"}`` dict per image) and
  ``detector.onnx`` (opset :data:`ONNX_OPSET`, legacy TorchScript-based exporter; input ``image``
  ``(3, H, W)`` float in [0, 1], any height and width; outputs ``boxes`` ``(N, 4)`` xyxy in input
  pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)`` COCO ids 1..14 of :mod:`cxrssl.classes`). Both
  hold the model's own resize, normalisation and padding; feed the image as cxrssl prepares it
  (longest side ``input_size`` of the card, grey replicated to 3 channels: what
  :func:`cxrssl.detection.predict.prepare` makes). Every export is checked before it is written
  off: both formats are run on a probe image against PyTorch, and the largest differences go in
  the card (``parity``); an export outside :data:`PARITY_TOLERANCE` is an error.
* **Encoders** (pretraining's ``backbone.pth`` + ``backbone.json``): ``<method>_<arch>.pth``, the
  plain state dict that the library model loads unchanged
  (``torchvision.models.resnet50().load_state_dict(sd, strict=False)``, only ``fc.*`` missing;
  ``timm.create_model(model_name, **model_kwargs)``, only ``head.*`` missing), beside a copy of
  the sidecar (``<method>_<arch>.json``). The load is checked on export.

The card (``model_card.json`` and ``model_card.md`` beside the exported files) says what the
model was trained on, the config fingerprint (:func:`cxrssl.runtime.fingerprint` of the validated
config when ``--config`` is given; the run's own fingerprint otherwise), the metrics found for
the run (evaluation ``metrics.json`` of a detection run, the linear-evaluation entries of
``results/metrics.json`` for an encoder; ``--metrics`` names a file instead), the code version
(``cxrssl.__version__`` and ``git describe``, or ``unknown``), and each file's SHA-256.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrssl.io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text
from cxrssl.runtime import fingerprint, sha256_file

log = logging.getLogger(__name__)

ONNX_OPSET = 17
CARD_FORMAT = "cxrssl-model-card-1"
#: Largest differences accepted between an exported detector and PyTorch on the probe image:
#: boxes in input pixels, scores absolute (measured on CPU on demo images: ONNX at most 7e-5 px and
#: 5e-7, TorchScript identical).
PARITY_TOLERANCE = {"boxes_px": 1e-2, "scores": 1e-4}
DETECTION_HEADLINE = ("mAP50", "mAP50_ci", "mAP50_ci_bca", "mAP", "mAP75", "voc_mAP", "coco101_mAP")


# --- code version and provenance -------------------------------------------------------------------

def code_version() -> dict[str, str]:
    """``cxrssl.__version__`` and ``git describe --always --dirty`` of the source tree ('unknown'
    when the package is not in a git checkout or git is missing)."""
    import cxrssl

    root = Path(cxrssl.__file__).resolve().parents[2]
    try:
        proc = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"],
                              capture_output=True, text=True, timeout=30)
        git = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        git = "unknown"
    return {"cxrssl": cxrssl.__version__, "git": git}


def config_fingerprint(config_path: str | Path | None) -> str | None:
    """Fingerprint of the validated config (defaults filled in), None without a config."""
    if config_path is None:
        return None
    from cxrssl.config import load_config

    return fingerprint({"config": load_config(config_path)})


def data_description(config_path: str | Path | None, kind: str) -> dict[str, Any]:
    """What the model was trained on: the dataset and, with a config, how it was prepared."""
    data: dict[str, Any] = {"dataset": "VinDr-CXR" if kind == "detector" else "NIH ChestX-ray14"}
    if config_path is not None:
        from cxrssl.config import load_config

        config = load_config(config_path)
        data["synthetic_demo"] = bool(config["demo"]["enabled"])
        if kind == "detector":
            vindr = config["vindr"]
            data.update(layout=vindr["layout"], convert=vindr["convert"], split=vindr["split"],
                        fusion=vindr["fusion"])
        else:
            data.update(cache_size=config["nih"]["cache_size"])
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        from cxrssl.errors import BadInputError

        raise BadInputError(str(path), f"not a readable metrics JSON: {exc}") from None


def detector_metrics(checkpoint: Path, metrics: str | Path | None = None) -> tuple[dict, str | None]:
    """Headline metrics of a detection run: ``metrics`` or the run's evaluation ``metrics.json``
    (``results/detection/<engine>/<run>/best.pth`` -> ``results/evaluation/<engine>/<run>/``)."""
    path = Path(metrics) if metrics else None
    if path is None:
        run = checkpoint.resolve().parent
        if run.parent.parent.name == "detection":
            candidate = run.parents[2] / "evaluation" / run.parent.name / run.name / "metrics.json"
            path = candidate if candidate.is_file() else None
    if path is None:
        return {}, None
    found = _read_json(path)
    return {k: found[k] for k in DETECTION_HEADLINE if k in found}, path.name


def encoder_metrics(backbone: Path, method: str, metrics: str | Path | None = None) -> tuple[dict, str | None]:
    """Linear-evaluation entries of ``method`` in ``results/metrics.json`` (or in ``metrics``)."""
    path = Path(metrics) if metrics else backbone.resolve().parents[2] / "metrics.json"
    if not path.is_file():
        return {}, None
    found = _read_json(path)
    if metrics:
        return found, path.name
    return ({"linear_eval": found["linear_eval"][method]} if method in found.get("linear_eval", {}) else {},
            path.name)


# --- the card ---------------------------------------------------------------------------------------

def _markdown(card: dict) -> str:
    lines = [f"# Model card: {card['name']}", "", card["summary"], "",
             "| | |", "| --- | --- |"]
    for key in ("kind", "arch", "init", "method", "engine", "input"):
        if key in card:
            value = card[key]
            lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
    version = card["code_version"]
    lines += [f"| code version | cxrssl {version['cxrssl']} (git {version['git']}) |",
              f"| config fingerprint | `{card['config_fingerprint']}` |", "",
              "## Data", ""]
    lines += [f"- {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in card["data"].items()]
    lines += ["", "## Metrics", ""]
    if card["metrics"]:
        lines.append(f"From `{card['metrics_source']}`:")
        lines.append("")
        lines += [f"- {k}: {json.dumps(v)}" for k, v in card["metrics"].items()]
    else:
        lines.append("No metrics were found for this run.")
    if "parity" in card:
        lines += ["", "## Export parity (largest difference to PyTorch on a probe image)", ""]
        lines += [f"- {fmt}: boxes {p['boxes_px']:.3g} px, scores {p['scores']:.3g}, labels equal: {p['labels_equal']}"
                  for fmt, p in card["parity"].items()]
        lines.append(f"- tolerance: boxes {PARITY_TOLERANCE['boxes_px']} px, scores {PARITY_TOLERANCE['scores']}")
    lines += ["", "## Files", "", "| file | SHA-256 |", "| --- | --- |"]
    lines += [f"| `{name}` | `{digest}` |" for name, digest in card["files"].items()]
    lines += ["", "## Use", "", card["usage"], ""]
    return "\n".join(lines)


def write_card(card: dict, out_dir: Path) -> tuple[Path, Path]:
    """``model_card.json`` and ``model_card.md`` in ``out_dir`` (atomically)."""
    card = dict(card, format=CARD_FORMAT)
    atomic_write_json(card, out_dir / "model_card.json")
    atomic_write_text(_markdown(card), out_dir / "model_card.md")
    return out_dir / "model_card.json", out_dir / "model_card.md"


# --- detectors --------------------------------------------------------------------------------------

class OnnxDetector(nn.Module):
    """One image in, the three output tensors out: the ONNX graph's signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor):
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


class ScriptedDetector(nn.Module):
    """torchvision's scripted detector returns (losses, detections); this keeps the detections."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.model(images)[1]


def plain_torchvision(model: nn.Module) -> nn.Module:
    """A copy of a cxrssl detector as torchvision's own classes (scriptable).

    cxrssl's subclasses (:mod:`cxrssl.detection.model`) change training losses, matching and the
    backbone's precision only; in eval mode in fp32 they compute exactly their torchvision bases.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from cxrssl.detection.model import MixedPrecisionFPN

    plain = copy.deepcopy(model).eval()
    if isinstance(plain.backbone, MixedPrecisionFPN) and plain.backbone.autocast_device is not None:
        raise ValueError("export the detector in fp32 (its backbone runs under autocast)")
    for module, base in ((plain, FasterRCNN), (plain.backbone, BackboneWithFPN), (plain.rpn, RegionProposalNetwork),
                         (plain.roi_heads, RoIHeads)):
        if not isinstance(module, base):
            raise TypeError(f"not a torchvision Faster R-CNN: {type(module).__name__} is no {base.__name__}")
        module.__class__ = base
    return plain


def probe_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A demo X-ray (:func:`cxrssl.demo.vindr.render_vindr`: anatomy, a nodule and an effusion) as the
    (3, H, W) float tensor in [0, 1] a detector takes."""
    from cxrssl.demo.vindr import render_vindr

    grey, _ = render_vindr(height, width, ["Nodule/Mass", "Pleural effusion"], np.random.default_rng(seed))
    grey = np.round(grey * 255) / 255  # an 8-bit image, as cxrssl converts them
    return torch.from_numpy(grey.astype(np.float32))[None].repeat(3, 1, 1)


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Largest differences between two detection outputs of one image.

    Each reference detection is matched to the other output's detection of the same label with
    the closest box (order may differ between near-equal scores). Detections left unmatched are
    allowed only at the cut-off (a score within the score tolerance of the lowest score kept,
    where the top-k of two runtimes may differ); any other is a mismatch (``labels_equal`` false).
    """
    ref_boxes, ref_scores, ref_labels = (np.asarray(reference[k]) for k in ("boxes", "scores", "labels"))
    boxes, scores, labels = (np.asarray(other[k]) for k in ("boxes", "scores", "labels"))
    out = {"n": [len(ref_scores), len(scores)], "matched": 0, "boxes_px": 0.0, "scores": 0.0, "labels_equal": True}
    floor = min([*ref_scores.tolist(), *scores.tolist()], default=0.0) + PARITY_TOLERANCE["scores"]
    free = np.ones(len(scores), bool)
    for box, score, label in zip(ref_boxes, ref_scores, ref_labels):
        candidates = np.where(free & (labels == label))[0]
        if len(candidates):
            diffs = np.abs(boxes[candidates] - box).max(1)
            j = candidates[int(diffs.argmin())]
            if diffs.min() <= PARITY_TOLERANCE["boxes_px"] or score > floor:
                free[j] = False
                out["matched"] += 1
                out["boxes_px"] = max(out["boxes_px"], float(np.abs(boxes[j] - box).max()))
                out["scores"] = max(out["scores"], float(abs(scores[j] - score)))
                continue
        if score > floor:
            out["labels_equal"] = False
    if (scores[free] > floor).any():
        out["labels_equal"] = False
    return out


def within_tolerance(diff: dict[str, Any]) -> bool:
    return (diff["labels_equal"] and diff["boxes_px"] <= PARITY_TOLERANCE["boxes_px"]
            and diff["scores"] <= PARITY_TOLERANCE["scores"])


def _numpy(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: out[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels")}


def run_onnx(path: str | Path, image: torch.Tensor) -> dict[str, np.ndarray]:
    """The ONNX detector's outputs for one (3, H, W) image, with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"image": image.numpy()})
    return {"boxes": boxes, "scores": scores, "labels": labels}


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """``model`` (a torchvision detector in eval mode) as ONNX with dynamic height and width."""
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on torchvision's shape arithmetic
        torch.onnx.export(OnnxDetector(model).eval(), (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["boxes", "scores", "labels"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "n"},
                                        "scores": {0: "n"}, "labels": {0: "n"}})


def export_detector(checkpoint: str | Path, out_dir: str | Path, *, formats: tuple[str, ...] = ("torchscript", "onnx"),
                    config: str | Path | None = None, metrics: str | Path | None = None,
                    score_thr: float | None = None) -> dict:
    """TorchScript and/or ONNX of a torchvision-engine detector, checked against PyTorch, plus its card."""
    from cxrssl.classes import VINDR_CLASSES
    from cxrssl.detection.engines import load_detector

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, meta = load_detector(checkpoint, "cpu", score_thr=score_thr)
    if meta["engine"] != "torchvision":
        raise ValueError(f"{checkpoint}: only torchvision-engine detectors export to TorchScript/ONNX "
                         f"(this one is {meta['engine']}'s)")
    unknown = set(formats) - {"torchscript", "onnx"}
    if unknown or not formats:
        raise ValueError(f"formats must be among torchscript, onnx; got {list(formats)}")
    plain = plain_torchvision(model)
    size = int(meta["input_size"]) or int(meta["res"])
    probe = probe_image(size, max(32, round(size * 0.8)))
    with torch.no_grad():
        reference = _numpy(model([probe])[0])
    files, parity = {}, {}
    if "torchscript" in formats:
        path = out_dir / "detector.torchscript.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still what C++ users load
            warnings.filterwarnings("ignore", "RCNN always returns")
            scripted = torch.jit.script(ScriptedDetector(plain).eval())
            with atomic_path(path) as tmp:
                torch.jit.save(scripted, str(tmp))
            with torch.no_grad():
                parity["torchscript"] = compare(reference, _numpy(torch.jit.load(str(path))([probe])[0]))
        files[path.name] = path
    if "onnx" in formats:
        path = out_dir / "detector.onnx"
        export_onnx(plain, path, probe)
        parity["onnx"] = compare(reference, run_onnx(path, probe))
        files[path.name] = path
    for fmt, diff in parity.items():
        log.info("%s parity on the probe image: %s", fmt, diff)
        if not within_tolerance(diff):
            raise RuntimeError(f"the {fmt} export of {checkpoint} differs from PyTorch beyond {PARITY_TOLERANCE}: {diff}")
    found, source = detector_metrics(checkpoint, metrics)
    name = f"{meta['engine']}_{meta['arch']}_{meta['init_name']}_{meta['res']}px_seed{meta['seed']}"
    card = {
        "name": name, "kind": "detector",
        "summary": (f"Faster R-CNN + FPN ({meta['arch']}) localising the {len(VINDR_CLASSES)} VinDr-CXR findings, "
                    f"backbone initialised from {meta['init_name']}, trained at {meta['res']} px "
                    f"({meta['engine']} engine, seed {meta['seed']})."),
        "engine": meta["engine"], "arch": meta["arch"], "init": meta["init_name"],
        "classes": {str(i + 1): c for i, c in enumerate(VINDR_CLASSES)},
        "input": {"layout": "(3, H, W) float32 in [0, 1], grey replicated", "longest_side": size,
                  "bit_depth": int(meta["input_bit_depth"]), "model_resize": int(meta["res"])},
        "score_thr": float(score_thr if score_thr is not None else meta.get("score_thr", 0.0)),
        "onnx_opset": ONNX_OPSET if "onnx" in formats else None,
        "source_checkpoint": {"name": checkpoint.name, "sha256": sha256_file(checkpoint),
                              "epoch": meta.get("epoch"), "val_mAP50": meta.get("val_mAP50")},
        "data": data_description(config, "detector"),
        "config_fingerprint": config_fingerprint(config) or fingerprint({"meta": meta}),
        "config_fingerprint_of": "config" if config else "checkpoint meta",
        "settings": meta["settings"],
        "metrics": found, "metrics_source": source,
        "code_version": code_version(),
        "parity": parity, "parity_tolerance": PARITY_TOLERANCE,
        "files": {n: sha256_file(p) for n, p in files.items()},
        "usage": ("TorchScript: `m = torch.jit.load('detector.torchscript.pt'); m([image])[0]` -> boxes, labels, "
                  "scores. ONNX: `onnxruntime.InferenceSession('detector.onnx').run(None, {'image': image})` -> "
                  "boxes, scores, labels."),
    }
    write_card(card, out_dir)
    log.info("exported %s to %s (%s)", checkpoint, out_dir, ", ".join(files))
    return card


# --- encoders ---------------------------------------------------------------------------------------

def export_encoder(backbone: str | Path, out_dir: str | Path, *, config: str | Path | None = None,
                   metrics: str | Path | None = None) -> dict:
    """A pretrained encoder as the plain library state dict (checked to load unchanged), plus its card."""
    from cxrssl.errors import BadInputError
    from cxrssl.models.backbones import library_model, load_state_file, read_sidecar

    backbone, out_dir = Path(backbone), Path(out_dir)
    meta = read_sidecar(backbone)
    if meta is None:
        raise BadInputError(str(backbone), "has no backbone.json sidecar (which method and arch made it?)")
    state = load_state_file(backbone, "backbone checkpoint")
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    target = library_model(meta)
    result = target.load_state_dict(state, strict=False)
    classifier = ("fc.", "head.")
    missing = [k for k in result.missing_keys if not k.startswith(classifier)]
    if missing or result.unexpected_keys:
        raise BadInputError(str(backbone), f"does not load into {meta['library']} {meta['model_name']}: "
                            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    name = f"{meta['method']}_{meta['arch']}"
    weights, sidecar = out_dir / f"{name}.pth", out_dir / f"{name}.json"
    atomic_torch_save(state, weights)
    atomic_write_json(meta, sidecar)
    found, source = encoder_metrics(backbone, meta["method"], metrics)
    if meta["library"] == "torchvision":
        usage = (f"`m = torchvision.models.{meta['model_name']}(); "
                 f"m.load_state_dict(torch.load('{weights.name}'), strict=False)` (only fc.* missing), or "
                 f"`torch.hub.load(<cxrssl checkout>, '{name}', source='local', weights='{weights.name}')`.")
    else:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["model_kwargs"].items())
        usage = (f"`m = timm.create_model('{meta['model_name']}', {kwargs}); "
                 f"m.load_state_dict(torch.load('{weights.name}'), strict=False)` (only head.* missing), or "
                 f"`torch.hub.load(<cxrssl checkout>, '{name}', source='local', weights='{weights.name}')`.")
    card = {
        "name": name, "kind": "encoder",
        "summary": (f"{meta['arch']} encoder pretrained with {meta['method']} (self-supervised) on chest X-rays; "
                    f"a plain {meta['library']} state dict without the classifier."),
        "method": meta["method"], "arch": meta["arch"], "library": meta["library"],
        "model_name": meta["model_name"], "model_kwargs": meta["model_kwargs"],
        "input": {"layout": "(B, 3, H, W) float32, ImageNet mean/std normalised", "image_size": meta["image_size"],
                  "patch_size": meta["patch_size"]},
        "feature_dim": meta["feature_dim"],
        "missing_keys_on_load": sorted(result.missing_keys),
        "data": data_description(config, "encoder"),
        "config_fingerprint": config_fingerprint(config) or meta["fingerprint"],
        "config_fingerprint_of": "config" if config else "pretraining run (backbone.json)",
        "metrics": found, "metrics_source": source,
        "code_version": code_version(),
        "source_checkpoint": {"name": backbone.name, "sha256": sha256_file(backbone)},
        "files": {weights.name: sha256_file(weights), sidecar.name: sha256_file(sidecar)},
        "usage": usage,
    }
    write_card(card, out_dir)
    log.info("exported %s encoder %s to %s", meta["method"], meta["arch"], weights)
    return card


def export(checkpoint: str | Path, out_dir: str | Path, **kwargs: Any) -> dict:
    """Export a detector checkpoint or a pretraining ``backbone.pth`` (told apart by the sidecar)."""
    from cxrssl.models.backbones import sidecar_path

    if sidecar_path(checkpoint).is_file() and Path(checkpoint).name != "best.pth":
        kwargs.pop("formats", None)
        kwargs.pop("score_thr", None)
        return export_encoder(checkpoint, out_dir, **kwargs)
    return export_detector(checkpoint, out_dir, **kwargs)


def build_parser(prog: str = "cxrssl export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0] + " Detectors become TorchScript + ONNX, encoders plain "
        "torchvision/timm state dicts; a model card (JSON + Markdown) goes beside them.")
    parser.add_argument("checkpoint", help="A detection run's best.pth, or a pretraining run's backbone.pth "
                                           "(with its backbone.json).")
    parser.add_argument("--out-dir", required=True, help="Folder receiving the exported files and the model card.")
    parser.add_argument("--formats", nargs="+", default=["torchscript", "onnx"], choices=["torchscript", "onnx"],
                        help="Detector formats (default: both).")
    parser.add_argument("--config", default=None, help="The config the model was trained with (data description "
                                                       "and fingerprint in the card).")
    parser.add_argument("--metrics", default=None, help="Metrics JSON to put in the card (default: the run's own, "
                                                        "found under results/).")
    parser.add_argument("--score-thr", type=float, default=None, help="Lowest detector score kept (default: the "
                                                                      "checkpoint's).")
    parser.add_argument("--log", default=None, help="Also log to this file.")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cxrssl.utils import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log)
    card = export(args.checkpoint, args.out_dir, formats=tuple(args.formats), config=args.config,
                  metrics=args.metrics, score_thr=args.score_thr)
    print(json.dumps({"name": card["name"], "files": list(card["files"]), "parity": card.get("parity")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
