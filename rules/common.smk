# Shared by every rule file: config validation, canonical output paths, and helpers.
# Paths are defined here once; rule files and the report refer to these names.

import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cxrssl.config import ConfigError, schema_path, section_to_cli, validate_config

# --- config: validate before any job runs; errors name the key and what is wrong -------------
try:
    validate(config, schema=str(schema_path()), set_default=True)
except WorkflowError:
    try:
        validate_config(config, source="config")
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None
    raise

ENV = "../envs/cxrssl.yaml"
# Scripts are addressed from the Snakefile's folder so `--directory` elsewhere works.
SCRIPTS = str(Path(workflow.main_snakefile).parent / "scripts")
RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SEED = config["seed"]
ON_BAD_INPUT = config["on_bad_input"]
NIH_ROOT = config["nih"]["root"]
VINDR_ROOT = config["vindr"]["root"]
DEMO = config["demo"]

# --- canonical output paths --------------------------------------------------------------------
# data preparation
PREP = f"{RESULTS}/prepare"
NIH_INDEX = f"{PREP}/nih/index.csv"
NIH_CACHE = f"{PREP}/nih/cache_{config['nih']['cache_size']}px.npy"
NIH_QUARANTINE = f"{PREP}/nih/quarantine.csv"
VINDR_METADATA = f"{PREP}/vindr/metadata.csv"
VINDR_CONVERT_QUARANTINE = f"{PREP}/vindr/quarantine_convert.csv"
# Converted PNGs live in a per-setting cache folder listed by metadata.csv (not a declared
# output: Snakemake would wipe a declared folder before rerunning, losing the per-file cache).
VINDR_IMAGES = (
    f"{PREP}/vindr/images_{config['vindr']['convert']['size']}px_{config['vindr']['convert']['bit_depth']}bit"
)
VINDR_ANNOTATIONS = f"{PREP}/vindr/annotations.csv"
VINDR_ANNOTATION_QUARANTINE = f"{PREP}/vindr/quarantine_annotations.csv"
VINDR_SPLIT = f"{PREP}/vindr/split.csv"
VINDR_FUSED = f"{PREP}/vindr/fused_boxes.csv"
VINDR_COCO = f"{PREP}/vindr/coco_{{split}}.json"
SPLITS = ["train", "val", "test"]
# pretraining
PRETRAIN_DIR = f"{RESULTS}/pretrain/barlowtwins"
PRETRAIN_BACKBONE = f"{PRETRAIN_DIR}/backbone.pth"
# linear evaluation
LINEAR_RUN = f"{RESULTS}/linear_eval/{{init}}/frac{{fraction}}"
LINEAR_SUMMARY = f"{RESULTS}/linear_eval/summary.csv"
LINEAR_PLOT = f"{RESULTS}/linear_eval/auc_vs_fraction.png"
# detection, evaluation, heatmaps: one run per engine x init x resolution x seed
DET_RUN = f"{RESULTS}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
EVAL_RUN = f"{RESULTS}/evaluation/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
HEATMAP_RUN = f"{RESULTS}/heatmaps/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
EVAL_SUMMARY = f"{RESULTS}/evaluation/summary.csv"


wildcard_constraints:
    init="[A-Za-z0-9_-]+",
    fraction="[0-9.]+",
    res="[0-9]+",
    seed="[0-9]+",
    engine="torchvision|mmdet",
    split="train|val|test",


def cli(section, exclude=()):
    """A config section as the script flags built from the schema (cxrssl.config).

    `exclude` leaves settings out (e.g. the lists that only pick which runs exist), so changing
    them does not trigger a params rerun of existing outputs.
    """
    node = config
    for part in section.split("."):
        node = node[part]
    return " ".join(shlex.quote(a) for a in section_to_cli(section, node, exclude=tuple(exclude)))


def init_checkpoint(init):
    """What a backbone `init` wildcard resolves to: random, imagenet or a checkpoint path."""
    if init in ("random", "imagenet"):
        return init
    if init == "barlowtwins":
        return PRETRAIN_BACKBONE
    if init in config["backbones"]:
        return config["backbones"][init]
    raise WorkflowError(
        f"unknown init {init!r}: use random, imagenet, barlowtwins or a name under `backbones:`"
    )


def init_input(wildcards):
    """Input files a backbone init needs (only checkpoints are files)."""
    value = init_checkpoint(wildcards.init)
    return [] if value in ("random", "imagenet") else [value]


def imagenet_flag():
    path = config["imagenet_weights"]
    return f"--imagenet-weights {shlex.quote(path)}" if path else ""


def torch_launcher(wildcards, resources):
    """torchrun with one DDP process per GPU when the job has >= 2 GPUs, else plain python."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus >= 2:
        return f"torchrun --standalone --nproc_per_node={gpus}"
    return "python"


def detection_engines():
    det = config["detection"]
    return list(dict.fromkeys([det["engine"], *det["engines"]]))


def detection_runs():
    """(engine, init, res, seed) of every detection run in the comparison grid."""
    det = config["detection"]
    return [
        dict(engine=e, init=i, res=r, seed=s)
        for e in detection_engines()
        for i in det["inits"]
        for r in det["resolutions"]
        for s in config["evaluation"]["seeds"]
    ]


def all_targets():
    """Everything `rule all` builds; each rule file registers its final products here."""
    return [t for produce in FINAL_TARGETS for t in produce()]


# Rule files append zero-argument functions that return their final outputs.
FINAL_TARGETS = []
