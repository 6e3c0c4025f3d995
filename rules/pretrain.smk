# Stage: self-supervised pretraining on the NIH train_val images (phase 1), one job per method of
# pretrain.methods; the method is the {method} wildcard (a module of cxrssl/ssl/methods/ and its
# schema block pretrain.<method>). Shared settings (pretrain) and the method's own block
# (pretrain.<method>) reach the script as flags, so changing one method's block reruns only it.
#
# The run folder also holds checkpoint.pth, which is deliberately NOT a declared output: Snakemake
# removes only declared outputs before a rerun (and after a failure or for --rerun-incomplete), so
# an interrupted or killed job resumes from its last checkpoint when the rule runs again. The
# script resumes only a checkpoint with the same settings, data and initial weights, and not a
# finished one. resources.gpu >= 2 launches one DDP process per GPU through torchrun; SLURM tasks
# (tasks or tasks_per_node, with mpi: "srun") one rank per task through srun (torch_launcher).

PRETRAIN_METRICS = f"{PRETRAIN_DIR}/metrics.csv"
PRETRAIN_PLOT = f"{PRETRAIN_DIR}/loss.png"
PRETRAIN_MONITOR = f"{PRETRAIN_DIR}/monitor.csv"  # kNN monitor (pretrain.monitor_*); live logs: <run>/dvclive


rule pretrain:
    input:
        index=NIH_INDEX,
        cache=NIH_CACHE,
    output:
        backbone=PRETRAIN_BACKBONE,
        sidecar=PRETRAIN_SIDECAR,
        metrics=report(PRETRAIN_METRICS, caption="../report/pretrain_metrics.rst", category="Pretraining",
                       labels={"method": "{method}", "file": "metrics.csv"}),
        plot=report(PRETRAIN_PLOT, caption="../report/pretrain_loss.rst", category="Pretraining",
                    labels={"method": "{method}", "file": "loss.png"}),
        monitor=report(PRETRAIN_MONITOR, caption="../report/pretrain_monitor.rst", category="Pretraining",
                       labels={"method": "{method}", "file": "monitor.csv"}),
    log:
        f"{LOGS}/pretrain/{{method}}.log",
    benchmark:
        f"{BENCH}/pretrain/{{method}}.tsv"
    params:
        torch_threads=TORCH_THREADS,  # part of the result on CPU (see the schema)
        args=cli("pretrain", exclude=("methods",)),
        method_args=lambda wildcards: cli(f"pretrain.{wildcards.method}"),
        imagenet=lambda wildcards: imagenet_flag(config["pretrain"][wildcards.method]["arch"]),
        seed=SEED,
        out_dir=lambda wildcards, output: str(Path(output.backbone).parent),
        launcher=torch_launcher,
    threads: TORCH_THREADS + config["pretrain"]["workers"]  # torch threads + loader workers
    priority: PRIORITY["pretrain"]
    resources:
        mem_mb=16000,
        runtime=60 if DEMO["enabled"] else 72 * 60,
        gpu=0,
    conda:
        ENV
    shell:
        "{params.launcher} \"$CXRSSL_SCRIPTS/pretrain.py\" --method {wildcards.method} --index {input.index:q}"
        " --cache {input.cache:q} --out-dir {params.out_dir:q} --seed {params.seed}"
        " --threads {params.torch_threads} {params.imagenet} {params.args} {params.method_args}"
        " \"${{CXRSSL_TRACKING[@]}}\" --log-file {log:q}"  # not --log: torchrun's parser takes it for its --log-dir


FINAL_TARGETS.append(
    lambda: [
        *expand([PRETRAIN_BACKBONE, PRETRAIN_SIDECAR, PRETRAIN_METRICS, PRETRAIN_PLOT], method=config["pretrain"]["methods"]),
        # the kNN monitor runs in the shared loop only (methods with their own rules have none)
        *expand(PRETRAIN_MONITOR, method=[m for m in config["pretrain"]["methods"] if m not in OWN_RULE_METHODS]),
    ]
)
