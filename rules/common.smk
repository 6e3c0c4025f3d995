# Shared by all stage files: config validation, canonical output paths, and helpers.
# Paths are defined here once; rule files and the report refer to these names.

import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from cxrssl.config import (OWN_RULE_METHODS, ConfigError, pretraining_methods, read_config_file, section_schema,
                           section_to_cli, validate_config)
from cxrssl.detection.engines import RUN_SETTINGS, engine_names

# --- config: validate before any job runs; errors name the files, the key and what is wrong ---
# cxrssl.config checks the schema, NaN/infinity and the cross-checks between sections; the
# validated copy (defaults filled in) replaces the config the rules read. (Snakemake itself
# refuses an empty or malformed config file before this point.)
try:
    for _configfile in workflow.configfiles:  # Snakemake's YAML reader keeps the last of a key given twice
        read_config_file(_configfile)
    _validated = validate_config(config, source=", ".join(map(str, workflow.configfiles)) or "config")
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
config.update(_validated)

ENV = "../envs/cxrssl.yaml"
ENV_MMDET = "../envs/mmdet.yaml"  # cxrssl.yaml + mmengine/mmdet (mmcv wheel: post-deploy)
# Per detection engine: its conda environment and whether it runs multi-GPU through torchrun.
DETECTION_ENGINE_RULE = {
    "torchvision": {"env": ENV, "torchrun": True},
    "mmdet": {"env": ENV_MMDET, "torchrun": False},  # mmengine runs one process here
}


def rule_python():
    """The interpreter rules run their scripts with: the environment the workflow runs in.

    What Snakemake itself does for `script:` directives: the interpreter running Snakemake itself
    (sys.executable: the Makefile's venv, or any environment where cxrssl is installed; SLURM
    jobs re-run Snakemake with that interpreter, so they get it too), or, with
    `--software-deployment-method conda` / `apptainer`, the `python` of the rule's activated
    environment. Never whatever `python` happens to be first on PATH.
    """
    from snakemake.settings.types import DeploymentMethod

    methods = workflow.deployment_settings.deployment_method
    if DeploymentMethod.CONDA in methods or DeploymentMethod.APPTAINER in methods:
        return "python"
    return shlex.quote(sys.executable)


# Rules run `"$CXRSSL_PY" "$CXRSSL_SCRIPTS/<name>.py" ...`: absolute script paths work from any
# working directory (`--directory`) and in cluster jobs (each job re-reads this file). They reach
# the shell as variables, not as `{PY}` in the command: machine paths are no rule parameter (a
# moved checkout reruns nothing) and `snakemake --lint` stays clean. (shell.prefix: below, with
# the tracking flags.)
PY = rule_python()
SCRIPTS = shlex.quote(str(Path(workflow.main_snakefile).parent / "scripts"))
RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
SEED = config["seed"]
TORCH_THREADS = config["torch_threads"]
# Scheduling order (Snakemake `priority`; no result depends on it): the DAG's longest chain first,
# data preparation -> pretraining -> detection, so that the short jobs (linear probes, segmentation,
# zero-shot, summaries) fill the other cores instead of leaving one detection run alone at the end.
# Measured on the demo DAG, 2 cores, same jobs: 14.8 min wall without it, 11.0 min with it.
PRIORITY = {"prepare": 30, "pretrain": 20, "detection": 10}
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
# pretraining: one run folder per method (a method is a module of cxrssl/ssl/methods/ and its
# block pretrain.<method> in the schema; the blocks name the registered methods here, so the
# workflow needs no torch import to know them)
PRETRAIN_METHODS = pretraining_methods()
PRETRAIN_DIR = f"{RESULTS}/pretrain/{{method}}"
PRETRAIN_BACKBONE = f"{PRETRAIN_DIR}/backbone.pth"
PRETRAIN_SIDECAR = f"{PRETRAIN_DIR}/backbone.json"
_unknown = [m for m in config["pretrain"]["methods"] if m not in PRETRAIN_METHODS]
if _unknown:
    raise WorkflowError(f"pretrain.methods: unknown method(s) {_unknown}; registered: {', '.join(PRETRAIN_METHODS)}")
