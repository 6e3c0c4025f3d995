# Stage: VinDr-CXR annotations. Parse the readers' boxes (either distribution), split the converted
# images into train/val/test, fuse the readers' boxes with WBF and write one COCO JSON per split.
# The split never depends on fusion settings, so retuning WBF leaves the images where they are.

from cxrssl.data.annotations import annotation_files

# Stage outputs beyond the canonical contracts in common.smk (only this stage and the report use them).
VINDR_FUSION_QUARANTINE = f"{PREP}/vindr/quarantine_fusion.csv"
VINDR_CLASS_COUNTS = f"{PREP}/vindr/fused_class_counts.csv"
VINDR_CLASS_COUNTS_PLOT = f"{PREP}/vindr/fused_class_counts.png"


rule parse_annotations:
    input:
        [str(p) for p in annotation_files(VINDR_ROOT, config["vindr"]["layout"]).values()],
    output:
        annotations=VINDR_ANNOTATIONS,
        quarantine=report(
            VINDR_ANNOTATION_QUARANTINE,
            caption="../report/annotations_quarantine.rst",
            category="Data",
            subcategory="Quarantine",
        ),
    params:
        args=cli("vindr"),
        privacy=cli("privacy"),
        on_bad_input=ON_BAD_INPUT,
    log:
        f"{LOGS}/parse_annotations.log",
    benchmark:
        f"{BENCH}/parse_annotations.tsv"
    conda:
        ENV
    threads: 1
    priority: PRIORITY["prepare"]
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/parse_annotations.py\" {params.args} {params.privacy} --on-bad-input {params.on_bad_input}"
        " --annotations {output.annotations} --quarantine {output.quarantine} --log {log}"


rule split_vindr:
    input:
        annotations=VINDR_ANNOTATIONS,
        metadata=VINDR_METADATA,
    output:
        VINDR_SPLIT,
    params:
        args=cli("vindr.split"),
        layout=config["vindr"]["layout"],
        seed=SEED,
    log:
        f"{LOGS}/split_vindr.log",
    conda:
        ENV
    threads: 1
    priority: PRIORITY["prepare"]
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/split_vindr.py\" {params.args} --layout {params.layout} --seed {params.seed}"
        " --annotations {input.annotations} --metadata {input.metadata} --output {output} --log {log}"


rule fuse_boxes:
    input:
        annotations=VINDR_ANNOTATIONS,
        metadata=VINDR_METADATA,
        split=VINDR_SPLIT,
    output:
        fused=VINDR_FUSED,
        coco_train=expand(VINDR_COCO, split="train")[0],
        coco_val=expand(VINDR_COCO, split="val")[0],
        coco_test=expand(VINDR_COCO, split="test")[0],
        quarantine=report(
            VINDR_FUSION_QUARANTINE,
            caption="../report/annotations_quarantine_fusion.rst",
            category="Data",
            subcategory="Quarantine",
        ),
        counts=report(
            VINDR_CLASS_COUNTS,
            caption="../report/annotations_class_counts.rst",
            category="Data",
            subcategory="VinDr-CXR boxes",
        ),
        plot=report(
            VINDR_CLASS_COUNTS_PLOT,
            caption="../report/annotations_class_counts_plot.rst",
            category="Data",
            subcategory="VinDr-CXR boxes",
        ),
    params:
        args=cli("vindr.fusion"),
        on_bad_input=ON_BAD_INPUT,
    log:
        f"{LOGS}/fuse_boxes.log",
    benchmark:
        f"{BENCH}/fuse_boxes.tsv"
    conda:
        ENV
    threads: 1
    priority: PRIORITY["prepare"]
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/fuse_boxes.py\" {params.args} --on-bad-input {params.on_bad_input}"
        " --annotations {input.annotations} --metadata {input.metadata} --split {input.split}"
        " --fused {output.fused} --coco-train {output.coco_train} --coco-val {output.coco_val}"
        " --coco-test {output.coco_test} --quarantine {output.quarantine}"
        " --counts-csv {output.counts} --counts-png {output.plot} --log {log}"


FINAL_TARGETS.append(
    lambda: [
        VINDR_ANNOTATION_QUARANTINE,
        VINDR_SPLIT,
        VINDR_FUSED,
        *expand(VINDR_COCO, split=SPLITS),
        VINDR_FUSION_QUARANTINE,
        VINDR_CLASS_COUNTS,
        VINDR_CLASS_COUNTS_PLOT,
    ]
)
