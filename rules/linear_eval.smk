# Linear evaluation on NIH ChestX-ray14: every backbone init x label fraction, then a summary.
# An init named like a pretraining method is that method's backbone (its arch from backbone.json);
# random / imagenet use linear_eval.arch, random-<arch> / imagenet-<arch> another registered arch.
# Changing linear_eval.inits or .fractions only adds or drops runs: those two lists are left out
# of the params, so existing runs are not rerun.

import numpy as np


rule linear_eval:
    input:
        index=NIH_INDEX,
        cache=NIH_CACHE,
        init=init_input,
    output:
        metrics=f"{LINEAR_RUN}/metrics.json",
        predictions=f"{LINEAR_RUN}/predictions_test.csv",
        history=f"{LINEAR_RUN}/history.csv",
        split=f"{LINEAR_RUN}/split.csv",
    log:
        f"{LOGS}/linear_eval/{{init}}_frac{{fraction}}.log",
    benchmark:
        f"{BENCH}/linear_eval/{{init}}_frac{{fraction}}.tsv"
    params:
        torch_threads=TORCH_THREADS,  # part of the result on CPU (see the schema)
        args=cli("linear_eval", exclude=("inits", "fractions", "bootstrap", "baselines")),
        init=lambda wildcards: init_checkpoint(wildcards.init, allow_arch=True),
        arch=lambda wildcards: f"--arch {init_arch(wildcards.init)}" if init_arch(wildcards.init) else "",
        imagenet=lambda wildcards: imagenet_flag(init_arch(wildcards.init) or config["linear_eval"]["arch"]),
        out_dir=lambda wildcards, output: str(Path(output.metrics).parent),
        seed=SEED,
    threads: TORCH_THREADS + config["linear_eval"]["workers"]
    resources:
        mem_mb=8000,
        runtime=600,
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/linear_eval.py\" {params.args} --init {params.init:q} --init-name {wildcards.init}"
        " --fraction {wildcards.fraction} {params.arch} --index {input.index:q}"
        " --cache {input.cache:q} --out-dir {params.out_dir:q} --seed {params.seed} --threads {params.torch_threads} {params.imagenet}"
        " \"${{CXRSSL_TRACKING[@]}}\" --log {log:q}"


rule summarize_linear_eval:
    input:
        linear_eval_metrics(),
    output:
        summary=report(
            LINEAR_SUMMARY,
            caption="../report/linear_summary.rst",
            category="Linear evaluation",
            labels={"figure": "summary table"},
        ),
        plot=report(
            LINEAR_PLOT,
            caption="../report/linear_plot.rst",
            category="Linear evaluation",
            labels={"figure": "mean test AUC vs label fraction"},
        ),
        differences=report(
            LINEAR_DIFFERENCES,
            caption="../report/linear_differences.rst",
            category="Linear evaluation",
            labels={"figure": "paired differences"},
        ),
        markdown=LINEAR_SUMMARY_MD,
    params:
        bootstrap=config["linear_eval"]["bootstrap"],
        baselines=" ".join(shlex.quote(b) for b in config["linear_eval"]["baselines"]),
        seed=SEED,
    log:
        f"{LOGS}/linear_eval/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/summarize_linear_eval.py\" --metrics {input:q} --summary {output.summary:q}"
        " --plot {output.plot:q} --differences {output.differences:q} --markdown {output.markdown:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed} --baselines {params.baselines} --log {log:q}"


FINAL_TARGETS.append(lambda: [LINEAR_SUMMARY, LINEAR_PLOT, LINEAR_DIFFERENCES, LINEAR_SUMMARY_MD])
