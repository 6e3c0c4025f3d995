# Stage: Barlow Twins pretraining on the NIH train_val images (phase 1).
#
# The run folder also holds checkpoint.pth, which is deliberately NOT a declared output: Snakemake
# removes only declared outputs before a rerun (and after a failure or for --rerun-incomplete), so
# an interrupted or killed job resumes from its last checkpoint when the rule runs again. The
# script resumes only a checkpoint with the same settings and data, and not a finished one.
# resources.gpu >= 2 launches one DDP process per GPU through torchrun; 0 or 1 runs one process.

PRETRAIN_METRICS = f"{PRETRAIN_DIR}/metrics.csv"
PRETRAIN_PLOT = f"{PRETRAIN_DIR}/loss.png"


rule pretrain_barlowtwins:
    input:
        index=NIH_INDEX,
        cache=NIH_CACHE,
    output:
        backbone=PRETRAIN_BACKBONE,
        metrics=report(PRETRAIN_METRICS, caption="../report/pretrain_metrics.rst", category="Pretraining"),
        plot=report(PRETRAIN_PLOT, caption="../report/pretrain_loss.rst", category="Pretraining"),
    log:
        f"{LOGS}/pretrain_barlowtwins.log",
    benchmark:
        f"{BENCH}/pretrain_barlowtwins.tsv"
    params:
        torch_threads=TORCH_THREADS,  # part of the result on CPU (see the schema)
        args=cli("pretrain"),
        imagenet=imagenet_flag(),
        seed=SEED,
        out_dir=lambda wildcards, output: str(Path(output.backbone).parent),
        launcher=torch_launcher,
    threads: TORCH_THREADS + config["pretrain"]["workers"]  # torch threads + loader workers
    resources:
        mem_mb=16000,
        runtime=60 if DEMO["enabled"] else 72 * 60,
        gpu=0,
    conda:
        ENV
    shell:
        "{params.launcher} {SCRIPTS}/pretrain.py --index {input.index:q} --cache {input.cache:q}"
        " --out-dir {params.out_dir:q} --seed {params.seed} --threads {params.torch_threads} {params.imagenet}"
        " {params.args} --log-file {log:q}"  # not --log: torchrun's parser takes it for its --log-dir


FINAL_TARGETS.append(lambda: [PRETRAIN_BACKBONE, PRETRAIN_METRICS, PRETRAIN_PLOT])
