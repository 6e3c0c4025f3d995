# Stage: the report's first page. The headline tables (linear evaluation; detection with its
# intervals and paired differences) as reStructuredText, which report/workflow.rst includes, so
# `snakemake --report` opens on the results rather than on a description alone. The file lives in
# the evaluation folder (the DVC stage "detection" holds it beside the detection summary).

REPORT_HEADLINE = f"{RESULTS}/evaluation/report_headline.rst"


rule report_headline:
    input:
        linear=LINEAR_SUMMARY,
        detection=EVAL_SUMMARY,
        differences=EVAL_DIFFERENCES,
    output:
        REPORT_HEADLINE,
    log:
        f"{LOGS}/report_headline.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "\"$CXRSSL_PY\" \"$CXRSSL_SCRIPTS/report_headline.py\" --linear {input.linear:q} --detection {input.detection:q}"
        " --differences {input.differences:q} --out {output:q} --log {log:q}"


FINAL_TARGETS.append(lambda: [REPORT_HEADLINE])
