# Stage: evaluation. COCO + VinBigData metrics per detection run (with bootstrap intervals), the
# comparison across engine x init x resolution x seed (mAP50 intervals, paired differences of every
# init against the baselines over the same test-image resamples, the heatmaps' localisation scores)
# as a table and plot, and the data summary.

from pathlib import Path

# Stage outputs beyond the canonical contracts in common.smk (only this stage and the report use them).
EVAL_SUMMARY_MD = str(Path(EVAL_SUMMARY).with_suffix(".md"))
EVAL_SUMMARY_PLOT = str(Path(EVAL_SUMMARY).with_name("map50_by_resolution.png"))
EVAL_DIFFERENCES = str(Path(EVAL_SUMMARY).with_name("differences.csv"))
DATA_SUMMARY_DIR = f"{PREP}/summary"
DATA_SUMMARY_HTML = f"{DATA_SUMMARY_DIR}/data_summary.html"
DATA_SUMMARY_COUNTS = f"{DATA_SUMMARY_DIR}/counts.csv"
DATA_SUMMARY_QUARANTINE = f"{DATA_SUMMARY_DIR}/quarantined.csv"


rule evaluate:
    input:
        gt=expand(VINDR_COCO, split="test"),
        results=f"{DET_RUN}/predictions_test.json",
    output:
        metrics=f"{EVAL_RUN}/metrics.json",
    params:
        # evaluation.seeds is the fine-tuning grid, baselines the summary's comparisons: not metric settings
        args=cli("evaluation", exclude=("seeds", "baselines")),
        seed=SEED,
    log:
        f"{LOGS}/evaluate/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.log",
    benchmark:
        f"{BENCH}/evaluate/{{engine}}/{{init}}_{{res}}px_seed{{seed}}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/evaluate.py\" --gt {input.gt:q} --results {input.results:q} --out {output.metrics:q}"
        " --seed {params.seed} {params.args} --log {log:q}"


rule summarize_detection:
    input:
        metrics=[path for _, path in evaluated_runs()],
        localization=[path for _, path in localized_runs()],
    output:
        csv=report(EVAL_SUMMARY, caption="../report/detection_summary.rst", category="Detection",
                   subcategory="Comparison"),
        markdown=report(EVAL_SUMMARY_MD, caption="../report/detection_summary_md.rst", category="Detection",
                        subcategory="Comparison"),
        plot=report(EVAL_SUMMARY_PLOT, caption="../report/detection_plot.rst", category="Detection",
                    subcategory="Comparison"),
        differences=report(EVAL_DIFFERENCES, caption="../report/detection_differences.rst", category="Detection",
                           subcategory="Comparison"),
    params:
        runs=run_flags(),
    log:
        f"{LOGS}/summarize_detection.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/summarize_detection.py\" {params.runs} --csv {output.csv:q} --differences {output.differences:q}"
        " --markdown {output.markdown:q} --plot {output.plot:q} --log {log:q}"


rule summarize_data:
    input:
        vindr_metadata=VINDR_METADATA,
        vindr_split=VINDR_SPLIT,
        vindr_fused=VINDR_FUSED,
        nih_index=NIH_INDEX,
        quarantine=[VINDR_CONVERT_QUARANTINE, VINDR_ANNOTATION_QUARANTINE, VINDR_FUSION_QUARANTINE, NIH_QUARANTINE],
    output:
        html=report(DATA_SUMMARY_HTML, caption="../report/data_summary.rst", category="Data",
                    subcategory="Summary"),
        counts=report(DATA_SUMMARY_COUNTS, caption="../report/data_summary_counts.rst", category="Data",
                      subcategory="Summary"),
        quarantined=report(DATA_SUMMARY_QUARANTINE, caption="../report/data_summary_quarantine.rst",
                           category="Data", subcategory="Quarantine"),
    log:
        f"{LOGS}/summarize_data.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/summarize_data.py\" --vindr-metadata {input.vindr_metadata:q}"
        " --vindr-split {input.vindr_split:q} --vindr-fused {input.vindr_fused:q} --nih-index {input.nih_index:q}"
        " --quarantine {input.quarantine:q} --html {output.html:q} --counts {output.counts:q}"
        " --quarantined {output.quarantined:q} --log {log:q}"


FINAL_TARGETS.append(lambda: [EVAL_SUMMARY, EVAL_SUMMARY_MD, EVAL_SUMMARY_PLOT, EVAL_DIFFERENCES])
FINAL_TARGETS.append(lambda: [DATA_SUMMARY_HTML, DATA_SUMMARY_COUNTS, DATA_SUMMARY_QUARANTINE])
