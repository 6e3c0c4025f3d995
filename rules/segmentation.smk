# Stage: lung segmentation (issue 12). The lung-mask releases (segmentation.sources: Montgomery
# County and Shenzhen layouts; the demo writes both under demo.root/lungs) are parsed and split by
# patient once; every init of segmentation.inits trains a segmenter on its backbone and is scored on
# the test split (Dice, IoU, bootstrap CIs); a summary table and figure compare the inits.
# segmentation.inits only adds or drops runs (left out of the params).

SEG = config["segmentation"]
SEG_DIR = f"{RESULTS}/segmentation"
SEG_SPLIT = f"{SEG_DIR}/split.csv"
SEG_QUARANTINE = f"{SEG_DIR}/quarantine.csv"
SEG_RUN = f"{SEG_DIR}/{{init}}"
SEG_SUMMARY = f"{SEG_DIR}/summary.csv"
SEG_SPLIT_FLAGS = ("enabled", "inits", "arch", "image_size", "width", "epochs", "batch_size", "lr", "weight_decay",
                   "hflip", "threshold", "n_bootstrap")
SEG_RUN_FLAGS = ("enabled", "inits", "sources", "val_fraction", "test_fraction")


rule segmentation_split:
    input:
        lambda wildcards: [DEMO_MANIFEST] if DEMO["enabled"] else [],
    output:
        split=SEG_SPLIT,
        quarantine=report(SEG_QUARANTINE, caption="../report/segmentation_quarantine.rst",
                          category="Segmentation", labels={"table": "quarantined lung-mask files"}),
    log:
        f"{LOGS}/segmentation/split.log",
    params:
        args=cli("segmentation", exclude=SEG_SPLIT_FLAGS),
        seed=SEED,
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/split_segmentation.py\" {params.args} --seed {params.seed} --split {output.split:q}"
        " --quarantine {output.quarantine:q} --log {log:q}"


rule segment:
    input:
        split=SEG_SPLIT,
        init=init_input,
    output:
        metrics=f"{SEG_RUN}/metrics.json",
        per_image=f"{SEG_RUN}/per_image.csv",
        examples=report(f"{SEG_RUN}/examples.png", caption="../report/segmentation_examples.rst",
                        category="Segmentation", subcategory="Test examples", labels={"init": "{init}"}),
    log:
        f"{LOGS}/segmentation/{{init}}.log",
    benchmark:
        f"{BENCH}/segmentation/{{init}}.tsv"
    params:
        torch_threads=TORCH_THREADS,
        args=cli("segmentation", exclude=SEG_RUN_FLAGS),
        init=lambda wildcards: init_checkpoint(wildcards.init, allow_arch=True),
        arch=lambda wildcards: f"--arch {init_arch(wildcards.init)}" if init_arch(wildcards.init) else "",
        imagenet=lambda wildcards: imagenet_flag(init_arch(wildcards.init) or SEG["arch"]),
        out_dir=lambda wildcards, output: str(Path(output.metrics).parent),
        seed=SEED,
    threads: TORCH_THREADS
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/segment.py\" {params.args} {params.arch} --split {input.split:q} --init {params.init:q}"
        " --init-name {wildcards.init} --out-dir {params.out_dir:q} --seed {params.seed}"
        " --threads {params.torch_threads} {params.imagenet} --log {log:q}"


rule summarize_segmentation:
    input:
        expand(f"{SEG_RUN}/metrics.json", init=SEG["inits"]),
    output:
        csv=report(SEG_SUMMARY, caption="../report/segmentation_summary.rst", category="Segmentation",
                   labels={"table": "Dice and IoU per init"}),
        md=f"{SEG_DIR}/summary.md",
        png=report(f"{SEG_DIR}/dice_by_init.png", caption="../report/segmentation_plot.rst",
                   category="Segmentation", labels={"figure": "test Dice per init"}),
    log:
        f"{LOGS}/segmentation/summary.log",
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/summarize_segmentation.py\" {input:q} --csv {output.csv:q} --md {output.md:q}"
        " --png {output.png:q} 2> {log:q}"


if SEG["enabled"]:
    FINAL_TARGETS.append(lambda: [SEG_SUMMARY, f"{SEG_DIR}/summary.md", f"{SEG_DIR}/dice_by_init.png",
                                  SEG_QUARANTINE]
                         + expand(f"{SEG_RUN}/examples.png", init=SEG["inits"]))
    HEADLINE_PARTS.append(("Lung segmentation (test split, Dice and IoU with 95% bootstrap CIs)", f"{SEG_DIR}/summary.md"))
