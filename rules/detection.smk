# Stage: detection (Faster R-CNN + FPN, phase 2) for every engine x init x resolution x seed of the
# grid: one rule, the engine is a wildcard (cxrssl.detection.engines; `detection.engine` and
# `detection.engines` pick which run). Each engine keeps its own conda environment, launcher and
# resources (DETECTION_ENGINE_RULE in common.smk); both write the same run folder contract, so
# evaluation and heatmaps treat them alike.
#
# The run folder also holds last.pth, which is deliberately NOT a declared output: for the
# torchvision engine it is the resume state, and Snakemake deletes declared outputs after a failure
# and before a rerun, while an interrupted job must find last.pth to resume from it (it also holds
# the best weights so far, so best.pth is rebuilt on resume). The script resumes only a checkpoint
# made with the same settings, data and initial weights; a finished one with the same fingerprint
# rebuilds the outputs without training. The mmdet engine starts over. resources.gpu >= 2 launches
# one DDP process per GPU through torchrun (torchvision engine); 0 or 1 runs one process.


rule train_detector:
    input:
        train=VINDR_COCO.format(split="train"),
        val=VINDR_COCO.format(split="val"),
        test=VINDR_COCO.format(split="test"),
        backbone=init_input,
    output:
        best=f"{DET_RUN}/best.pth",
        train_log=f"{DET_RUN}/train_log.csv",
        predictions=f"{DET_RUN}/predictions_test.json",
        curve=report(
            f"{DET_RUN}/train_curve.png",
            caption="../report/detection_train_curve.rst",
            category="Detection",
            subcategory="Training curves",
            labels={"engine": "{engine}", "init": "{init}", "resolution": "{res} px", "seed": "{seed}"},
        ),
    log:
        f"{LOGS}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.tsv"
    params:
        torch_threads=TORCH_THREADS,  # part of the result on CPU (see the schema)
        args=cli("detection", exclude=RUN_SETTINGS),
        init=lambda wildcards: init_checkpoint(wildcards.init, allow_arch=True),
        arch=lambda wildcards: f"--arch {init_arch(wildcards.init)}" if init_arch(wildcards.init) else "",
        imagenet=lambda wildcards: imagenet_flag(init_arch(wildcards.init)),
        out_dir=lambda wildcards, output: str(Path(output.best).parent),
        launcher=detection_launcher,
    threads: TORCH_THREADS + config["detection"]["workers"]  # torch threads + loader workers
    priority: PRIORITY["detection"]
    resources:
        mem_mb=8000 if DEMO["enabled"] else 32000,
        runtime=120 if DEMO["enabled"] else 24 * 60,
        gpu=0,
    conda:
        detection_env
    shell:
        "{params.launcher} \"$CXRSSL_SCRIPTS/train_detector.py\" --engine {wildcards.engine} --init {params.init:q}"
        " --init-name {wildcards.init} --res {wildcards.res} --seed {wildcards.seed} --threads {params.torch_threads}"
        " --train-json {input.train:q} --val-json {input.val:q} --test-json {input.test:q} --out-dir {params.out_dir:q}"
        " {params.imagenet} {params.args} {params.arch} \"${{CXRSSL_TRACKING[@]}}\" --log-file {log:q}"  # not --log: torchrun's parser takes it


FINAL_TARGETS.append(
    lambda: [
        path
        for run in detection_runs()
        for path in expand(
            [f"{DET_RUN}/best.pth", f"{DET_RUN}/train_curve.png", f"{DET_RUN}/predictions_test.json"], **run
        )
    ]
)