# linear evaluation
LINEAR_RUN = f"{RESULTS}/linear_eval/{{init}}/frac{{fraction}}"
LINEAR_SUMMARY = f"{RESULTS}/linear_eval/summary.csv"
LINEAR_PLOT = f"{RESULTS}/linear_eval/auc_vs_fraction.png"
LINEAR_DIFFERENCES = f"{RESULTS}/linear_eval/differences.csv"
LINEAR_SUMMARY_MD = f"{RESULTS}/linear_eval/summary.md"
# detection, evaluation, heatmaps: one run per engine x init x resolution x seed
DET_RUN = f"{RESULTS}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
EVAL_RUN = f"{RESULTS}/evaluation/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
HEATMAP_RUN = f"{RESULTS}/heatmaps/{{engine}}/{{init}}_{{res}}px_seed{{seed}}"
HEATMAP_LOCALIZATION = f"{HEATMAP_RUN}/localization.json"
EVAL_SUMMARY = f"{RESULTS}/evaluation/summary.csv"

# Settings that select runs (wildcards), not flags: changing them must not rerun finished runs
# (cxrssl.detection.engines.RUN_SETTINGS, imported above).


wildcard_constraints:
    init="[A-Za-z0-9_-]+",
    method="|".join(PRETRAIN_METHODS),
    fraction="[0-9.]+",
    res="[0-9]+",
    seed="[0-9]+",
    engine="|".join(engine_names()),
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


# Live tracking flags (config `tracking`) of the training scripts: the bash array CXRSSL_TRACKING
# of the shell prefix, used as "${{CXRSSL_TRACKING[@]}}" in `shell:`, not a param, so a different
# tracking back end reruns no training job (and `snakemake --lint` stays clean).
TRACKING_ARGS = cli("tracking")
shell.prefix(f"set -euo pipefail; CXRSSL_PY={PY}; CXRSSL_SCRIPTS={SCRIPTS}; CXRSSL_TRACKING=({TRACKING_ARGS}); ")


def pretrain_backbones():
    """backbone.pth of every method in pretrain.methods."""
    return expand(PRETRAIN_BACKBONE, method=config["pretrain"]["methods"])


def init_arch(init):
    """The arch of a `random-<arch>` / `imagenet-<arch>` init (None for every other init)."""
    kind, sep, arch = init.partition("-")
    return arch if sep and kind in ("random", "imagenet") else None


def init_checkpoint(init, allow_arch=False):
    """What a backbone `init` wildcard resolves to: random, imagenet or a checkpoint path.

    An init named like a pretraining method is that method's backbone.pth (its backbone.json
    says which arch to build). `random-<arch>` / `imagenet-<arch>` pick another registered arch
    than the stage's own; only stages that build any arch (linear evaluation: allow_arch) take
    them, the others refuse them rather than silently build their own arch.
    """
    if init in ("random", "imagenet"):
        return init
    if init_arch(init):
        if not allow_arch:
            raise WorkflowError(f"init {init!r} (another arch) is only available in linear_eval.inits and detection.inits")
        archs = section_schema("linear_eval")["properties"]["arch"]["enum"]
        if init_arch(init) not in archs:
            raise WorkflowError(f"init {init!r}: unknown arch {init_arch(init)!r}; registered: {', '.join(archs)}")
        return init.partition("-")[0]
    if init in PRETRAIN_METHODS:
        return expand(PRETRAIN_BACKBONE, method=init)[0]
    if init in config["backbones"]:
        return config["backbones"][init]
    raise WorkflowError(
        f"unknown init {init!r}: use random, imagenet, random-<arch>, a pretraining method "
        f"({', '.join(PRETRAIN_METHODS)}) or a name under `backbones:`"
    )


