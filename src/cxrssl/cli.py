"""``cxrssl <verb> ...``: one command-line entry point for every stage of the pipeline.

Each verb is the same function the workflow runs, with its own ``--help``:

* package verbs (:data:`PACKAGE_VERBS`) run a ``main(argv)`` of the package: ``predict``
  (= ``cxrssl-predict``, :mod:`cxrssl.detection.predict`), ``evaluate``
  (:mod:`cxrssl.evaluation.command`, which ``scripts/evaluate.py`` also runs), ``export``
  (:mod:`cxrssl.export`) and ``config-docs`` (:mod:`cxrssl.config_docs`);
* stage verbs (:data:`SCRIPT_VERBS`) run the stage's script of a source checkout,
  ``scripts/<name>.py`` (what the Snakemake rules call), exactly as the rule does.

``python -m cxrssl <verb>`` is the same (:mod:`cxrssl.__main__`).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import import_module
from pathlib import Path

#: verb -> (module with ``main(argv)``, one-line summary)
PACKAGE_VERBS: dict[str, tuple[str, str]] = {
    "predict": ("cxrssl.detection.predict", "detect abnormalities on new DICOM/PNG files with a trained detector"),
    "evaluate": ("cxrssl.evaluation.command", "COCO mAP, VinBigData metric and bootstrap CIs of COCO results"),
    "export": ("cxrssl.export", "TorchScript/ONNX detectors and plain encoder state dicts, with model cards"),
    "config-docs": ("cxrssl.config_docs", "write config/README.md (every setting) from the config schema"),
}
#: verb -> (script of scripts/, one-line summary)
SCRIPT_VERBS: dict[str, tuple[str, str]] = {
    "make-demo-data": ("make_demo_data.py", "generate the synthetic demo datasets"),
    "index-nih": ("index_nih.py", "index NIH ChestX-ray14 and build its image cache"),
    "convert-dicom": ("convert_dicom.py", "convert VinDr-CXR DICOMs to PNG"),
    "parse-annotations": ("parse_annotations.py", "normalise VinDr-CXR reader boxes"),
    "split-vindr": ("split_vindr.py", "train/val/test split of VinDr-CXR"),
    "fuse-boxes": ("fuse_boxes.py", "fuse reader boxes (WBF) and write the COCO files"),
    "summarize-data": ("summarize_data.py", "data summary tables"),
    "pretrain": ("pretrain.py", "self-supervised pretraining of an encoder (any registered method)"),
    "linear-eval": ("linear_eval.py", "linear evaluation of an encoder on NIH labels"),
    "summarize-linear-eval": ("summarize_linear_eval.py", "linear-evaluation summary table and plot"),
    "train-detector": ("train_detector.py", "train a Faster R-CNN detector (either engine)"),
    "summarize-detection": ("summarize_detection.py", "detection summary with CIs and paired differences"),
    "heatmaps": ("heatmaps.py", "Ablation-CAM / EigenCAM heatmaps and localisation scores"),
    "collect-metrics": ("collect_metrics.py", "results/metrics.json for DVC"),
    "report-headline": ("report_headline.py", "the report's first page: headline tables with CIs"),
    "prepare-reports": ("prepare_reports.py", "prepare reports (the rule's script)"),
    "pretrain-multimodal": ("pretrain_multimodal.py", "pretrain multimodal (the rule's script)"),
    "segment": ("segment.py", "segment (the rule's script)"),
    "split-segmentation": ("split_segmentation.py", "split segmentation (the rule's script)"),
    "summarize-localization": ("summarize_localization.py", "summarize localization (the rule's script)"),
    "summarize-segmentation": ("summarize_segmentation.py", "summarize segmentation (the rule's script)"),
    "zeroshot": ("zeroshot.py", "zeroshot (the rule's script)"),
    "build-mmcv": ("build_mmcv.py", "build mmcv with compiled ops for the mmdet engine"),
}


def scripts_dir() -> Path:
    """``scripts/`` of the source checkout this package runs from."""
    import cxrssl

    return Path(cxrssl.__file__).resolve().parents[2] / "scripts"


def usage() -> str:
    width = max(map(len, [*PACKAGE_VERBS, *SCRIPT_VERBS]))
    lines = ["usage: cxrssl <verb> [options]   (cxrssl <verb> --help for a verb's options)", "",
             "Self-supervised pretraining on chest X-rays and abnormality localisation.", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in PACKAGE_VERBS.items()]
    lines += ["", "stage verbs (the workflow's steps; scripts/ of a source checkout):"]
    lines += [f"  {verb:<{width}}  {summary}" for verb, (_, summary) in SCRIPT_VERBS.items()]
    return "\n".join(lines)


def run_script(verb: str, argv: list[str]) -> int:
    script = scripts_dir() / SCRIPT_VERBS[verb][0]
    if not script.is_file():
        print(f"cxrssl {verb}: runs {SCRIPT_VERBS[verb][0]} of a cxrssl source checkout, and {script} does not "
              f"exist (install cxrssl from its repository: pip install -e .)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"cxrssl_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main(); its `if __name__ == "__main__"` block does not run
    saved = sys.argv
    sys.argv = [f"cxrssl {verb}", *argv]  # what the script's parser reads (prog: what the user typed)
    try:
        code = module.main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return int(code or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        import cxrssl

        print(f"cxrssl {cxrssl.__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in PACKAGE_VERBS:
        module = import_module(PACKAGE_VERBS[verb][0])
        saved = sys.argv
        sys.argv = [f"cxrssl {verb}", *rest]
        try:
            code = module.main(rest)
        finally:
            sys.argv = saved
        return int(code or 0)
    if verb in SCRIPT_VERBS:
        return run_script(verb, rest)
    print(f"cxrssl: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
