# Detection with the mmdet engine (mmdet 3.3 + mmengine Runner): the same run folder contract as
# the torchvision engine (best.pth, last.pth, train_log.csv, train_curve.png, predictions_test.json),
# so evaluation, heatmaps and the report treat both engines alike. Selected with
# `detection.engine: mmdet` or `detection.engines: [mmdet]`; needs mmcv with compiled ops
# (`make mmcv`), otherwise the job fails saying how to install it.



rule train_detector_mmdet:
    input:
        train=VINDR_COCO.format(split="train"),
        val=VINDR_COCO.format(split="val"),
        test=VINDR_COCO.format(split="test"),
        backbone=init_input,
    output:
        best=f"{DET_RUN}/best.pth",
        last=f"{DET_RUN}/last.pth",
        train_log=f"{DET_RUN}/train_log.csv",
        curve=report(
            f"{DET_RUN}/train_curve.png",
            caption="../report/detection_mmdet_curve.rst",
            category="Detection",
            subcategory="Training curves",
            labels={"engine": "{engine}", "init": "{init}", "resolution": "{res} px", "seed": "{seed}"},
        ),
        predictions=f"{DET_RUN}/predictions_test.json",
    wildcard_constraints:
        engine="mmdet",
    params:
        args=cli("detection", exclude=DETECTION_RUN_SETTINGS),
        init=lambda wc: init_checkpoint(wc.init),
        imagenet=imagenet_flag(),
        out_dir=DET_RUN,
    log:
        f"{LOGS}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/detection/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.tsv"
    conda:
        ENV_MMDET
    threads: 8
    resources:
        mem_mb=32000,
        runtime=1440,
    shell:
        "{PY} {SCRIPTS}/train_detector_mmdet.py --init {params.init:q} --res {wildcards.res} "
        "--seed {wildcards.seed} --train-json {input.train:q} --val-json {input.val:q} "
        "--test-json {input.test:q} --out-dir {params.out_dir:q} {params.imagenet} {params.args} "
        "--log {log:q}"


FINAL_TARGETS.append(
    lambda: [
        expand(f"{DET_RUN}/train_curve.png", **run)[0]
        for run in detection_runs()
        if run["engine"] == "mmdet"
    ]
)