def init_input(wildcards):
    """Input files a backbone init needs (only checkpoints are files; a method's sidecar with it)."""
    value = init_checkpoint(wildcards.init, allow_arch=True)
    if value in ("random", "imagenet"):
        return []
    if wildcards.init in PRETRAIN_METHODS:
        return method_backbone_files(wildcards.init)
    return [value]


def method_backbone_files(method):
    """A pretraining method's backbone.pth and its sidecar backbone.json (what loading it as an init reads)."""
    return [expand(PRETRAIN_BACKBONE, method=method)[0], expand(PRETRAIN_SIDECAR, method=method)[0]]


# The multimodal method's image encoder from another method's backbone (pretrain.multimodal.init)
def mm_init_input(wildcards):
    """The backbone (and sidecar) of the method `pretrain.multimodal.init` names, if it names one."""
    init = config["pretrain"]["multimodal"]["init"]
    return method_backbone_files(init) if init in PRETRAIN_METHODS and init != "multimodal" else []


def mm_init_flag(wildcards, input):
    """`--init PATH` of that method's backbone (the block's own --init is left out of params.args)."""
    return f"--init {shlex.quote(str(input.init[0]))}" if input.init else ""


def imagenet_path(arch):
    """The local ImageNet weights for `arch` from `imagenet_weights` (a path, or a map arch -> path)."""
    weights = config["imagenet_weights"]
    return weights.get(arch) if isinstance(weights, dict) else weights


def imagenet_flag(arch=None):
    """`--imagenet-weights PATH` for `arch` (detection rules call it without one: detection.arch)."""
    path = imagenet_path(arch or config["detection"]["arch"])
    return f"--imagenet-weights {shlex.quote(path)}" if path else ""


# Rank 0's host and a port of the job for the srun-launched ranks (torch's env:// rendezvous). The
# jobstep plugin removes SLURM_JOB_NODELIST from the rule's shell, so the node list comes from squeue;
# srun places task 0 on its first node. The port (15000-29999, below Linux's ephemeral range) is
# derived from the job id, so two DDP jobs sharing a first node do not collide.
SLURM_RENDEZVOUS = (
    ': "${SLURM_JOB_ID:?resources tasks or tasks_per_node start one rank per SLURM task: run with --profile profiles/slurm}"; '
    'MASTER_ADDR=$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | sed -n 1p); '
    "MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000)); export MASTER_ADDR MASTER_PORT; "
)


def torch_launcher(wildcards, resources, threads):
    """How a DDP training script starts (docs/cluster.md, "Several GPUs or nodes").

    * `tasks: N`, or `tasks_per_node: n` with `nodes: M`, for >= 2 ranks (SLURM profile, with
      `mpi: "srun"`): `srun` starts one rank per SLURM task, each with the rule's threads as its
      CPUs; ranks read SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (cxrssl.runtime.init_distributed),
      NCCL on cuda:SLURM_LOCALID when they have GPUs, else gloo on CPU. One task per GPU is the usual layout.
    * `gpu: N` >= 2 in one task: torchrun (the rule's interpreter) with one process per GPU.
    * otherwise the interpreter. The config's batch size stays the global batch in every case.
    """
    def number(key):
        return int(resources.get(key, 0) or 0)

    nodes, per_node = number("nodes"), number("tasks_per_node")
    tasks = number("tasks") or per_node * max(nodes, 1)
    if tasks >= 2:
        if resources.get("mpi") != "srun":
            raise WorkflowError(
                f"resources: {tasks} tasks need mpi: \"srun\" too: without it the SLURM plugin runs the job as one"
                " srun task, and the rule's own srun, which starts the ranks, waits forever for that task's CPUs")
        if number("gpu") and number("tasks") and not number("tasks_per_gpu"):
            raise WorkflowError(  # snakemake-executor-plugin-slurm 2.8.0 reads tasks as --ntasks-per-gpu then
                f"resources: gpu with tasks: {tasks} needs tasks_per_gpu: 1 (one rank per GPU), or use"
                " tasks_per_node with gres: \"gpu:<per node>\" instead of gpu")
        layout = f"--ntasks={tasks}" + (f" --nodes={nodes}" if nodes else "") + (
            f" --ntasks-per-node={per_node}" if per_node else "")
        return (f'{SLURM_RENDEZVOUS}srun {layout} --cpus-per-task={number("cpus_per_task") or threads}'
                ' --kill-on-bad-exit=1 "$CXRSSL_PY"')
    gpus = number("gpu")
    if gpus >= 2:
        return f'"$CXRSSL_PY" -m torch.distributed.run --standalone --nproc_per_node={gpus}'
    return '"$CXRSSL_PY"'


