# Stage: detection with the torchvision engine (Faster R-CNN + FPN, phase 2) for every
# init x resolution x seed of the grid. The mmdet engine (detection_mmdet.smk) writes the same run
# folder contract, so evaluation and heatmaps treat both engines alike.
#
# The run folder also holds last.pth, the resume state, which is deliberately NOT a declared
# output: Snakemake deletes declared outputs after a failure and before a rerun, and an interrupted
# job must find last.pth to resume from it (it also holds the best weights so far, so best.pth is
# rebuilt on resume). The script resumes only a checkpoint made with the same settings, data and
# initial weights; a finished one with the same fingerprint rebuilds the outputs without training.
# resources.gpu >= 2 launches one DDP process per GPU through torchrun; 0 or 1 runs one process.

DET_TV = DET_RUN.replace("{engine}", "torchvision")


rule train_detector_torchvision:
    input:
        train=VINDR_COCO.format(split="train"),
        val=VINDR_COCO.format(split="val"),
        test=VINDR_COCO.format(split="test"),
        backbone=init_input,
    output:
        best=f"{DET_TV}/best.pth",
        train_log=f"{DET_TV}/train_log.csv",
        predictions=f"{DET_TV}/predictions_test.json",
        curve=report(
            f"{DET_TV}/train_curve.png",
            caption="../report/detection_train_curve.rst",
            category="Detection",
            subcategory="Training curves",
            labels={"engine": "torchvision", "init": "{init}", "resolution": "{res} px", "seed": "{seed}"},
        ),
    log:
        f"{LOGS}/detection/torchvision/{{init}}_{{res}}px_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/detection/torchvision/{{init}}_{{res}}px_seed{{seed}}.tsv"
    params:
        torch_threads=TORCH_THREADS,  # part of the result on CPU (see the schema)
        args=cli("detection", exclude=DETECTION_RUN_SETTINGS),
        init=lambda wildcards: init_checkpoint(wildcards.init),
        imagenet=imagenet_flag(),
        out_dir=lambda wildcards, output: str(Path(output.best).parent),
        launcher=torch_launcher,
    threads: TORCH_THREADS + config["detection"]["workers"]  # torch threads + loader workers
    resources:
        mem_mb=8000 if DEMO["enabled"] else 32000,
        runtime=120 if DEMO["enabled"] else 24 * 60,
        gpu=0,
    conda:
        ENV
    shell:
        "{params.launcher} {SCRIPTS}/train_detector.py --init {params.init:q} --init-name {wildcards.init}"
        " --res {wildcards.res} --seed {wildcards.seed} --threads {params.torch_threads} --train-json {input.train:q}"
        " --val-json {input.val:q} --test-json {input.test:q} --out-dir {params.out_dir:q}"
        " {params.imagenet} {params.args} --log-file {log:q}"  # not --log: torchrun's parser takes it


FINAL_TARGETS.append(
    lambda: [
        path
        for run in detection_runs()
        if run["engine"] == "torchvision"
        for path in expand(
            [f"{DET_TV}/best.pth", f"{DET_TV}/train_curve.png", f"{DET_TV}/predictions_test.json"],
            init=run["init"],
            res=run["res"],
            seed=run["seed"],
        )
    ]
)
