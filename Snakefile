# cxrssl: Barlow Twins pretraining on NIH ChestX-ray14 and Faster R-CNN localisation on VinDr-CXR.
#
#   snakemake --profile profiles/default            # whole DAG (demo data by default)
#   snakemake --profile profiles/default --report results/report.html
#
# One .smk file per stage; rules call scripts/, scripts call the cxrssl package.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/convert.smk"
include: "rules/annotations.smk"
include: "rules/pretrain.smk"
include: "rules/linear_eval.smk"
include: "rules/detection.smk"
include: "rules/evaluation.smk"
include: "rules/heatmaps.smk"
include: "rules/headline.smk"
include: "rules/report.smk"
include: "rules/segmentation.smk"
include: "rules/multimodal.smk"
include: "rules/targets.smk"


rule all:
    input:
        all_targets(),
    default_target: True