def detection_env(wildcards):
    """The conda environment of a detection engine (rule train_detector)."""
    return DETECTION_ENGINE_RULE[wildcards.engine]["env"]


def detection_launcher(wildcards, resources, threads):
    """torch_launcher for engines that run DDP themselves (torchvision), else the rule's interpreter."""
    if DETECTION_ENGINE_RULE[wildcards.engine]["torchrun"]:
        return torch_launcher(wildcards, resources, threads)
    return '"$CXRSSL_PY"'


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
# Rule files append (title, markdown file) sections of the headline results (rules/headline.smk),
# which the README shows (`make readme`) and the report opens with.
HEADLINE_PARTS = []


# --- helpers of the stage files (kept here: Snakemake lint wants definitions of rules and functions apart) ---


# demo.smk

def demo_ready():
    """For input functions that glob the image folders: waits for the demo generator when enabled.

    Returns the manifest as a list (usable as an input itself), [] when the demo is disabled.
    """
    if DEMO["enabled"]:
        return [checkpoints.make_demo_data.get().output.manifest]
    return []


# convert.smk

def vindr_dicom_dirs():
    """The DICOM folders of either layout (PhysioNet: train/ and test/; Kaggle: train/, test/ if present)."""
    return [f"{VINDR_ROOT}/{split}" for split in ("train", "test")]


def vindr_dicom_files():
    """Every DICOM of the layout's folders (sorted); [] before the demo generator has run."""
    return sorted(f for d in vindr_dicom_dirs() for pattern in ("*.dicom", "*.dcm") for f in glob(f"{d}/{pattern}"))


def no_dicoms_error():
    where = f"{VINDR_ROOT}/train or {VINDR_ROOT}/test"
    if not DEMO["enabled"]:
        hint = "set vindr.root (and vindr.layout) to your VinDr-CXR copy, or set demo.enabled: true"
    elif os.path.normpath(VINDR_ROOT) != f"{DEMO_ROOT}/vindr":
        hint = f"the demo writes its DICOMs to {DEMO_ROOT}/vindr: point vindr.root there or at your VinDr-CXR copy"
    else:
        hint = f"the demo generator's output is incomplete: delete {DEMO_ROOT} and run again"
    return WorkflowError(f"no DICOMs (*.dicom, *.dcm) in {where}: {hint}")


def vindr_dicom_inputs(wildcards):
    """The DICOM folders as inputs (a folder's mtime changes when a file is added or removed).

    Listing 15,000 DICOMs as inputs would flood every log with their names; the folders plus the
    listing digest in params (below) rerun the rule on the same events, and the per-file cache in
    the script keeps a rerun cheap: only new or changed files are converted.
    """
    ready = demo_ready()  # waits for the demo generator when demo.enabled
    if not vindr_dicom_files():  # fail early and clearly when there is nothing to convert
        raise no_dicoms_error()
    return [*ready, *(d for d in vindr_dicom_dirs() if os.path.isdir(d))]


def vindr_dicom_listing(wildcards):
    """Digest of the DICOM names, sizes and mtimes: a changed set of files reruns the rule."""
    import hashlib

    demo_ready()
    digest = hashlib.sha256()
    for path in vindr_dicom_files():
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def nih_inputs(wildcards):
    return [*demo_ready(), f"{NIH_ROOT}/Data_Entry_2017.csv", f"{NIH_ROOT}/train_val_list.txt", f"{NIH_ROOT}/test_list.txt"]


# evaluation.smk

