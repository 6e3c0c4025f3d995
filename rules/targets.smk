# Stage targets: one rule per DVC stage (dvc.yaml runs `snakemake --profile profiles/default <target>`,
# so every command exists once, here in the rule files) and the metrics summary DVC compares runs by.
#
# A stage target asks for the canonical outputs of its stage (common.smk) plus every final output
# the stage's rule files registered under the stage's result folder(s), so a product added to a
# stage later is picked up without touching this file. Each folder here is one DVC `outs:` entry.

from cxrssl.tracking import paths_under

METRICS_JSON = f"{RESULTS}/metrics.json"

STAGE_DIRS = {
    "prepare": [PREP],
    "pretrain": [f"{RESULTS}/pretrain"],
    "linear_eval": [f"{RESULTS}/linear_eval"],
    "detection": [f"{RESULTS}/detection", f"{RESULTS}/evaluation"],
    "heatmaps": [f"{RESULTS}/heatmaps"],
    "segmentation": [SEG_DIR],  # issue 12
}
DETECTION_CHECKPOINTS = [expand(f"{DET_RUN}/best.pth", **run)[0] for run in detection_runs()]
DETECTION_METRICS = [expand(f"{EVAL_RUN}/metrics.json", **run)[0] for run in detection_runs()]


localrules:
    stage_demo,
    stage_prepare,
    stage_pretrain,
    stage_linear_eval,
    stage_detection,
    stage_heatmaps,
    stage_segmentation,


rule stage_demo:
    input:
        lambda wildcards: [DEMO_MANIFEST] if DEMO["enabled"] else [],


rule stage_prepare:
    input:
        lambda wildcards: paths_under(
            all_targets(),
            STAGE_DIRS["prepare"],
            first=[NIH_INDEX, NIH_CACHE, VINDR_METADATA, VINDR_SPLIT, VINDR_FUSED, *expand(VINDR_COCO, split=SPLITS)],
        ),


rule stage_pretrain:
    input:
        lambda wildcards: paths_under(all_targets(), STAGE_DIRS["pretrain"], first=pretrain_backbones()),


rule stage_linear_eval:
    input:
        lambda wildcards: paths_under(
            all_targets(), STAGE_DIRS["linear_eval"], first=[LINEAR_SUMMARY, *linear_eval_metrics()]
        ),


rule stage_detection:
    input:
        lambda wildcards: paths_under(
            all_targets(), STAGE_DIRS["detection"], first=[*DETECTION_CHECKPOINTS, *DETECTION_METRICS, EVAL_SUMMARY]
        ),


rule stage_heatmaps:
    input:
        lambda wildcards: paths_under(all_targets(), STAGE_DIRS["heatmaps"]),


rule stage_segmentation:
    input:
        lambda wildcards: paths_under(all_targets(), STAGE_DIRS["segmentation"], first=[SEG_SUMMARY]),


rule collect_metrics:
    input:
        detection=DETECTION_METRICS,
        linear=linear_eval_metrics(),
    output:
        METRICS_JSON,
    log:
        f"{LOGS}/collect_metrics.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/collect_metrics.py\" --detection {input.detection:q} --linear {input.linear:q}"
        " --output {output:q} --log {log:q}"


FINAL_TARGETS.append(lambda: [METRICS_JSON])