def evaluated_runs():
    return [(run, expand(f"{EVAL_RUN}/metrics.json", **run)[0]) for run in detection_runs()]


def localized_runs():
    return [(run, expand(HEATMAP_LOCALIZATION, **run)[0]) for run in detection_runs()]


def run_flags():
    """--run (metrics) and --localization (heatmap scores) flags of every run, and the baselines."""
    flags = [
        f"--{kind} {run['engine']} {shlex.quote(str(run['init']))} {run['res']} {run['seed']} {shlex.quote(path)}"
        for kind, runs in (("run", evaluated_runs()), ("localization", localized_runs()))
        for run, path in runs
    ]
    baselines = config["evaluation"]["baselines"]
    flags.append("--baselines " + " ".join(shlex.quote(b) for b in baselines) if baselines else "")
    return " ".join(flags)


# heatmaps.smk

def panel_inputs(wildcards):
    return [expand(HEATMAP_MANIFEST, engine=wildcards.engine, init=init, res=wildcards.res, seed=wildcards.seed)[0]
            for init in config["detection"]["inits"]]


def panel_columns(wildcards):
    return " ".join(f"--column {shlex.quote(init)} {shlex.quote(path)}"
                    for init, path in zip(config["detection"]["inits"], panel_inputs(wildcards)))


# linear_eval.smk

def linear_fraction_label(fraction):
    """Fraction as it appears in a run's folder name: 0.01, 0.1, 1.0 (never exponent notation)."""
    return np.format_float_positional(float(fraction), trim="0")


def linear_eval_metrics():
    lin = config["linear_eval"]
    return expand(
        f"{LINEAR_RUN}/metrics.json",
        init=lin["inits"],
        fraction=[linear_fraction_label(f) for f in lin["fractions"]],
    )



# multimodal.smk

ZEROSHOT_PATH_KEYS = ("layouts", "nih_boxes", "nih_images", "rsna_labels", "rsna_images", "ms_cxr_boxes",
                      "ms_cxr_images")


def report_inputs(wildcards):
    """The report corpus' metadata table (the demo's is a declared output of make_demo_data)."""
    mm = config["pretrain"]["multimodal"]
    table = {"mimic": "mimic-cxr-2.0.0-metadata.csv", "iu": "indiana_projections.csv"}[mm["layout"]]
    return [*demo_ready(), os.path.join(mm["reports_root"], table)]


def demo_hold_out_flag(wildcards):
    """Demo reports: the NIH test patients go to the reports' test split (never pretrained on)."""
    root = os.path.normpath(config["pretrain"]["multimodal"]["reports_root"])
    reports = f"{os.path.normpath(DEMO['root'])}/reports"
    return f"--hold-out-demo {shlex.quote(reports)}" if DEMO["enabled"] and root.startswith(reports + os.sep) else ""


def zeroshot_paths(layout):
    """(box file, images folder) of a zero-shot layout (zeroshot.<layout>_*)."""
    zs = config["zeroshot"]
    boxes = {"nih": "nih_boxes", "rsna": "rsna_labels", "ms_cxr": "ms_cxr_boxes"}[layout]
    return zs[boxes], zs[f"{layout}_images"]


def zeroshot_outputs():
    """localization.json of every layout of zeroshot.layouts (multimodal in pretrain.methods only)."""
    if "multimodal" not in config["pretrain"]["methods"]:
        return []
    return expand(f"{RESULTS}/zeroshot/multimodal/{{boxes}}/localization.json", boxes=config["zeroshot"]["layouts"])


def localization_comparison_flags(wildcards):
    """--cam (heatmap runs) and --zeroshot (similarity maps) flags of the localisation comparison."""
    flags = [f"--cam {run['engine']} {shlex.quote(str(run['init']))} {run['res']} {run['seed']} {shlex.quote(path)}"
             for run, path in localized_runs()]
    flags += [f"--zeroshot {path.split('/')[-2]} {shlex.quote(path)}" for path in zeroshot_outputs()]
    return " ".join(flags)
